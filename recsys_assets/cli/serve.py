"""``recsys serve``: the serving package's own entry point (``recsys-serve``), registered
on the full CLI so both spellings are one command with one set of options."""

from __future__ import annotations

from recsys_assets.cli import app
from recsys_serving.cli import serve

app.command(name="serve")(serve)
