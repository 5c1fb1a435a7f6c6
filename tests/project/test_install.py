"""Installs as a user or an image makes them, not the editable checkout the suite runs in.

* The serving set alone (requirements-serving.lock, then the package with --no-deps,
  as docker/serving.Dockerfile does): no Dagster, great-expectations or implicit is
  importable, and ``recsys-serve`` serves a registered model's recommendations.
* ``pip install recsys[serving]`` from the wheel, resolved by pip (held to the lock's
  versions, from the local wheel cache and indexes): Dagster is not installed,
  ``recsys-serve`` answers /healthz, and ``recsys retrain`` names the extra to install.
* A non-editable install (a wheel, run from outside the repository): ``recsys ui`` finds
  its dagster.yaml and workspace.yaml as package data and the Dagster webserver answers
  with the ``recsys`` code location loaded.

Both build venvs under tmp_path; pip reuses its cache, and PyPI answers the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from model_support import tiny_bundle, tiny_outcome, tiny_world  # noqa: F401

from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from serving_support import wait_for
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STACK = ("dagster", "dagster_aws", "great_expectations", "implicit", "recsys_assets")
# Each builds a venv: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=900, **kwargs
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as pip builds it from the source tree (package data included)."""
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT])
    (built,) = out.glob("recsys-*.whl")
    return built


@contextmanager
def started(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[object]:
    """A server in its own process group, stopped with SIGINT (then SIGKILL) by group."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def answers(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_serving_set_alone_serves_recommendations(
    tmp_path: Path,
    tiny_bundle: Path,  # noqa: F811
) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q", "--no-compile"]
    run([*pip, "--require-hashes", "-r", ROOT / "requirements-serving.lock"])
    # What docker/serving.Dockerfile copies and installs: no recsys_assets at all.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "recsys_serving", source / "recsys_serving",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([*pip, "--no-deps", source])

    # Outside the checkout, so nothing resolves to the repository's sources.
    probe = (
        "import importlib.util, recsys_serving.api.app, recsys_serving;"
        f"print([m for m in {TRAINING_STACK!r} if importlib.util.find_spec(m)]);"
        "print(recsys_serving.__file__)"
    )
    missing, where = run([py, "-c", probe], cwd=tmp_path).stdout.strip().splitlines()[-2:]
    assert missing == "[]", f"the serving venv can import {missing}"
    assert where.startswith(str(venv)), where

    home = tmp_path / "home"
    registry = ModelRegistry(LocalLake(home / "lake"))
    registry.promote(registry.register(tiny_bundle).version, reason="test: serving install")
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "RECSYS_HOME": str(home),
        "RECSYS_AUTH_ENABLED": "false",
        "OPENBLAS_NUM_THREADS": "1",
    }
    log = tmp_path / "serve.log"
    argv = [str(venv / "bin" / "recsys-serve"), "--port", str(port)]
    with started(argv, env, tmp_path, log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/readyz", proc, log), 180, "recsys-serve /readyz")
        answer = httpx.get(f"{url}/recommendations/u000002", params={"k": 5}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["items"]) == 5


def test_pip_install_of_the_serving_extra_serves_without_dagster(
    tmp_path: Path, wheel: Path
) -> None:
    """The bar of issue 14: `pip install .[serving]` in a fresh venv runs `recsys-serve`
    and does not install Dagster (pip extras only add, so the base must be the serving
    set). The lock's pins are given as constraints (without hashes: pip resolves the
    extra itself here) so the venv gets the versions CI tested."""
    pinned = tmp_path / "constraints.txt"
    lock = (ROOT / "requirements-serving.lock").read_text()
    pinned.write_text("\n".join(re.findall(r"^[A-Za-z0-9._-]+==[^\s;\\]+", lock, re.M)) + "\n")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", "--no-compile", "-c", pinned, f"{wheel}[serving]"])

    probe = (
        "import importlib.util;"
        f"print([m for m in {TRAINING_STACK[:-1]!r} if importlib.util.find_spec(m)])"
    )
    assert run([py, "-c", probe], cwd=tmp_path).stdout.strip() == "[]"
    blocked = subprocess.run(
        [py, "-c", "import dagster"], capture_output=True, text=True, cwd=tmp_path
    )
    assert blocked.returncode != 0 and "No module named 'dagster'" in blocked.stderr
    listed = run([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    assert "dagster" not in listed and "great-expectations" not in listed, listed

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "RECSYS_HOME": str(tmp_path / "home"),
        "RECSYS_AUTH_ENABLED": "false",
        "OPENBLAS_NUM_THREADS": "1",
    }
    # The full CLI is installed too; its pipeline commands say what is missing.
    retrain = subprocess.run(
        [venv / "bin" / "recsys", "retrain"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert retrain.returncode == 1 and "Traceback" not in retrain.stderr, retrain.stderr
    assert "pip install 'recsys[pipeline]'" in retrain.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    argv = [str(venv / "bin" / "recsys-serve"), "--port", str(port)]
    with started(argv, env, tmp_path, log) as proc:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: answers(url, proc, log), 180, "recsys-serve /healthz")


def test_recsys_ui_runs_from_a_non_editable_install(tmp_path: Path, wheel: Path) -> None:
    """The wheel goes into a fresh venv that borrows this venv's libraries (a .pth line:
    installing the whole lock again would take minutes and prove nothing more here)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", "--no-compile", "--no-deps", wheel])
    site = Path(
        run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    )
    (site / "_project_libraries.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = run([py, "-c", "import recsys_assets; print(recsys_assets.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel, not the checkout

    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "RECSYS_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
        "GX_ANALYTICS_ENABLED": "false",
    }
    log = tmp_path / "ui.log"
    argv = [str(venv / "bin" / "recsys"), "ui", "--port", str(port)]
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name "
    query += "locationOrLoadError { __typename } } } } }"

    def loaded() -> list[dict[str, object]] | None:
        if not answers(f"http://127.0.0.1:{port}/server_info", proc, log):
            return None
        reply = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10)
        entries = reply.json()["data"]["workspaceOrError"]["locationEntries"]
        done = all(e["locationOrLoadError"] for e in entries)
        return entries if entries and done else None

    with started(argv, env, tmp_path, log) as proc:
        entries = wait_for(loaded, 300, "the Dagster webserver with the recsys location")
    assert [(e["name"], e["locationOrLoadError"]["__typename"]) for e in entries] == [
        ("recsys", "RepositoryLocation")
    ], log.read_text()[-4000:]
    assert (tmp_path / "home" / "dagster" / "dagster.yaml").read_text() == (
        ROOT / "dagster.yaml"
    ).read_text()
