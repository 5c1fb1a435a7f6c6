"""Ingest NDJSON/JSON log files through the same intake as the collector.

This is the path for backfills of old logs and for teams that ship logs with
their own agent. Files are streamed (bounded memory); every line is accounted
for, and errors name the file and line.

A large NDJSON file is validated on every core: its blocks of whole lines go to
worker processes (``fastpath.prevalidate``: the compiled validator and the routing
by date, no lake), and this process lands their output in file order, after the
duplicate check, so what lands is what one process would land. A block the fast
path does not wholly accept (a rejected line, a blank line, a repeated id) is
submitted here line by line through the intake, as every block was before, and
gets the same reasons and quarantine. The bytes a worker validated for landing
come back through shared memory (:class:`_Slots`), not pickled through a pipe.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import mmap
import multiprocessing
import os
import queue
import select
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import ijson
import numpy as np
import orjson
from isal import igzip

from recsys_serving.events import fastpath
from recsys_serving.events.intake import EventIntake, IntakeResult, RawEvent
from recsys_serving.machine import usable_cores
from recsys_serving.settings import Settings

BATCH = 5_000
# Blocks of 1 MiB: a worker validates them ~13% cheaper per event than 4 MiB ones
# (what it touches stays in cache), and the per-block costs here (a round trip, the
# duplicate check, a write) stay small beside ~5,000 events each.
READ_BLOCK = 1 << 20
WHOLE_FILE_JSON_LIMIT = 256 * 1024 * 1024
# Windows tools (PowerShell's Out-File, Notepad, Excel's "UTF-8" export) start a file
# with one; JSON parsers refuse it, which cost the first event of an NDJSON file and
# turned a whole JSON array file into one rejected line.
UTF8_BOM = b"\xef\xbb\xbf"
# Worker processes take ~0.5 s to start: below this many bytes of NDJSON (a .gz
# counts as 8 times its size) one process validates the file.
PARALLEL_MIN_BYTES = 64 << 20
# A .gz file inflates to roughly this many times its size (for the threshold above).
GZIP_RATIO_GUESS = 8


class IngestFileError(Exception):
    """A file that could not be read as events at all (the message names file and line)."""


@dataclass
class IngestReport:
    result: IntakeResult = field(default_factory=IntakeResult)
    files: int = 0
    failed_files: list[str] = field(default_factory=list)
    # Files that held events but landed none of them (each message names the file).
    rejected_files: list[str] = field(default_factory=list)


class GzipReader(io.RawIOBase):
    """A gzip file's inflated bytes, as :class:`gzip.GzipFile` gives them, inflated by
    ISA-L (``isal.igzip``, ~5x less CPU than zlib: a 10M-event .gz cost the ingest
    process ~4 CPU s of inflation).

    igzip hands over less of a damaged file than gzip does (a stream cut by a crash,
    garbage after a member: it stops up to ~50 KiB earlier, and may name another
    error), so at the first error the rest is read by :mod:`gzip` itself, from the
    same point of the inflated stream: every byte gzip would give comes out, then
    gzip's own error. A healthy file never touches zlib.
    """

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._fast: BinaryIO | None = igzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        self._slow: gzip.GzipFile | None = None
        self._pos = 0  # inflated bytes handed over

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Back to the start only (what reading past a byte order mark needs)."""
        if offset != 0 or whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a gzip file is only rewound")
        self._close_readers()
        self._raw.seek(0)
        self._fast, self._pos = igzip.GzipFile(fileobj=self._raw), 0  # type: ignore[assignment]
        return 0

    def tell(self) -> int:
        return self._pos

    def read1(self, size: int = -1) -> bytes:
        size = size if size is not None and size >= 0 else io.DEFAULT_BUFFER_SIZE * 16
        if self._fast is not None:
            try:
                data = self._fast.read1(size)
            except Exception:  # gzip says what is wrong, below
                self._to_gzip()
                return self.read1(size)
        else:
            assert self._slow is not None
            data = self._slow.read1(size)
        self._pos += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while data := self.read1():
                parts.append(data)
            return b"".join(parts)
        parts, got = [], 0
        while got < size and (data := self.read1(size - got)):
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        data = self.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _to_gzip(self) -> None:
        """Go on with gzip from where igzip stopped (inflating the start again)."""
        self._close_readers()
        self._raw.seek(0)
        slow = gzip.GzipFile(fileobj=self._raw)
        left = self._pos
        while left:  # gzip inflates at least what igzip did: no error before here
            skipped = slow.read(min(left, READ_BLOCK))
            if not skipped:
                raise EOFError("the gzip stream ended before the point already read")
            left -= len(skipped)
        self._slow = slow

    def _close_readers(self) -> None:
        for reader in (self._fast, self._slow):
            if reader is not None:
                reader.close()
        self._fast = self._slow = None

    def close(self) -> None:
        if not self.closed:
            try:
                self._close_readers()
            finally:
                self._raw.close()
        super().close()


def _open(path: Path) -> BinaryIO:
    """The file's bytes (decompressed), past a leading UTF-8 byte order mark."""
    raw = path.open("rb")
    fh: BinaryIO = GzipReader(raw) if path.suffix == ".gz" else raw  # type: ignore[assignment]
    try:
        if fh.read(len(UTF8_BOM)) != UTF8_BOM:
            fh.seek(0)
    except BaseException:
        fh.close()
        raw.close()
        raise
    return fh


def _first_byte(path: Path) -> bytes:
    with _open(path) as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


class _ReadAhead:
    """A file's blocks, read (and decompressed) by a thread one step ahead.

    zlib and file reads release the GIL, so a ``.gz`` is inflated on the other core
    while this one validates. A read error (a gzip stream cut by a crash) comes out
    after every block read before it, where a line iterator would raise it.
    """

    _END = object()

    def __init__(self, fh: BinaryIO, block: int | None = None, depth: int = 4) -> None:
        self._fh = fh
        self._block = block or READ_BLOCK
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-read", daemon=True)

    def _run(self) -> None:
        # read1: one decompression step at most, so a stream cut short still hands
        # over everything inflated before the cut. A step of gzip inflates ~128 KiB
        # (about 600 events), so steps are gathered into blocks of the full size, as
        # a plain file's: each block costs the consumer a round trip to a worker and
        # a duplicate check.
        read = getattr(self._fh, "read1", self._fh.read)
        parts: list[bytes] = []
        size = 0
        try:
            while not self._stop.is_set():
                data = read(self._block - size)
                if not data:
                    break
                parts.append(data)
                size += len(data)
                if size >= self._block:
                    self._queue.put(parts[0] if len(parts) == 1 else b"".join(parts))
                    parts, size = [], 0
            if parts:
                self._queue.put(b"".join(parts))
            self._queue.put(self._END)
        except BaseException as exc:  # handed to the reading side, raised there
            if parts:
                self._queue.put(b"".join(parts))
            self._queue.put(exc)

    def __iter__(self) -> Iterator[bytes]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            # Stopped early (or done): free a blocked put, then wait for the thread,
            # so the file is never closed under it.
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)


def _ndjson_batches(fh: BinaryIO, size: int = BATCH) -> Iterator[tuple[list[bytes], list[int]]]:
    """Non-blank lines (trailing CRs removed) with their 1-based line numbers, ``size``
    per batch; split in bulk, never a Python step per byte or per blank check.

    A read error is raised after the batch of whole lines read before it.
    """
    lines: list[bytes] = []
    numbers: list[int] = []
    carry = b""
    line_no = 0
    try:
        for block in _ReadAhead(fh):
            data = carry + block if carry else block
            parts = data.split(b"\n")
            carry = parts.pop()
            _add_lines(parts, data, carry, line_no, lines, numbers)
            line_no += len(parts)
            while len(lines) >= size:
                yield lines[:size], numbers[:size]
                del lines[:size], numbers[:size]
        if carry:
            _add_lines([carry], carry + b"\n", b"", line_no, lines, numbers)
    except (OSError, EOFError):
        # The events read before a file turned out broken (a gzip stream cut by a
        # crash) are still submitted, then the error is reported.
        if lines:
            yield lines, numbers
        raise
    if lines:
        yield lines, numbers


def _add_lines(
    parts: list[bytes], data: bytes, carry: bytes, line_no: int, lines: list, numbers: list
) -> None:
    """Append ``parts`` (the whole lines of ``data``, numbered from ``line_no + 1``)."""
    if b"\r" in data:
        parts = [p.rstrip(b"\r") for p in parts]
    # Every line starting with "{" (the usual case) means no blank line to skip.
    starts = data.count(b"\n{") + (data[:1] == b"{") - (carry[:1] == b"{")
    if starts == len(parts):
        lines.extend(parts)
        numbers.extend(range(line_no + 1, line_no + 1 + len(parts)))
        return
    for k, raw in enumerate(parts, line_no + 1):
        if raw.strip():
            lines.append(raw)
            numbers.append(k)


def _json_array_events(path: Path, name: str) -> Iterator[RawEvent]:
    # A .gz array that fits is parsed whole too: streamed, a value the streaming parser
    # refuses (NaN, 1e400) stops the file there, and the items after it go unaccounted.
    data: bytes | None = None
    if path.suffix == ".gz":
        try:
            with _open(path) as fh:
                data = fh.read(WHOLE_FILE_JSON_LIMIT + 1)
        except (OSError, EOFError):
            data = None  # a cut or corrupt stream: streamed, what precedes the damage lands
        if data is not None and len(data) > WHOLE_FILE_JSON_LIMIT:
            data = None
    elif path.stat().st_size <= WHOLE_FILE_JSON_LIMIT:
        data = path.read_bytes().removeprefix(UTF8_BOM)
    if data is not None:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            parsed = _lenient_loads(data)
            if parsed is _TOO_DEEP:
                # One item nested past the parsers' limits: the streaming parser has
                # none, so every other item still lands and that one is refused.
                del data
                yield from _stream_array_events(path, name)
                return
            if parsed is _MALFORMED:
                line = data.count(b"\n", 0, exc.pos) + 1
                col = exc.pos - (data.rfind(b"\n", 0, exc.pos) + 1) + 1
                raise IngestFileError(
                    f"{name}:{line}:{col}: malformed JSON ({str(exc).split(':')[0]}); "
                    "nothing from this file was ingested"
                ) from exc
        items = parsed if isinstance(parsed, list) else [parsed]
        for i, item in enumerate(items):
            yield RawEvent(f"{name}:item {i}", b"", parsed=item)
        return
    yield from _stream_array_events(path, name)


_TOO_DEEP = object()
_MALFORMED = object()


def _lenient_loads(data: bytes) -> object:
    """What orjson refuses in valid JSON (a number past float range, a lone surrogate
    escape, nesting past 1024 levels) is one item's problem, not the file's: the
    standard parser reads them, and the intake then refuses just those items."""
    try:
        return json.loads(data)
    except RecursionError:
        return _TOO_DEEP
    except ValueError:
        return _MALFORMED


def _stream_array_events(path: Path, name: str) -> Iterator[RawEvent]:
    with _open(path) as fh:
        i = -1
        try:
            for i, item in enumerate(ijson.items(fh, "item", use_float=True)):
                yield RawEvent(f"{name}:item {i}", b"", parsed=item)
        except ijson.JSONError as exc:
            raise IngestFileError(
                f"{name}: malformed JSON after item {i} ({exc}); items 0..{i} were ingested, "
                "the rest was not"
            ) from exc


def _batched(events: Iterator[RawEvent], size: int) -> Iterator[list[RawEvent]]:
    batch: list[RawEvent] = []
    try:
        for ev in events:
            batch.append(ev)
            if len(batch) >= size:
                yield batch
                batch = []
    except (IngestFileError, OSError, EOFError):
        # The events read before a file turned out broken (malformed JSON, a gzip
        # stream cut by a crash) are still submitted, then the error is reported.
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def ingest_files(
    paths: list[Path],
    intake: EventIntake,
    on_progress: Callable[[Path, int, IntakeResult], None] | None = None,
    on_file_error: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> IngestReport:
    """Submit every event of every file; a broken file is reported and the rest go on.

    ``workers``: None validates NDJSON files of at least ``PARALLEL_MIN_BYTES`` in one
    worker process per core (smaller ones, and one-core machines, in this process);
    0 validates everything here; n > 0 uses n workers for every NDJSON file.
    """
    report = IngestReport()
    pool: _BlockPool | None = None
    try:
        for path in paths:
            name = str(path)
            if not path.is_file():
                _file_failed(report, f"{name}: no such file", on_file_error)
                continue
            report.files += 1
            before = IntakeResult()
            before.merge(report.result)

            def submitted(result: IntakeResult, path: Path = path) -> None:
                _report(report, result, path, on_progress)

            try:
                first = _first_byte(path)
                if first == b"[":
                    events = _json_array_events(path, name)
                    for batch in _batched(events, BATCH):
                        submitted(intake.submit(batch, "cli", sync=False))
                else:
                    n_workers = _workers_for(path, workers)
                    if n_workers and (pool is None or pool.broken):
                        if pool is not None:
                            pool.close()
                        pool = _BlockPool(intake.settings, n_workers)
                    with _open(path) as fh:
                        if n_workers and pool is not None:
                            pool.ingest(fh, name, intake, submitted)
                        else:
                            for lines, numbers in _ndjson_batches(fh):
                                result = intake.submit_lines(
                                    lines, _locator(name, numbers), "cli", sync=False
                                )
                                submitted(result)
            except IngestFileError as exc:
                _file_failed(report, str(exc), on_file_error)
                continue
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                _file_failed(
                    report,
                    f"{name}: cannot read ({exc}); the events before that point were ingested",
                    on_file_error,
                )
                continue
            received = report.result.received - before.received
            if received and report.result.accepted == before.accepted:
                reasons = report.result.reasons - before.reasons
                shown = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items()))
                report.rejected_files.append(
                    f"{name}: all {received:,} events rejected ({shown}); nothing landed"
                )
    finally:
        if pool is not None:
            pool.close()
        # Durable before anything is reported: every batch was written without its
        # own fsync; sealing fsyncs each segment once (quarantine first).
        intake.close()
    return report


def _workers_for(path: Path, workers: int | None) -> int:
    if workers is not None:
        return max(0, workers)
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return 0  # Windows: validated in this process
    cores = usable_cores()
    size = path.stat().st_size * (GZIP_RATIO_GUESS if path.suffix == ".gz" else 1)
    return cores if cores > 1 and size >= PARALLEL_MIN_BYTES else 0


# The worker side: set once per worker process by the pool's initializer.
_WORKER: tuple[Settings, fastpath.DayRouter] | None = None


def _worker_init(settings: Settings, ingest_pid: int) -> None:
    global _WORKER
    _WORKER = (settings, fastpath.DayRouter(fastpath.catalog_epoch_seconds(settings)))
    _exit_with(ingest_pid)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where a worker puts a block's bytes to land: ``size`` bytes from ``offset`` of
    the ingest's shared memory file, opened as ``handle`` (``/proc/<pid>/fd/<fd>``)."""

    handle: str
    inode: tuple[int, int]  # (st_dev, st_ino): a descriptor number reused is another file
    offset: int
    size: int


@dataclass(slots=True)
class _Placed:
    """A prevalidated block whose bytes to land are in its slot (``batch.landed`` is
    empty): ``at[date]`` is their (offset, length) within the slot."""

    batch: fastpath.Prevalidated
    at: dict[str, tuple[int, int]]


_Outcome = fastpath.Prevalidated | _Placed | None


def _place(batch: fastpath.Prevalidated | None, slot: _Slot | None) -> _Outcome:
    """Write the block's bytes to land into its slot; the batch as it is when there
    is no slot, the bytes do not fit, or the shared file cannot be opened here."""
    if batch is None or slot is None or sum(map(len, batch.landed.values())) > slot.size:
        return batch
    try:
        fd = os.open(slot.handle, os.O_WRONLY)
    except OSError:
        return batch
    at: dict[str, tuple[int, int]] = {}
    offset = 0
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != slot.inode:
            return batch  # the ingest closed it (a file given up): this block is moot
        for day, data in batch.landed.items():
            written = os.pwrite(fd, data, slot.offset + offset)
            if written != len(data):
                return batch  # a short write: sent in the pipe after all
            at[day] = (offset, written)
            offset += written
    finally:
        os.close(fd)
    batch.landed = {}
    return _Placed(batch, at)


class _Slots:
    """Shared memory the workers write the bytes to land into (an anonymous file both
    sides map): a 10M-event ingest sends ~2 GB of them, and pickling them through
    the pool's pipe cost ~8 CPU s of 30 across the processes (a copy into the
    pickle, then the pipe's copies and wake-ups each 64 KiB). A worker writes its
    block's bytes into the slot the block was sent with; this process writes them to
    the landing segment from the map, and the slot is taken again by a later block.
    A block inflated here (a .gz) goes to its worker through its slot too.
    Where there is no anonymous file or no ``/proc`` (not Linux), ``create`` gives
    None and the bytes come back pickled, as they always did."""

    def __init__(self, fd: int, count: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._map = mmap.mmap(fd, count * size)
        self._view = memoryview(self._map)
        self._free = list(range(count))
        self._handle = f"/proc/{os.getpid()}/fd/{fd}"
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)

    @classmethod
    def create(cls, count: int, size: int) -> _Slots | None:
        try:
            fd = os.memfd_create("recsys-ingest", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None
        try:
            os.ftruncate(fd, count * size)
            if not os.path.exists(f"/proc/{os.getpid()}/fd/{fd}"):
                raise OSError("no /proc: the workers could not open the shared file")
            return cls(fd, count, size)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def take(self) -> _Slot | None:
        if not self._free:
            return None
        index = self._free.pop()
        return _Slot(self._handle, self._inode, index * self._size, self._size)

    def give(self, slot: _Slot | None) -> None:
        if slot is not None:
            self._free.append(slot.offset // self._size)

    def put(self, slot: _Slot, block: bytes) -> _Span | None:
        """A block inflated here (a .gz), written into its slot for the worker to read
        as a span of the shared file: it crosses without a pickle or a pipe. None when
        it does not fit (a line longer than a block): then it is sent pickled."""
        if len(block) > slot.size:
            return None
        self._map[slot.offset : slot.offset + len(block)] = block
        return _Span(slot.handle, slot.offset, len(block), inode=slot.inode)

    def landed(self, placed: _Placed, slot: _Slot) -> fastpath.Prevalidated:
        """The batch with its bytes to land as views of the slot (no copy); they are
        valid until the slot is given back."""
        base = slot.offset
        placed.batch.landed = {  # type: ignore[assignment]
            day: self._view[base + at : base + at + n] for day, (at, n) in placed.at.items()
        }
        return placed.batch

    def close(self) -> None:
        self._view.release()
        with contextlib.suppress(BufferError):  # a view still held (a traceback): freed with it
            self._map.close()
        os.close(self._fd)


def _exit_with(pid: int) -> None:
    """End this worker when the ingest process ends, however it ends: killed (a
    SIGTERM runs no cleanup), a worker would otherwise wait for blocks forever, as a
    child of the fork server, not of the ingest. A pidfd becomes readable when the
    process exits; no polling. Where there is none (not Linux), nothing is watched."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="ingest-watch", daemon=True).start()


def _prevalidate_block(block: bytes, slot: _Slot | None = None) -> _Outcome:
    """A block of whole lines (ending in a newline) as the intake would land it (its
    bytes in ``slot`` when given), or None when some line needs the intake's own
    judgment (blank, CR, not accepted)."""
    assert _WORKER is not None, "called outside a worker process"
    if b"\r" in block:
        return None
    lines = block.split(b"\n")
    lines.pop()  # after the last newline: nothing
    # A blank line (which the intake skips, numbering on) is no event the fast path
    # accepts, so a block holding one comes back None without a search for it here.
    return _place(fastpath.prevalidate(lines, *_WORKER, joined=block), slot)


def _prevalidate_span(span: _Span, slot: _Slot | None = None) -> _Outcome:
    """:func:`_prevalidate_block` for whole lines read here, from a plain file or
    from the slot a .gz block was inflated into: the ingest process never pickles
    them through a pipe (nor, for a plain file, reads them) unless it must submit
    them itself."""
    return _prevalidate_block(span.read(), slot)


@dataclass(frozen=True, slots=True)
class _Span:
    """Whole lines of a plain file (or of the ingest's shared memory file):
    ``length`` bytes from ``start``, the last of them a newline (or the file's end,
    when ``newline`` says one is to be added)."""

    path: str
    start: int
    length: int
    newline: bool = False
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file being ingested
    # The ingest's open descriptor, as /proc/<pid>/fd/<fd>: still the same file after
    # a rotation renamed it (the workers descend from the ingest, so may open it).
    handle: str | None = None

    def __len__(self) -> int:
        return self.length

    def _open(self) -> int:
        if self.handle is not None:
            try:
                return os.open(self.handle, os.O_RDONLY)
            except OSError:
                pass  # no /proc here: by name, checked to be the same file below
        return os.open(self.path, os.O_RDONLY)

    def read(self) -> bytes:
        """The span's bytes, from the very file the ingest opened, even if a log
        rotation renamed it meanwhile; a file replaced under its name where that
        cannot be followed is a read error, never other bytes."""
        fd = self._open()
        try:
            st = os.fstat(fd)
            if self.inode is not None and (st.st_dev, st.st_ino) != self.inode:
                raise OSError(f"{self.path} was replaced while being ingested")
            data = os.pread(fd, self.length, self.start)
        finally:
            os.close(fd)
        if len(data) != self.length:
            raise OSError(f"{self.path} shrank while being ingested")
        return data + b"\n" if self.newline else data


def _spans(fh: BinaryIO, path: str) -> Generator[_Span, None, None]:
    """A plain file's whole lines from ``fh``'s position (past a byte order mark) in
    spans of about ``READ_BLOCK`` bytes, cut at newlines found through a memory map
    (nothing is copied here); what the file grows by meanwhile is read too."""
    start = fh.tell()
    fd = fh.fileno()
    st = os.fstat(fd)
    inode = (st.st_dev, st.st_ino)
    handle = f"/proc/{os.getpid()}/fd/{fd}"
    while (size := os.fstat(fd).st_size) > start:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            while start < size:
                end = start + READ_BLOCK
                if end >= size:
                    cut = size
                else:
                    cut = mm.rfind(b"\n", start, end) + 1
                    if not cut:  # one line longer than a block
                        cut = mm.find(b"\n", end) + 1 or size
                yield _Span(path, start, cut - start, mm[cut - 1] != 10, inode, handle)
                start = cut


def _mappable(fh: BinaryIO) -> bool:
    """Whether the file can be memory-mapped (some file systems cannot): if not, it
    is read and shipped to the workers in blocks, as a .gz is."""
    try:
        size = os.fstat(fh.fileno()).st_size
        if size:
            with mmap.mmap(fh.fileno(), min(size, mmap.PAGESIZE), access=mmap.ACCESS_READ):
                pass
    except (OSError, ValueError):
        return False
    return True


class _BlockPool:
    """Worker processes that prevalidate a file's blocks, landed here in file order.

    The workers are started by a fork server (a clean process, not a fork of this
    one and its threads: a progress bar's, the read-ahead's), once per ingest. It
    preloads nothing: Python 3.11's fork server puts its working directory first on
    its path, so a module it imported could come from another checkout there; each
    worker imports after taking this process's path (~0.07 s more per ingest).
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([])
        self.workers = workers
        self.broken = False
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_worker_init,
            initargs=(settings, os.getpid()),
        )

    def _submit(self, block: bytes | _Span, slot: _Slot | None) -> Future[_Outcome] | None:
        if self.broken:
            return None
        try:
            if isinstance(block, _Span):
                return self._pool.submit(_prevalidate_span, block, slot)
            return self._pool.submit(_prevalidate_block, block, slot)
        except BrokenProcessPool:
            self.broken = True
            return None

    def _result(self, future: Future[_Outcome] | None) -> _Outcome:
        if future is None:
            return None
        try:
            return future.result()
        except BrokenProcessPool:
            # A worker died (killed, out of memory): this block and the rest of the
            # file are validated here, so nothing is lost or counted twice.
            self.broken = True
            return None

    def ingest(
        self,
        fh: BinaryIO,
        name: str,
        intake: EventIntake,
        submitted: Callable[[IntakeResult], None],
    ) -> None:
        """Land every whole line of ``fh``; a read error is raised after every block
        read before it has landed (as the line-by-line reader does)."""
        in_flight = 2 * self.workers + 1  # a few blocks per worker keep them busy
        # One more slot than blocks in flight: the block being landed holds one.
        slots = _Slots.create(in_flight + 1, 2 * READ_BLOCK)
        pending: deque[tuple[bytes | _Span, Future[_Outcome] | None, _Slot | None]] = deque()
        line_no = 0

        def land(block: bytes | _Span, future: Future[_Outcome] | None, slot: _Slot | None) -> None:
            nonlocal line_no
            outcome = self._result(future)
            try:
                if isinstance(outcome, _Placed):
                    assert slots is not None and slot is not None
                    outcome = slots.landed(outcome, slot)
                result = (
                    intake.land_prevalidated(outcome, sync=False) if outcome is not None else None
                )
            finally:
                del outcome  # no view of the slot outlives its landing
                if slots is not None:
                    slots.give(slot)
            if result is not None:
                line_no += result.received
                submitted(result)
                return
            if isinstance(block, _Span):
                block = block.read()
            parts = block.split(b"\n")
            parts.pop()
            lines: list[bytes] = []
            numbers: list[int] = []
            _add_lines(parts, block, b"", line_no, lines, numbers)
            line_no += len(parts)
            for at in range(0, len(lines), BATCH):
                chunk = lines[at : at + BATCH]
                locate = _locator(name, numbers[at : at + BATCH])
                submitted(intake.submit_lines(chunk, locate, "cli", sync=False))

        failure: BaseException | None = None
        # A plain file is read by the workers themselves; a .gz is inflated here.
        name_of_file = getattr(fh, "name", None)
        plain = (
            isinstance(fh, io.BufferedReader) and isinstance(name_of_file, str) and _mappable(fh)
        )
        blocks: Generator[bytes | _Span, None, None] = (
            _spans(fh, name_of_file) if plain else _whole_line_blocks(fh)
        )
        try:
            while True:
                # Only a read error waits for the blocks before it to land; a write
                # error (a full disk) stops the file where it happens.
                try:
                    block = next(blocks)
                except StopIteration:
                    break
                except (OSError, EOFError) as exc:
                    failure = exc
                    break
                slot = slots.take() if slots is not None else None
                shared = (
                    slots.put(slot, block)
                    if slot is not None and slots is not None and isinstance(block, bytes)
                    else None
                )
                pending.append((block, self._submit(shared or block, slot), slot))
                while len(pending) > in_flight:  # and memory bounded
                    land(*pending.popleft())
            while pending:
                land(*pending.popleft())
        except BaseException:
            for _, future, _ in pending:
                if future is not None:
                    future.cancel()
            blocks.close()  # stops the read-ahead thread before the file closes
            raise
        finally:
            # A block still running in a worker after an error finds the slots gone
            # (another file, or none, behind the number): it writes nothing.
            if slots is not None:
                slots.close()
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _whole_line_blocks(fh: BinaryIO) -> Generator[bytes, None, None]:
    """The file's bytes in blocks that end with a newline (a last line without one
    gets it). A read error is raised after the blocks before it; the cut line at the
    point of the error is not handed over (as with the line-by-line reader)."""
    carry = b""
    for block in _ReadAhead(fh):
        data = carry + block if carry else block
        cut = data.rfind(b"\n") + 1
        if not cut:
            carry = data  # one line longer than a block
            continue
        carry = data[cut:]
        yield data if cut == len(data) else data[:cut]
    if carry:
        yield carry + b"\n"


def _locator(name: str, numbers: list[int]) -> Callable[[int], str]:
    return lambda i: f"{name}:{numbers[i]}"


def _report(
    report: IngestReport,
    result: IntakeResult,
    path: Path,
    on_progress: Callable[[Path, int, IntakeResult], None] | None,
) -> None:
    report.result.merge(result)
    if on_progress is not None:
        on_progress(path, result.received, result)


def _file_failed(report: IngestReport, message: str, cb: Callable[[str], None] | None) -> None:
    report.failed_files.append(message)
    if cb is not None:
        cb(message)


def count_lines(path: Path) -> int:
    """A cheap upfront count for the progress bar (NDJSON only; arrays report as they go).

    A plain file is counted through a memory map with numpy, never copied: on a
    multi-GB log the read copy and ``bytes.count`` cost ~5% of the whole ingest.
    """
    if path.suffix != ".gz":
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if not size:
                return 0
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                data = np.frombuffer(mm, dtype=np.uint8)
                total = sum(
                    int(np.count_nonzero(data[at : at + _COUNT_CHUNK] == 10))
                    for at in range(0, size, _COUNT_CHUNK)
                )
                del data  # the map cannot close while numpy still views it
            return total
    total = 0
    with _open(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            total += chunk.count(b"\n")
    return total


_COUNT_CHUNK = 1 << 22


__all__ = ["IngestFileError", "IngestReport", "count_lines", "ingest_files"]
