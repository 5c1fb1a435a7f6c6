"""The demo's plumbing: its closed-loop environment really configures Settings (a typo
in a RECSYS_* name would be ignored silently), and `recsys demo --stop` ends the
processes a demo recorded, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

import recsys_assets.cli.demo as demo_module
from recsys_assets.cli import app
from recsys_assets.cli.demo import Background, loop_environment, stop_previous
from recsys_serving.settings import Settings, setting_fields
from support import free_port


def test_loop_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = loop_environment(18000)
    fields = {field.name for field in setting_fields()}
    # RECSYS_LOG_LEVEL is read by the logging setup, not by Settings.
    unknown = [
        k for k in env if k != "RECSYS_LOG_LEVEL" if k.removeprefix("RECSYS_").lower() not in fields
    ]
    assert unknown == []
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert list(settings.closed_loop.canary.ramp) == [0.25, 0.5, 1.0]
    assert (
        settings.closed_loop.drop.bucket_seconds == 10
        and settings.closed_loop.closed_loop_tick_seconds == 10
    )
    assert settings.closed_loop.service_metrics_url == "http://127.0.0.1:18000/metrics"
    assert settings.closed_loop.nightly_retrain_enabled is False
    assert settings.training.train_window_days == pytest.approx(0.01)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)", "recsys-demo-test"]
# What `dagster dev` does at start-up (dagster's setup_interrupt_handlers).
DAGSTER_LIKE = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT)); "
    "print('mapped', flush=True); time.sleep(120)",
    "recsys-demo-test",
]


def start_demo_process(tmp_path: Path, cmd: list[str]) -> subprocess.Popen[bytes]:
    """Started the way `recsys demo` starts its server and Dagster."""
    background = Background(tmp_path / "started.json")
    background.start("serve", cmd, dict(os.environ), tmp_path / "serve.log")
    return background.procs["serve"]


def test_stop_ends_recorded_demo_processes_only(tmp_path: Path) -> None:
    ours = start_demo_process(tmp_path, SLEEPER)
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    pid_file = tmp_path / "processes.json"
    try:
        records = [{"name": "serve", "pid": ours.pid}, {"name": "other", "pid": stranger.pid}]
        pid_file.write_bytes(orjson.dumps(records))
        assert stop_previous(pid_file) == 1
        assert ours.wait(timeout=10) is not None
        time.sleep(0.2)
        assert stranger.poll() is None  # its id is in the file, but it is not a demo process
        assert not pid_file.exists()
        assert stop_previous(pid_file) == 0
    finally:
        for proc in (ours, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_process_still_inside_execve_is_recognised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after Popen returns the kernel may still show an empty command line (the
    parent is woken before execve sets the new argument area); on a loaded CI machine
    that made `--stop` take a fresh demo process for a stranger."""
    ours = start_demo_process(tmp_path, SLEEPER)
    cmdline = f"/proc/{ours.pid}/cmdline"
    real_read_bytes = Path.read_bytes
    empty_reads = {"left": 3}

    def read_bytes(self: Path) -> bytes:
        if str(self) == cmdline and empty_reads["left"] > 0:
            empty_reads["left"] -= 1
            return b""  # what the kernel shows mid-execve
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    pid_file = tmp_path / "processes.json"
    try:
        pid_file.write_bytes(orjson.dumps([{"name": "serve", "pid": ours.pid}]))
        assert stop_previous(pid_file) == 1
        assert empty_reads["left"] == 0
        assert ours.wait(timeout=10) is not None
    finally:
        if ours.poll() is None:
            ours.kill()
            ours.wait()


def test_a_demo_started_from_a_background_shell_can_still_be_stopped(tmp_path: Path) -> None:
    """A shell running `make demo &` (or a CI runner) ignores SIGINT, ignored signals
    survive exec, and `dagster dev` gives SIGTERM SIGINT's disposition: its processes
    used to ignore SIGTERM, so `--stop` left the whole Dagster tree running."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ours = start_demo_process(tmp_path, DAGSTER_LIKE)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    pid_file = tmp_path / "processes.json"
    try:
        # Once it has mapped SIGTERM (a SIGTERM before that would prove nothing).
        log, deadline = tmp_path / "serve.log", time.monotonic() + 30
        while b"mapped" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"mapped" in log.read_bytes()
        pid_file.write_bytes(orjson.dumps([{"name": "dagster", "pid": ours.pid}]))
        assert stop_previous(pid_file) == 1
        # SIGTERM ran the mapped SIGINT handler: KeyboardInterrupt, reported as SIGINT.
        assert ours.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGINT)
    finally:
        if ours.poll() is None:
            ours.kill()
            ours.wait()


def test_drift_after_beyond_max_live_is_a_usage_error_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["demo", "--drift-after", "600", "--max-live", "300"])
    assert result.exit_code == 2, result.output
    assert "--drift-after" in result.output and "--no-drift" in result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not a ValueError
    assert not (tmp_path / "home").exists()  # refused before any set-up


def test_no_drift_runs_the_live_phase_without_a_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-drift (how false retrains are measured) hands the live phase no drift time,
    whatever --drift-after says."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    seen: dict[str, object] = {}

    def live(*args: object) -> str:
        seen["drift_at"], seen["max_live"] = args[-2], args[-1]
        return "live outcome"

    monkeypatch.setattr(demo_module, "_build", lambda *a: ("v1", "lake"))
    monkeypatch.setattr(demo_module, "_start_services", lambda *a: "key")
    monkeypatch.setattr(demo_module, "_live", live)
    monkeypatch.setattr(demo_module, "_report", lambda *a: True)
    monkeypatch.setattr(demo_module.Background, "stop", lambda self: None)
    ports = ["--port", str(free_port()), "--ui-port", str(free_port())]
    result = CliRunner().invoke(
        app,
        ["demo", "--no-drift", "--drift-after", "9999", "--max-live", "60", *ports],
    )
    assert result.exit_code == 0, result.output
    assert seen == {"drift_at": None, "max_live": 60.0}


def test_no_drift_verdict_counts_only_the_drop_sensors_retrainings() -> None:
    from recsys_assets.cli.demo import no_drift_verdict
    from recsys_assets.report import RetrainRun

    at = datetime(2026, 12, 1, tzinfo=UTC)
    nightly = RetrainRun("n1", at, at, "SUCCESS", "nightly")
    ok, line = no_drift_verdict([nightly], False, [], 8.0)
    assert ok and line.startswith("demo without drift: 0 false retraining(s)")
    assert "in 8.0 min of live traffic; production unchanged (decisions: none)" in line
    dropped = RetrainRun("d1", at, None, "STARTED", "ctr_drop")
    ok, line = no_drift_verdict([nightly, dropped], False, ["retrain"], 8.0)
    assert not ok and "1 false retraining(s) launched by ctr_drop_sensor" in line
    ok, line = no_drift_verdict([], True, ["promote"], 8.0)
    assert not ok and "production changed (decisions: promote)" in line
