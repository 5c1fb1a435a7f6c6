"""No container engine runs here, so the Dockerfiles are checked by reading them:
every path they copy exists and every command they run is a real CLI command."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(dockerfile: Path) -> None:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources = shlex.split(line)[1:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_is_a_real_recsys_command(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    match = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert match, f"{dockerfile.name} has no exec-form CMD"
    argv = json.loads(match.group(1))
    assert argv[0] == "recsys"
    result = CliRunner().invoke(app, [*argv[1:2], "--help"])
    assert result.exit_code == 0, result.output
    for flag in [a for a in argv[2:] if a.startswith("--")]:
        assert flag in result.output, f"{dockerfile.name}: {flag} is not an option of {argv[1]}"


def test_images_run_as_non_root_with_a_healthcheck() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^USER (?!root)\S+", text, re.M), dockerfile.name
        assert "HEALTHCHECK" in text and "/healthz" in text, dockerfile.name
