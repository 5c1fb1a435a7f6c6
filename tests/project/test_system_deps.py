"""scripts/system-deps.sh, which `make test` and .ci/run share: it installs the Debian
packages the tests need when root, and otherwise names them and stops.

Run against fake ``dpkg-query``, ``id``, ``sudo`` and ``apt-get`` first in PATH, so no
test ever installs anything or depends on what this machine has."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system-deps.sh"
BASH = "/bin/bash"


def fake_bin(
    tmp_path: Path, *, uid: int, missing: list[str], sudo: bool, dpkg: bool = True
) -> Path:
    """A PATH directory whose tools log their calls to ``calls.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    tools = {
        "id": f'[ "$1" = -u ] && echo {uid}',
        "apt-get": f'echo "apt-get $*" >> {log}',
        # Passwordless sudo runs the command; without it, `sudo -n` fails as it would.
        "sudo": (
            f'echo "sudo $*" >> {log}; [ "$1" = -n ] && shift; exec "$@"' if sudo else "exit 1"
        ),
    }
    if dpkg:
        wanted = " ".join(missing)
        tools["dpkg-query"] = (
            'for p in "$@"; do pkg="$p"; done; '
            f'case " {wanted} " in *" $pkg "*) exit 1;; esac; printf installed'
        )
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def run(tmp_path: Path, bin_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if not (bin_dir / "dpkg-query").exists():
        env["PATH"] = str(bin_dir)  # no dpkg-query anywhere: not a Debian machine
    proc = subprocess.run(
        [BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )
    log = tmp_path / "calls.log"
    return proc, log.read_text().splitlines() if log.exists() else []


def test_all_installed_is_a_silent_no_op(tmp_path: Path) -> None:
    proc, calls = run(tmp_path, fake_bin(tmp_path, uid=1000, missing=[], sudo=False))
    assert (proc.returncode, proc.stdout, proc.stderr, calls) == (0, "", "", [])


def test_not_root_names_the_missing_packages_and_the_command_then_fails(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, uid=1000, missing=["postgresql", "chromium"], sudo=False)
    proc, calls = run(tmp_path, bin_dir)
    assert proc.returncode == 1
    assert calls == []  # nothing attempted
    assert "not installed: postgresql chromium" in proc.stderr
    assert (
        "sudo sh -c 'apt-get update && apt-get install -y --no-install-recommends "
        "postgresql chromium'" in proc.stderr
    )


def test_root_updates_then_installs_only_the_missing_packages(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, uid=0, missing=["docker-registry", "prometheus"], sudo=False)
    proc, calls = run(tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus docker-registry",
    ]
    assert "installing prometheus docker-registry" in proc.stdout


def test_passwordless_sudo_installs_through_sudo(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, uid=1000, missing=["chromium-driver"], sudo=True)
    proc, calls = run(tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if c.startswith("apt-get")] == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends chromium-driver",
    ]
    assert any(c.startswith("sudo -n env DEBIAN_FRONTEND=noninteractive apt-get") for c in calls)


@pytest.mark.parametrize("uid", [0, 1000])
def test_check_reports_and_never_installs(tmp_path: Path, uid: int) -> None:
    bin_dir = fake_bin(tmp_path, uid=uid, missing=["fonts-liberation"], sudo=True)
    proc, calls = run(tmp_path, bin_dir, "--check")
    assert proc.returncode == 1 and calls == []
    assert "missing Debian packages: fonts-liberation" in proc.stderr


def test_without_dpkg_it_names_what_to_install_and_fails(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, uid=0, missing=[], sudo=False, dpkg=False)
    proc, calls = run(tmp_path, bin_dir)
    assert proc.returncode == 1 and calls == []
    assert "no dpkg-query" in proc.stderr and "postgresql" in proc.stderr


def test_make_test_and_ci_run_use_the_script() -> None:
    """One list of packages: neither entry point keeps its own apt logic."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/system-deps.sh" in recipe.splitlines()[1]  # before ruff and pytest
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/system-deps.sh" in ci and "apt-get" not in ci
    assert ci.index("bash scripts/system-deps.sh") < ci.index("\nmake test")
    assert os.access(SCRIPT, os.X_OK)
