"""The Dagster instance every entry point shares (CLI, ``dagster dev``, tests of the CLI).

Runs launched by ``recsys ingest`` or ``recsys retrain`` must show up in the UI like
any other, so all of them use ``$RECSYS_HOME/dagster`` unless ``DAGSTER_HOME`` says
otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

from recsys_serving.settings import Settings

PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def ensure_dagster_home(settings: Settings) -> Path:
    """Point ``DAGSTER_HOME`` at the project instance and install its ``dagster.yaml``."""
    explicit = os.environ.get("DAGSTER_HOME")
    home = Path(explicit).resolve() if explicit else settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if PROJECT_DAGSTER_YAML.exists():
        if not target.exists() or target.read_bytes() != PROJECT_DAGSTER_YAML.read_bytes():
            shutil.copyfile(PROJECT_DAGSTER_YAML, target)
    elif not target.exists():
        target.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance(settings: Settings) -> dg.DagsterInstance:
    ensure_dagster_home(settings)
    return dg.DagsterInstance.get()
