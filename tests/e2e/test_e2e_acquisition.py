"""End to end with real processes: collector over HTTP -> landing -> Dagster daemon sensor
-> weblogs run -> Parquet partition in the lake, on the project's own workspace.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from recsys_serving.lake import LocalLake, read_parquet
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_collector_to_daemon_sensor_to_weblogs_partition(tmp_path: Path) -> None:
    home = tmp_path / "home"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "RECSYS_LANDING_SEGMENT_MAX_AGE_SECONDS": "1",
        "RECSYS_LOG_LEVEL": "WARNING",
    }
    env.pop("RECSYS_LAKE_URI", None)
    port = free_port()
    procs = [
        subprocess.Popen(
            [str(BIN / "recsys"), "collector", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "collector")
        now = time.time()
        body = b"\n".join(
            orjson.dumps(
                {
                    "event_id": f"e{i}",
                    "event_type": "impression" if i % 5 else "click",
                    "user_id": f"u{i % 11}",
                    "item_id": f"i{i % 17}",
                    "ts": now - 600 + i,
                    "request_id": f"r{i // 5}",
                    "position": i % 5,
                }
            )
            for i in range(300)
        )
        resp = httpx.post(
            f"{base}/events",
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
            timeout=10,
        )
        assert resp.status_code == 202 and resp.json()["accepted"] == 300
        # Near midnight the events span two dates; each becomes a partition.
        days = {time.strftime("%Y-%m-%d", time.gmtime(now - 600 + i)) for i in (0, 299)}
        lake = LocalLake(home / "lake")
        keys = [f"weblogs/date={day}/part-0.parquet" for day in sorted(days)]
        wait_for(lambda: all(lake.exists(k) for k in keys), 240, "the sensor-launched run")
        assert sum(read_parquet(lake, k).height for k in keys) == 300
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
