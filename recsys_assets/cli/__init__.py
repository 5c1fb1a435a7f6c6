"""The ``recsys`` console script: the operations people run by hand.

Each concern registers its commands from its own module; imports of heavy
libraries (Dagster, polars) stay inside the commands so ``recsys --help`` is fast, and
so it works in a serving install (``pip install recsys``): there the pipeline commands
stop at their first Dagster import, and :func:`main` says which extra to install.
"""

from __future__ import annotations

import sys
import warnings

import typer

# Dagster flags beta parameters (backfill_policy) on every import; the CLI's users
# cannot act on that, so keep their terminal for what matters.
warnings.filterwarnings("ignore", message=".*currently in (beta|preview).*")

app = typer.Typer(
    name="recsys",
    help="Capture weblogs, train, serve and keep a recommender fresh.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Command modules register themselves on ``app`` when imported.
from recsys_assets.cli import acquisition as _acquisition  # noqa: E402,F401
from recsys_assets.cli import catalog as _catalog  # noqa: E402,F401
from recsys_assets.cli import config as _config  # noqa: E402,F401
from recsys_assets.cli import demo as _demo  # noqa: E402,F401
from recsys_assets.cli import keys as _keys  # noqa: E402,F401
from recsys_assets.cli import models as _models  # noqa: E402,F401
from recsys_assets.cli import serve as _serve  # noqa: E402,F401
from recsys_assets.cli import simulate as _simulate  # noqa: E402,F401
from recsys_assets.cli import training as _training  # noqa: E402,F401

PIPELINE_HINT = "pip install 'recsys[pipeline]'"


def main() -> None:
    """The console script: ``app``, plus one clear line instead of a traceback when a
    command needs the pipeline extra (Dagster, the training stack) and it is missing."""
    try:
        app()
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.partition(".")[0] in ("recsys_assets", "recsys_serving"):
            raise  # our own package is broken: that is a bug, keep the traceback
        command = " ".join(["recsys", *sys.argv[1:2]])
        print(
            f"error: {command} needs the pipeline extra (no module named {missing!r}): "
            f"{PIPELINE_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
