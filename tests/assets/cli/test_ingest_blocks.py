"""How a bulk ingest cuts files into blocks for its worker processes.

A plain file is cut into spans the workers read themselves; a .gz is inflated in
the ingest process into blocks of the full size (gzip inflates ~128 KiB a step);
a worker's answer travels with its ids as one string. The end-to-end equality of
pooled and serial ingests is in tests/serving/events/test_intake_fastpath.py.
"""

from __future__ import annotations

import gzip
import io
import pickle
import random
from pathlib import Path
from unittest import mock

import pytest

from recsys_assets import ingest
from recsys_serving.events.fastpath import Prevalidated


def _lines(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        pad = "x" * rng.choice([0, 1, 10, 200, 5_000])
        out.append(f'{{"k":{k},"pad":"{pad}"}}'.encode())
    return b"\n".join(out)


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("bom", [True, False])
@pytest.mark.parametrize("block", [64, 4_096, 1 << 20])
def test_spans_cover_the_file_in_whole_lines(
    tmp_path: Path, final_newline: bool, bom: bool, block: int
) -> None:
    body = _lines(400, block) + (b"\n" if final_newline else b"")
    path = tmp_path / "log.ndjson"
    path.write_bytes((ingest.UTF8_BOM if bom else b"") + body)
    with mock.patch.object(ingest, "READ_BLOCK", block), ingest._open(path) as fh:
        spans = list(ingest._spans(fh, str(path)))
        serial = list(ingest._whole_line_blocks(ingest._open(path)))
    blocks = [span.read() for span in spans]
    assert all(b.endswith(b"\n") for b in blocks)
    assert b"".join(blocks) == body + (b"" if final_newline else b"\n")
    assert b"".join(blocks) == b"".join(serial)
    # Cut near the block size, never inside a line: a span is longer than a block only
    # by the line that straddles it.
    assert all(len(s) <= block or s.read().count(b"\n") == 1 for s in spans)
    assert [s.start for s in spans] == sorted({s.start for s in spans})


def test_a_span_of_a_file_cut_shorter_meanwhile_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "log.ndjson"
    path.write_bytes(_lines(50, 1) + b"\n")
    with ingest._open(path) as fh:
        span = next(ingest._spans(fh, str(path)))
    path.write_bytes(b"{}\n")
    with pytest.raises(OSError, match="shrank"):
        span.read()


def test_a_span_follows_its_file_through_a_rotation(tmp_path: Path) -> None:
    """Log rotation renames the file and writes a new one under its name: a worker
    reads the file the ingest opened, never the new file's bytes at its offsets;
    where it cannot follow the file, that is a read error."""
    from dataclasses import replace

    path = tmp_path / "log.ndjson"
    path.write_bytes(_lines(50, 1) + b"\n")
    with ingest._open(path) as fh:
        span = next(ingest._spans(fh, str(path)))
        before = span.read()
        path.rename(tmp_path / "log.ndjson.1")
        path.write_bytes(_lines(60, 2) + b"\n")
        assert span.read() == before
        blind = replace(span, handle=str(tmp_path / "no-proc"))
        with pytest.raises(OSError, match="replaced"):
            blind.read()


def test_gzip_is_read_in_full_blocks_and_every_byte_before_a_cut() -> None:
    data = _lines(20_000, 7) + b"\n"
    packed = gzip.compress(data)
    block = 1 << 20
    with mock.patch.object(ingest, "READ_BLOCK", block):
        whole = list(ingest._ReadAhead(gzip.GzipFile(fileobj=io.BytesIO(packed))))
        assert b"".join(whole) == data
        assert all(len(b) >= block for b in whole[:-1]) and len(whole) == -(-len(data) // block)
        got: list[bytes] = []
        cut = gzip.GzipFile(fileobj=io.BytesIO(packed[: len(packed) * 2 // 3]))
        with pytest.raises(EOFError):
            got.extend(ingest._ReadAhead(cut))
    # What was inflated before the cut is handed over before the error.
    assert len(b"".join(got)) > len(data) // 2 and data.startswith(b"".join(got))


def test_a_workers_answer_round_trips_with_its_ids_joined() -> None:
    batch = Prevalidated(3, ["e1", "é2", "e3"], {"2026-01-02": b"x\n"})
    back = pickle.loads(pickle.dumps(batch, protocol=5))
    assert back == batch
    # One id string pickled, not one per id.
    ids = [f"e{k:09d}" for k in range(1_000)]
    assert "\n".join(ids).encode() in pickle.dumps(Prevalidated(1_000, ids, {}), protocol=5)
    odd = Prevalidated(2, ["a\nb", "c"], {})
    assert pickle.loads(pickle.dumps(odd)) == odd
    empty = Prevalidated(0, [], {})
    assert pickle.loads(pickle.dumps(empty)) == empty


@pytest.mark.parametrize("capacity", [0, 3, 7, 50])
def test_claiming_a_block_remembers_exactly_what_check_then_add_remembered(
    capacity: int,
) -> None:
    """RecentIds.claim (one set update, undone when an id was known) against the
    check-then-add it replaces in land_prevalidated, on random blocks with repeats."""
    from recsys_serving.events.intake import RecentIds

    rng = random.Random(capacity)
    claimed, checked = RecentIds(capacity), RecentIds(capacity)
    for _ in range(300):
        block = list(dict.fromkeys(str(rng.randrange(120)) for _ in range(rng.randint(1, 9))))
        fresh = checked.isdisjoint(block)
        assert claimed.claim(block) == fresh
        if fresh:
            if rng.random() < 0.1:  # the write failed: never remembered
                claimed.unclaim(block)
            else:
                checked.add_batch(block)
                claimed.add_batch(block, claimed=True)
        assert claimed._ids == checked._ids
        assert list(claimed._batches) == list(checked._batches)


def test_a_file_that_cannot_be_mapped_is_shipped_in_blocks(tmp_path: Path) -> None:
    """Some file systems refuse mmap: such a file is read here and its blocks sent to
    the workers, as a .gz is, instead of failing."""
    path = tmp_path / "log.ndjson"
    path.write_bytes(_lines(30, 3) + b"\n")
    with ingest._open(path) as fh:
        assert ingest._mappable(fh)
        with mock.patch.object(ingest.mmap, "mmap", side_effect=OSError("no mmap here")):
            assert not ingest._mappable(fh)


def test_an_unmappable_file_still_lands_every_event_through_the_workers(tmp_path: Path) -> None:
    import time

    import orjson

    from recsys_serving.events.intake import EventIntake
    from recsys_serving.lake import LocalLake
    from recsys_serving.settings import Settings

    now = time.time()
    events = [
        {"event_id": f"e{k}", "event_type": "view", "user_id": "u", "item_id": "i", "ts": now}
        for k in range(3_000)
    ]
    path = tmp_path / "log.ndjson"
    path.write_bytes(b"\n".join(map(orjson.dumps, events)) + b"\n")
    lake = LocalLake(tmp_path / "lake")
    intake = EventIntake(lake, Settings(), writer_id="w")
    with (
        mock.patch.object(ingest.mmap, "mmap", side_effect=OSError("no mmap here")),
        mock.patch.object(ingest, "READ_BLOCK", 16 << 10),
    ):
        report = ingest.ingest_files([path], intake, workers=2)
    assert report.result.accepted == 3_000 and not report.failed_files
    landed = b"".join(p.read_bytes() for p in sorted((tmp_path / "lake").rglob("*.ndjson")))
    assert landed.count(b"\n") == 3_000
