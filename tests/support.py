"""Helpers and real-server fixtures for the acquisition tests (imported by test modules)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from recsys_serving.events.intake import EventIntake, RawEvent
from recsys_serving.lake import Lake, LocalLake
from recsys_serving.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """A real S3-compatible HTTP endpoint (moto_server) in its own process on loopback."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = S3Server(url, "recsys-lake")
    server.client().create_bucket(Bucket=server.bucket)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def event(i: int | str, ts: float, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "event_type": "impression",
        "user_id": f"u{int(str(i).strip('e') or 0) % 7 if str(i).isdigit() else 1}",
        "item_id": "i1",
        "ts": ts,
        **extra,
    }


def land(lake: Lake, events: list[dict[str, Any]], settings: Settings | None = None) -> Any:
    """Land events through the real intake (a fresh writer, as another process would)."""
    intake = EventIntake(lake, settings or Settings(home=Path("/nonexistent")))
    try:
        return intake.submit(
            [RawEvent(f"line {n}", orjson.dumps(e)) for n, e in enumerate(events, 1)], "test"
        )
    finally:
        intake.close()


def local_lake(tmp_path: Path) -> LocalLake:
    return LocalLake(tmp_path / "lake")


def ndjson_lines(lake: Lake, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for obj in lake.list(prefix):
        if "/_open/" in obj.key or not obj.key.endswith(".ndjson"):
            continue
        rows += [orjson.loads(line) for line in lake.get_bytes(obj.key).splitlines() if line]
    return rows
