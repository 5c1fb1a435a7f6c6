"""``GzipReader``: ISA-L inflation with exactly gzip's answer on every file, healthy
or damaged (what lands before a cut, and the error reported)."""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import pytest

from recsys_assets import ingest
from recsys_assets.ingest import GzipReader

random.seed(13)
PAYLOAD = b"".join(
    b'{"event_id":"e%d","pad":"%s"}\n' % (i, random.randbytes(12).hex().encode())
    for i in range(60_000)
)
FIRST = gzip.compress(PAYLOAD[: len(PAYLOAD) // 3])
SECOND = gzip.compress(PAYLOAD[len(PAYLOAD) // 3 :])
BOTH = FIRST + SECOND


def _read_all(fh: io.IOBase, step: int) -> tuple[bytes, str | None]:
    """Everything handed over before the stream ended or failed, and the error."""
    parts: list[bytes] = []
    try:
        while data := fh.read1(step):  # type: ignore[attr-defined]
            parts.append(data)
    except Exception as exc:  # zlib.error too: the same error, whatever it is
        return b"".join(parts), f"{type(exc).__name__}: {exc}"
    return b"".join(parts), None


CASES = {
    "one member": gzip.compress(PAYLOAD),
    "concatenated members": BOTH,
    "empty file": b"",
    "trailing zeros": FIRST + b"\0" * 64,
    "garbage after a member": FIRST + b"not gzip at all",
    "not gzip": b"hello, world\n",
    "corrupt deflate data": FIRST[:200] + bytes(b ^ 0x55 for b in FIRST[200:260]) + FIRST[260:],
    "bad crc": FIRST[:-8] + bytes(4) + FIRST[-4:],
    **{f"cut at {cut}": BOTH[:cut] for cut in (5, 100, 5_000, len(FIRST) - 3, len(FIRST) + 40)},
    "cut in the second member": BOTH[: len(FIRST) + len(SECOND) // 2],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("step", [1 << 20, 7_000])
def test_every_file_reads_as_gzip_reads_it(name: str, step: int) -> None:
    data = CASES[name]
    expected = _read_all(gzip.GzipFile(fileobj=io.BytesIO(data)), step)
    with GzipReader(io.BytesIO(data)) as fh:  # type: ignore[arg-type]
        assert _read_all(fh, step) == expected


def test_the_ingest_opens_gz_with_it_past_a_byte_order_mark(tmp_path: Path) -> None:
    for prefix in (b"", b"\xef\xbb\xbf"):  # without one, the reader is rewound
        path = tmp_path / "log.ndjson.gz"
        path.write_bytes(gzip.compress(prefix + PAYLOAD))
        with ingest._open(path) as fh:
            assert isinstance(fh, GzipReader)
            assert fh.read(10) == PAYLOAD[:10]
            assert fh.read() == PAYLOAD[10:]
            assert fh.read(5) == b""


def test_a_cut_file_hands_over_what_gzip_does_then_its_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(BOTH[: len(FIRST) + len(SECOND) // 2])
    with gzip.open(cut) as ref:
        expected, error = _read_all(ref, 1 << 16)
    assert error is not None and len(expected) > len(PAYLOAD) // 3
    blocks: list[bytes] = []
    with ingest._open(cut) as fh, pytest.raises(EOFError):
        for block in ingest._ReadAhead(fh):
            blocks.append(block)
    assert b"".join(blocks) == expected
