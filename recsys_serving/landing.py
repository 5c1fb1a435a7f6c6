"""Durable, append-only landing of NDJSON micro-batches in the lake.

The collector must not answer ``202`` before an event is safe, yet thousands of
tiny objects would make the weblogs asset slow. On a local lake each writer
appends to an open segment per event date and fsyncs before returning; a segment
is sealed (renamed, never rewritten) when it is old or large. On S3 every flush is
one PUT, which is atomic and durable when it returns. Sealed file names start with
the seal time in nanoseconds, which is what the landing sensor's cursor follows.

A local writer holds an exclusive ``flock`` on each open segment for as long as it may
append to it; the kernel drops the lock when the writer dies, however it dies. That is
how recovery (``recover_orphans``: the landing sensor, and ``recsys ingest|process|
status`` without a daemon) tells a crashed writer's segment from a live one: it seals
only segments older than a writer's lifetime whose lock it can take, so a live writer's
segment is never stolen, however long it sits idle.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from recsys_serving.lake import Lake, LocalLake, fsync_path
from recsys_serving.layout import (
    INTAKE_QUARANTINE_AREA,
    LANDING_AREA,
    OPEN_DIR,
    date_dir,
    date_of_dir,
    dated_key,
    utc_today,
)
from recsys_serving.settings import CollectorSettings, default_of

ORPHAN_AFTER_SECONDS = 600.0

_SEALED = re.compile(
    r"^(?P<area>.+)/date=(?P<date>\d{4}-\d{2}-\d{2})/(?P<ns>\d{19})-(?P<writer>[A-Za-z0-9_.-]+)\.ndjson$"
)


@dataclass(frozen=True, slots=True)
class LandingFile:
    key: str
    date: str
    seal_ns: int
    size: int


def parse_sealed_key(key: str, area: str = LANDING_AREA) -> LandingFile | None:
    m = _SEALED.match(key)
    if not m or m["area"] != area:
        return None
    return LandingFile(key=key, date=m["date"], seal_ns=int(m["ns"]), size=0)


def list_sealed(lake: Lake, area: str = LANDING_AREA, date: str | None = None) -> list[LandingFile]:
    """Sealed segments of an area (optionally one date), in seal order."""
    prefix = dated_key(area, date, "") if date else f"{area}/"
    files = []
    for obj in lake.list(prefix):
        parsed = parse_sealed_key(obj.key, area)
        if parsed is not None:
            files.append(LandingFile(obj.key, parsed.date, parsed.seal_ns, obj.size))
    files.sort(key=lambda f: (f.seal_ns, f.key))
    return files


def default_writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40]
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


@dataclass
class _OpenSegment:
    fd: int
    path: Path
    seq: int
    opened_at: float
    size: int = 0
    dirty: bool = False  # written since its last fsync


class SegmentWriter:
    """Appends NDJSON bytes per date partition; durable when ``append`` returns."""

    def __init__(
        self,
        lake: Lake,
        area: str,
        writer_id: str | None = None,
        max_bytes: int = default_of(CollectorSettings, "landing_segment_max_bytes"),
        max_age_seconds: float = default_of(CollectorSettings, "landing_segment_max_age_seconds"),
    ) -> None:
        self.lake = lake
        self.area = area
        self.writer_id = writer_id or default_writer_id()
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._open: dict[str, _OpenSegment] = {}
        self._seq = 0
        self._last_ns = 0
        self._local_root = lake.root if isinstance(lake, LocalLake) else None

    def _next_ns(self) -> int:
        ns = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = ns
        return ns

    def _sealed_key(self, date: str, seq: int) -> str:
        name = f"{self._next_ns():019d}-{self.writer_id}-{seq:06d}.ndjson"
        return dated_key(self.area, date, name)

    def append(self, by_date: dict[str, bytes], sync: bool = True) -> None:
        """Append each date's bytes; durable on return unless ``sync`` is False, in
        which case :meth:`flush` (or sealing the segment) makes it durable later: one
        fsync per segment instead of one per batch, for a bulk load that reports
        success only after flushing."""
        by_date = {d: b for d, b in by_date.items() if b}
        if not by_date:
            return
        with self._lock:
            if self._local_root is None:
                for date, data in by_date.items():
                    self._seq += 1
                    self.lake.put_bytes(self._sealed_key(date, self._seq), data)
                return
            touched = []
            for date, data in by_date.items():
                seg = self._segment_for(date, len(data))
                view = memoryview(data)
                while view:
                    written = os.write(seg.fd, view)
                    view = view[written:]
                seg.size += len(data)
                seg.dirty = True
                touched.append(seg)
            if sync:
                for seg in touched:
                    os.fsync(seg.fd)
                    seg.dirty = False

    def flush(self) -> None:
        """fsync every open segment written since its last fsync."""
        with self._lock:
            for seg in self._open.values():
                if seg.dirty:
                    os.fsync(seg.fd)
                    seg.dirty = False

    def _segment_for(self, date: str, incoming: int) -> _OpenSegment:
        seg = self._open.get(date)
        now = time.monotonic()
        if seg is not None and (
            seg.size + incoming > self.max_bytes
            or now - seg.opened_at > self.max_age_seconds
            or not seg.path.exists()  # recovered as an orphan by someone else
        ):
            self._seal(date)
            seg = None
        if seg is None:
            assert self._local_root is not None
            self._seq += 1
            path = self._local_root / self.area / OPEN_DIR / date_dir(date)
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{self.writer_id}-{self._seq:06d}.ndjson"
            fd = _open_locked(path)
            seg = _OpenSegment(fd=fd, path=path, seq=self._seq, opened_at=now)
            self._open[date] = seg
        return seg

    def _seal(self, date: str) -> None:
        seg = self._open.pop(date, None)
        if seg is None:
            return
        # Renamed while still locked, so recovery cannot take it between the two steps.
        try:
            if seg.size == 0 or not seg.path.exists():
                seg.path.unlink(missing_ok=True)
                return
            if seg.dirty:
                os.fsync(seg.fd)  # a sealed segment is always durable
                seg.dirty = False
            assert self._local_root is not None
            target = self._local_root / self._sealed_key(date, seg.seq)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(seg.path, target)
            fsync_path(target.parent)
        finally:
            os.close(seg.fd)

    def seal_expired(self) -> int:
        """Seal segments past their age so idle traffic still becomes visible downstream."""
        now = time.monotonic()
        with self._lock:
            expired = [d for d, s in self._open.items() if now - s.opened_at > self.max_age_seconds]
            for date in expired:
                self._seal(date)
        return len(expired)

    def close(self) -> None:
        with self._lock:
            for date in list(self._open):
                self._seal(date)


def _open_locked(path: Path) -> int:
    """Create (or reopen) ``path`` for appending, holding its lock until the segment is
    sealed: recovery never takes a live writer's segment, and the kernel releases the
    lock if this process dies. If recovery took the file between our open and our lock
    (it only takes old files, so only with a tiny orphan age), open it afresh."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@dataclass(frozen=True, slots=True)
class OpenSegment:
    """A segment still under ``<area>/_open``: being written, or left by a dead writer."""

    path: Path
    date: str
    size: int
    age_seconds: float
    live: bool  # a writer holds its lock


def list_open(lake: Lake, area: str = LANDING_AREA) -> list[OpenSegment]:
    """Open segments of an area, each tested (never taken) for a live writer's lock."""
    if not isinstance(lake, LocalLake):
        return []  # S3 writers PUT whole objects: nothing is ever open
    found = []
    now = time.time()
    for path in sorted((lake.root / area / OPEN_DIR).glob("date=*/*.ndjson")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # sealed meanwhile
        try:
            st = os.fstat(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                live = False
            except BlockingIOError:
                live = True
        finally:
            os.close(fd)  # releases the probe's lock, if it got one
        found.append(
            OpenSegment(
                path=path,
                date=date_of_dir(path.parent.name),
                size=st.st_size,
                age_seconds=max(0.0, now - st.st_mtime),
                live=live,
            )
        )
    return found


def recover_orphans(
    lake: Lake, area: str = LANDING_AREA, older_than_seconds: float = ORPHAN_AFTER_SECONDS
) -> list[str]:
    """Seal open segments left by a crashed writer; the sealed keys, in seal order.

    A segment is an orphan when nothing was written to it for ``older_than_seconds``
    (at least a writer's segment lifetime) and no writer holds its lock: a live writer
    always does, a dead one cannot. Recovery takes the lock itself while it seals, so
    two recoveries (the sensor and a CLI) never seal one segment twice.

    Bytes after the last newline were never acknowledged (a writer fsyncs whole
    batches before answering), but they are still moved to quarantine rather than
    dropped, so an operator can see what a crash cut off.
    """
    if not isinstance(lake, LocalLake):
        return []
    open_root = lake.root / area / OPEN_DIR
    if not open_root.exists():
        return []
    sealed = []
    cutoff = time.time() - older_than_seconds
    writer = SegmentWriter(lake, area, writer_id=f"recovered.{uuid.uuid4().hex[:6]}")
    for path in sorted(open_root.glob("date=*/*.ndjson")):
        try:
            if path.stat().st_mtime > cutoff:
                continue
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's segment, merely idle
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # sealed (or recovered) between our open and our lock
            except FileNotFoundError:
                continue
            key = _seal_orphan(lake, area, writer, path, fd)
            if key is not None:
                sealed.append(key)
        finally:
            os.close(fd)
    if sealed:
        fsync_path(open_root)
    return sealed


def _seal_orphan(
    lake: LocalLake, area: str, writer: SegmentWriter, path: Path, fd: int
) -> str | None:
    date = date_of_dir(path.parent.name)
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        _quarantine_tail(lake, area, path, data[cut:])
        os.ftruncate(fd, cut)
        os.fsync(fd)
    if cut == 0:
        path.unlink(missing_ok=True)
        return None
    target = lake.root / writer._sealed_key(date, 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    fsync_path(target.parent)
    return target.relative_to(lake.root).as_posix()


def _quarantine_tail(lake: Lake, area: str, path: Path, tail: bytes) -> None:
    record = quarantine_record(
        raw=tail,
        reason="partial write cut off by a writer crash (never acknowledged)",
        code="partial_write",
        source=f"recovery:{area}",
        locator=path.name,
    )
    writer = SegmentWriter(lake, INTAKE_QUARANTINE_AREA, writer_id="recovery")
    writer.append({utc_today(): record})
    writer.close()


def quarantine_record(raw: bytes, reason: str, code: str, source: str, locator: str) -> bytes:
    """One quarantine line; keeps the exact original bytes (base64 when not UTF-8).

    Every quarantine area (intake, catalog, a crashed writer's cut-off tail) stores this
    one record shape, written through a ``SegmentWriter`` like landed events."""
    record: dict[str, Any] = {
        "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "source": source,
        "at": locator,
        "code": code,
        "reason": reason,
    }
    try:
        record["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        record["raw_b64"] = base64.b64encode(raw).decode("ascii")
    return orjson.dumps(record) + b"\n"


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Lines with 1-based numbers; a final line without newline is still a line."""
    start = 0
    line_no = 0
    n = len(data)
    while start < n:
        end = data.find(b"\n", start)
        if end == -1:
            end = n
        line_no += 1
        line = data[start:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        yield line_no, line
        start = end + 1
