"""No container engine runs here, so the Dockerfiles are checked by reading them:
every path they copy exists and every command they run is a real CLI command."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(dockerfile: Path) -> None:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources = shlex.split(line)[1:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"


# The instance installer that Dagster processes start through (recsys_assets.instance).
INSTANCE_WRAPPER = ["python", "-m", "recsys_assets.instance"]


def exec_form(dockerfile: Path, instruction: str) -> list[str] | None:
    match = re.search(rf"^{instruction} (\[.*\])$", dockerfile.read_text(), re.M)
    return json.loads(match.group(1)) if match else None


# Dagster's console scripts, run as the images run them (their --help, from this venv's
# bin/): only their public command line is relied on, not the click objects inside.
DAGSTER_PROGRAMS = ("dagster", "dagster-webserver", "dagster-daemon")


def _dagster_help(program: str, words: list[str]) -> tuple[int, str]:
    script = Path(sys.executable).parent / program
    result = subprocess.run(
        [str(script), *words, "--help"], capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stdout + result.stderr


def assert_real_command(argv: list[str], where: str) -> None:
    """``argv`` runs a real recsys or Dagster command, and every flag it passes exists.

    Subcommands are the words before the first flag; each flag must appear in the help
    of that (sub)command. ``python -m recsys_assets.instance CMD...`` checks CMD.
    """
    assert argv, f"{where}: empty command"
    if argv[:3] == INSTANCE_WRAPPER:
        assert_real_command(argv[3:], where)
        return
    program, rest = argv[0], argv[1:]
    words = list(itertools.takewhile(lambda a: not a.startswith("-"), rest))
    flags = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
    if program == "recsys":
        result = CliRunner().invoke(app, [*words[:1], "--help"])
    elif program == "recsys-serve":
        from recsys_serving.cli import app as serving_app

        result = CliRunner().invoke(serving_app, [*words, "--help"])
    else:
        assert program in DAGSTER_PROGRAMS, f"{where}: {program} is not a recsys or Dagster command"
        code, output = _dagster_help(program, words)
        result = SimpleNamespace(exit_code=code, output=output)
    assert result.exit_code == 0, f"{where}: {argv}: {result.output}"
    for flag in flags:
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}([\s,=/]|$)", result.output, re.M), (
            f"{where}: {flag} is not an option of {program} {' '.join(words)}"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_is_a_real_recsys_command(dockerfile: Path) -> None:
    cmd = exec_form(dockerfile, "CMD")
    assert cmd, f"{dockerfile.name} has no exec-form CMD"
    entrypoint = exec_form(dockerfile, "ENTRYPOINT") or []
    assert entrypoint in ([], INSTANCE_WRAPPER), f"{dockerfile.name}: unexpected ENTRYPOINT"
    assert_real_command([*entrypoint, *cmd], dockerfile.name)


def test_images_run_as_non_root_with_a_healthcheck() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^USER (?!root)\S+", text, re.M), dockerfile.name
        # /healthz for recsys servers; the Dagster webserver's is /server_info.
        assert "HEALTHCHECK" in text and re.search(r"/(healthz|server_info)", text), dockerfile.name
