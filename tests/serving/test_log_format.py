"""One log format: every line a real ``recsys serve`` writes (its own, uvicorn's in each
worker, the access log, the app's structlog events, a standard-library warning) is JSON
with the same base keys; and what plain functions log during a Dagster run reaches the
run's event log, as ``context.log`` does."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import numpy as np
import pytest
import yaml
from monitoring_support import register_model, resources, write_feedback
from serve_process import ServeProcess, recsys_serve, stop

from recsys_assets.monitoring.assets import online_ctr
from recsys_assets.monitoring.snapshot import HEALTH_LATEST
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.logging import ACCESS_KEYS, BASE_KEYS
from recsys_serving.registry import ModelRegistry
from serving_support import wait_for

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"debug", "info", "warning", "error", "critical"}


def complete_lines(server: ServeProcess) -> list[str]:
    """The lines written so far, without a last line still being written."""
    text = server.output()
    return [line for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def records(server: ServeProcess) -> list[dict[str, Any]]:
    found = []
    for line in complete_lines(server):
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return found


def has(found: list[dict[str, Any]], logger: str, event: str) -> int:
    return sum(1 for r in found if r.get("logger") == logger and event in str(r.get("event")))


@pytest.mark.slow
def test_every_line_of_a_real_server_is_json_with_the_same_keys(tmp_path: Path) -> None:
    with recsys_serve(
        tmp_path,
        *("--workers", "2", "--log-level", "info", "--access-log"),
        env={"RECSYS_AUTH_ENABLED": "false"},
    ) as server:
        wait_for(
            lambda: has(records(server), "uvicorn.error", "Application startup complete") == 2,
            90,
            "both workers to start",
        )
        # No model is registered: the app answers 503 (and the access log says so).
        assert httpx.get(f"{server.url}/recommendations/u1", timeout=10).status_code == 503
        # A malformed request: uvicorn's parser refuses it and its stdlib logger warns.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400")
        wait_for(
            lambda: (
                (found := records(server))
                and has(found, "uvicorn.access", "/recommendations/u1")
                and has(found, "uvicorn.error", "Invalid HTTP request received")
            ),
            30,
            "the access line and the warning",
        )
        stop(server)  # the shutdown lines too
        assert server.proc.returncode == 0, server.output()[-3000:]

    found = records(server)
    assert len(found) == len(complete_lines(server)) == len(server.output().splitlines())
    for record in found:
        assert set(BASE_KEYS) <= set(record), record
        assert record["level"] in LEVELS, record
        assert datetime.fromisoformat(record["timestamp"]).utcoffset() == timedelta(0), record
        if record["logger"] == "uvicorn.access":
            assert set(record) == {*BASE_KEYS, *ACCESS_KEYS}, record
        elif record["logger"].startswith("uvicorn"):
            assert set(record) == set(BASE_KEYS), record  # nothing library-specific leaks

    # Every kind of line is there: the CLI's own, startup and shutdown of each worker,
    # the app's structlog events, the access log, the standard library's warning.
    assert has(found, "recsys_serving.cli", "serve.starting") == 1
    assert has(found, "uvicorn.error", "Started server process") == 2
    assert has(found, "recsys_serving.api.app", "service.started") == 2
    assert has(found, "recsys_serving.api.app", "service.stopped") == 2
    (access,) = [r for r in found if r.get("path") == "/recommendations/u1"]
    assert (access["method"], access["status_code"]) == ("GET", 503)
    (warning,) = [r for r in found if "Invalid HTTP request" in r["event"]]
    assert (warning["logger"], warning["level"]) == ("uvicorn.error", "warning")
    started = next(r for r in found if r["event"] == "service.started")
    assert started["lake"] and started["collector_only"] is False  # structlog fields kept


def run_log(tmp_path: Path, overrides: dict[str, Any]) -> list[tuple[int, str, str | None]]:
    """Materialize ``online_ctr`` with its health snapshot unreadable (its plain helper
    logs a structlog warning then) and return the run's event log."""
    lake = LocalLake(tmp_path / "lake")
    if not lake.exists(HEALTH_LATEST):
        registry = ModelRegistry(lake)
        version = register_model(registry, tmp_path, "v1")
        registry.set_alias(PRODUCTION, version, reason="test")
        start = datetime.now(UTC) - timedelta(minutes=20)
        write_feedback(lake, version, start, 20, 0.05, np.random.default_rng(0), per_minute=50)
    lake.put_bytes(HEALTH_LATEST, b"{not json")
    res = resources(lake, service_metrics_url="http://127.0.0.1:9/metrics")
    with dg.instance_for_test(overrides=overrides) as instance:
        result = dg.materialize([online_ctr], resources=res, instance=instance)
        assert result.success
        return [(e.level, e.user_message, e.step_key) for e in instance.all_logs(result.run_id)]


def test_plain_function_logs_reach_the_dagster_run_log(tmp_path: Path) -> None:
    # What code servers and run workers do when they load the code location.
    import recsys_assets.definitions  # noqa: F401

    python_logs = yaml.safe_load((ROOT / "dagster.yaml").read_text())["python_logs"]
    assert {"recsys_assets", "recsys_serving"} <= set(python_logs["managed_python_loggers"])

    entries = run_log(tmp_path, {"python_logs": python_logs})
    # The asset's own context.log line, and the structlog warning of the plain function
    # it calls (recsys_assets.monitoring.snapshot.record_health), with its fields.
    assert any(m.startswith("drop test:") and step == "online_ctr" for _, m, step in entries)
    (warning,) = [e for e in entries if "monitoring.health_latest_unreadable" in e[1]]
    level, message, step = warning
    assert (level, step) == (30, "online_ctr")
    assert "error=" in message and "{'event'" not in message

    # Without the dagster.yaml setting, the plain function's line is not in the run log.
    unmanaged = run_log(tmp_path, {})
    assert not [e for e in unmanaged if "monitoring.health_latest_unreadable" in e[1]]
    assert any(m.startswith("drop test:") for _, m, _ in unmanaged)
