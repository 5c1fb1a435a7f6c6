"""Durable landing segments: append + fsync, sealing, orphan recovery."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from recsys_serving import landing
from recsys_serving.lake import LocalLake
from recsys_serving.landing import (
    SegmentWriter,
    iter_lines,
    list_open,
    list_sealed,
    parse_sealed_key,
    recover_orphans,
)
from recsys_serving.layout import LANDING_AREA
from support import ndjson_lines


def test_append_is_visible_on_disk_before_sealing(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, writer_id="w1")
    w.append({"2026-11-01": b'{"a":1}\n', "2026-11-02": b'{"a":2}\n'})
    w.append({"2026-11-01": b'{"a":3}\n'})
    open_files = sorted((tmp_path / "landing" / "_open").rglob("*.ndjson"))
    assert [f.read_bytes() for f in open_files] == [b'{"a":1}\n{"a":3}\n', b'{"a":2}\n']
    assert list_sealed(lake) == []
    w.close()
    sealed = list_sealed(lake)
    assert [f.date for f in sealed] == ["2026-11-01", "2026-11-02"]
    assert not list((tmp_path / "landing" / "_open").rglob("*.ndjson"))


def test_segments_roll_by_size_and_sealed_files_are_never_rewritten(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, writer_id="w1", max_bytes=100)
    for i in range(10):
        w.append({"2026-11-01": orjson.dumps({"i": i, "pad": "x" * 30}) + b"\n"})
    w.close()
    sealed = list_sealed(lake)
    assert len(sealed) >= 4
    assert [f.seal_ns for f in sealed] == sorted(f.seal_ns for f in sealed)
    assert [r["i"] for r in ndjson_lines(lake, "landing/")] == list(range(10))


def test_idle_segments_seal_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # a clock the test moves, so a slow fsync cannot age the segment
    monkeypatch.setattr(landing.time, "monotonic", lambda: clock[0])
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, max_age_seconds=5)
    w.append({"2026-11-01": b"{}\n"})
    clock[0] += 4.9
    assert w.seal_expired() == 0
    clock[0] += 0.2
    assert w.seal_expired() == 1
    assert len(list_sealed(lake)) == 1


def test_orphaned_segment_is_sealed_and_its_unacknowledged_tail_quarantined(
    tmp_path: Path,
) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, writer_id="crashed")
    w.append({"2026-11-01": b'{"event_id":"a"}\n'})
    seg = next((tmp_path / "landing" / "_open").rglob("*.ndjson"))
    for open_segment in w._open.values():  # the writer dies: the kernel drops its lock
        os.close(open_segment.fd)
    with seg.open("ab") as fh:  # a crash in the middle of the next write
        fh.write(b'{"event_id":"b","ev')
    old = time.time() - 3600
    os.utime(seg, (old, old))
    assert recover_orphans(lake, LANDING_AREA, older_than_seconds=60)
    assert [r["event_id"] for r in ndjson_lines(lake, "landing/")] == ["a"]
    tail = ndjson_lines(lake, "quarantine/intake/")
    assert tail[0]["raw"] == '{"event_id":"b","ev' and tail[0]["code"] == "partial_write"


def test_recent_open_segments_are_left_alone(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA)
    w.append({"2026-11-01": b"{}\n"})
    assert recover_orphans(lake, LANDING_AREA, older_than_seconds=600) == []
    w.close()
    assert len(list_sealed(lake)) == 1


def test_an_idle_live_writers_segment_is_never_taken_however_old(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, writer_id="idle", max_age_seconds=3600)
    w.append({"2026-11-01": b'{"event_id":"a"}\n'})
    seg = next((tmp_path / "landing" / "_open").rglob("*.ndjson"))
    old = time.time() - 3600
    os.utime(seg, (old, old))
    assert recover_orphans(lake, LANDING_AREA, older_than_seconds=0) == []
    (found,) = list_open(lake, LANDING_AREA)
    assert found.live and found.path == seg and found.age_seconds >= 3590
    # The probe let go of the lock: the writer appends and seals as usual.
    w.append({"2026-11-01": b'{"event_id":"b"}\n'})
    w.close()
    assert [r["event_id"] for r in ndjson_lines(lake, "landing/")] == ["a", "b"]
    assert list_open(lake, LANDING_AREA) == []


def test_a_dead_writers_segment_is_listed_as_orphaned(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    w = SegmentWriter(lake, LANDING_AREA, writer_id="dead")
    w.append({"2026-11-01": b'{"event_id":"a"}\n'})
    for open_segment in w._open.values():
        os.close(open_segment.fd)
    (found,) = list_open(lake, LANDING_AREA)
    assert not found.live and found.size == len(b'{"event_id":"a"}\n')
    # Younger than the orphan age: left for later, even without a lock.
    assert recover_orphans(lake, LANDING_AREA, older_than_seconds=600) == []
    assert len(recover_orphans(lake, LANDING_AREA, older_than_seconds=0)) == 1
    assert [r["event_id"] for r in ndjson_lines(lake, "landing/")] == ["a"]


def test_sealed_key_format() -> None:
    f = parse_sealed_key("landing/date=2026-11-01/1795600800000000000-host.1.abc-000001.ndjson")
    assert f is not None and f.date == "2026-11-01" and f.seal_ns == 1795600800000000000
    assert parse_sealed_key("landing/_open/date=2026-11-01/x-000001.ndjson") is None
    assert (
        parse_sealed_key("quarantine/intake/date=2026-11-01/1795600800000000000-a.ndjson") is None
    )


def test_iter_lines_numbers_lines_and_keeps_a_final_unterminated_line() -> None:
    assert list(iter_lines(b"a\r\nb\n\nc")) == [(1, b"a"), (2, b"b"), (3, b""), (4, b"c")]
