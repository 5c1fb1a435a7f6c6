"""The ``recsys`` console script in an install without the pipeline extra.

A serving install (``pip install recsys``) has the ``recsys`` script but not Dagster:
its pipeline commands must stop with one line naming the extra, not a traceback. The
missing Dagster is simulated in a fresh interpreter (``sys.modules["dagster"] = None``
makes every ``import dagster`` raise ``ModuleNotFoundError``, as in a serving venv);
tests/project/test_install.py checks the same against a real serving venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

WITHOUT_DAGSTER = (
    "import sys; sys.modules['dagster'] = None; sys.argv = ['recsys', *sys.argv[1:]];"
    "from recsys_assets.cli import main; main()"
)


def recsys_without_dagster(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RECSYS_HOME": str(tmp_path / "h")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DAGSTER, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize("command", [["retrain"], ["models", "promote", "v1"], ["ui"]])
def test_a_pipeline_command_names_the_extra_in_one_line(tmp_path: Path, command: list[str]) -> None:
    result = recsys_without_dagster(tmp_path, *command)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"recsys {command[0]} needs the pipeline extra" in lines[0]
    assert "pip install 'recsys[pipeline]'" in lines[0] and "'dagster'" in lines[0]


def test_help_works_without_the_pipeline_extra(tmp_path: Path) -> None:
    result = recsys_without_dagster(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "retrain" in result.stdout and "serve" in result.stdout
