"""Crash recovery without a daemon: a writer killed with SIGKILL leaves a segment open in
``landing/_open``; the next ``recsys ingest`` / ``process`` / ``status`` seals it (and
processes it), while a live writer's segment is never touched, however old it looks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_serving.lake import LocalLake, read_parquet

runner = CliRunner()
T = time.time() - 2 * 86_400

WRITER = """
import sys
import orjson
from recsys_serving.events.intake import EventIntake, RawEvent
from recsys_serving.lake import open_lake
from recsys_serving.settings import Settings

settings = Settings()
lake = open_lake(
    settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
)
intake = EventIntake(lake, settings, writer_id=sys.argv[1])
events = [
    RawEvent(f"{sys.argv[1]}:{i}", orjson.dumps({
        "event_id": f"{sys.argv[1]}-{i}", "event_type": "view", "user_id": f"u{i % 3}",
        "item_id": "i", "ts": float(sys.argv[3]) + i,
    }))
    for i in range(int(sys.argv[2]))
]
result = intake.submit(events, source="test")
print(f"appended {result.accepted}", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
intake.close()
print("closed", flush=True)
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    yield tmp_path / "home"


def start_writer(home: Path, name: str, n: int) -> subprocess.Popen[str]:
    """A real writer process, returned once it has said its events are durable."""
    env = {**os.environ, "RECSYS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, name, str(n), str(T)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == f"appended {n}"
    return proc


def open_segments(home: Path) -> list[Path]:
    return sorted((home / "lake" / "landing" / "_open").rglob("*.ndjson"))


def age(paths: list[Path], seconds: float = 3600) -> None:
    """Make segments look idle for longer than a writer's lifetime (no sleeping)."""
    old = time.time() - seconds
    for path in paths:
        os.utime(path, (old, old))


def weblog_ids(home: Path) -> set[str]:
    lake = LocalLake(home / "lake")
    ids: set[str] = set()
    for obj in lake.list("weblogs/"):
        if obj.key.endswith(".parquet"):
            ids |= set(read_parquet(lake, obj.key, ["event_id"])["event_id"].to_list())
    return ids


def log_file(path: Path, prefix: str, n: int) -> Path:
    lines = [
        orjson.dumps(
            {
                "event_id": f"{prefix}-{i}",
                "event_type": "view",
                "user_id": "u1",
                "item_id": "i",
                "ts": T + i,
            }
        )
        for i in range(n)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_killed_writers_segment_is_sealed_and_processed_by_the_next_ingest(
    home: Path, tmp_path: Path
) -> None:
    proc = start_writer(home, "killed", 40)
    proc.kill()  # SIGKILL: no close, no seal, no cleanup
    proc.wait(timeout=30)
    (segment,) = open_segments(home)
    age([segment])

    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    # status seals it (and counts what is still open: nothing now).
    assert "sealed 1 segment(s) left open by a crashed writer" in status.output
    assert "open segments: 0 " in status.output
    assert open_segments(home) == []

    # A second crash, found by ingest this time: sealed, then processed with the new file.
    proc = start_writer(home, "killed2", 25)
    proc.kill()
    proc.wait(timeout=30)
    age(open_segments(home))
    result = runner.invoke(app, ["ingest", str(log_file(tmp_path / "new.ndjson", "new", 10))])
    assert result.exit_code == 0, result.output
    assert "sealed 1 segment(s) left open by a crashed writer" in result.output
    ids = weblog_ids(home)
    assert {f"killed-{i}" for i in range(40)} <= ids
    assert {f"killed2-{i}" for i in range(25)} <= ids
    assert {f"new-{i}" for i in range(10)} <= ids
    assert len(ids) == 75


def test_a_live_writers_segment_is_left_alone_until_it_seals_it(home: Path, tmp_path: Path) -> None:
    proc = start_writer(home, "alive", 30)
    try:
        (segment,) = open_segments(home)
        age([segment])  # idle for an hour, but its writer still holds the lock
        before = os.stat(segment)
        result = runner.invoke(app, ["ingest", str(log_file(tmp_path / "a.ndjson", "a", 5))])
        assert result.exit_code == 0, result.output
        assert "left open by a crashed writer" not in result.output
        status = runner.invoke(app, ["status"])
        assert "open segments: 1 " in status.output and "1 held by a live writer" in status.output
        assert open_segments(home) == [segment]
        after = os.stat(segment)
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
        assert not any(i.startswith("alive-") for i in weblog_ids(home))

        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the writer finishes normally: it seals its own segment
        assert proc.stdout.readline().strip() == "closed"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert open_segments(home) == []
    result = runner.invoke(app, ["process"])
    assert result.exit_code == 0, result.output
    assert {f"alive-{i}" for i in range(30)} <= weblog_ids(home)
