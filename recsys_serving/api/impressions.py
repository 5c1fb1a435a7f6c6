"""Impression logging with group commit: what was shown, made durable in groups.

Every item a recommendation answer returns becomes one ``impression`` event (with
``request_id``, ``position`` and ``model_version``) so clicks can be joined back to
what was shown and online CTR can be computed per model. The events go through the
landing zone's durable writer (:class:`~recsys_serving.landing.SegmentWriter`, the
append + fsync path of ``POST /events``), with segments of their own so a large
collector batch never holds up an answer.

One fsync per request would add the disk's latency to every answer and cap a worker
at a few thousand answers a second. Instead requests form groups: impressions queue
on the event loop, one writer thread appends a whole group and fsyncs once (on S3: one
PUT) and then releases every request of that group; whatever queued meanwhile is the
next group. Under load groups grow by themselves, so the fsync cost per request falls
as concurrency rises, and a slow disk (fsync takes tens of milliseconds on a busy
machine) delays only the answers waiting for it, never the event loop.

Durability, ``RECSYS_IMPRESSION_SYNC``:

* ``true`` (default): an answer leaves only after its impressions are on disk (or in
  S3), exactly as for ``POST /events``. The answer waits for its group's fsync, so with
  few concurrent clients per worker the fsync latency bounds throughput (every client
  waits on the same fsync while the worker idles).
* ``false``: the answer leaves at once and its group is committed in the background
  (the same groups, the same writer). A crash (not a shutdown: shutdown commits what is
  queued) can lose the impressions of the group being committed, a few milliseconds of
  traffic. If the disk falls behind by more than ``MAX_PENDING_EVENTS``, answers wait
  for it again rather than queue without bound.

If a write fails the answer is still served (recommendations must not fail because
logging did), the error is logged and the lost events are counted in
``recsys_events_rejected_total{reason="write_failed"}``.

The events are built by the server from validated inputs (the path's user id obeys
the contract's id rules; item ids come from the bundle, which was trained on
contract-valid weblogs), so they skip per-event pydantic validation; a test checks
that every logged line validates against the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from recsys_serving.api.metrics import ServiceMetrics
from recsys_serving.lake import Lake
from recsys_serving.landing import SegmentWriter, default_writer_id
from recsys_serving.layout import LANDING_AREA, utc_date
from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

MAX_PENDING_EVENTS = 100_000


@dataclass(frozen=True, slots=True)
class Shown:
    item_id: str
    position: int


def impression_events(
    request_id: str,
    user_id: str,
    items: Sequence[Shown],
    model_version: str,
    served_by: str,
    ts: float | None = None,
) -> list[dict[str, Any]]:
    """The landing representation of one answer's impressions."""
    ts = time.time() if ts is None else ts
    context = {"served_by": served_by}
    return [
        {
            "event_id": f"{request_id}-{item.position}",
            "event_type": "impression",
            "user_id": user_id,
            "item_id": item.item_id,
            "ts": ts,
            "request_id": request_id,
            "position": item.position,
            "model_version": model_version,
            "context": context,
        }
        for item in items
    ]


@dataclass
class _Group:
    lines: dict[str, list[bytes]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    events: int = 0
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)


class ImpressionLog:
    """Queues impression events on the event loop; one writer thread commits groups."""

    def __init__(self, lake: Lake, settings: Settings, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.writer = SegmentWriter(
            lake,
            LANDING_AREA,
            writer_id=f"{default_writer_id()}-impressions",
            max_bytes=settings.collector.landing_segment_max_bytes,
            max_age_seconds=settings.collector.landing_segment_max_age_seconds,
        )
        self.sync = settings.serving.impression_sync
        self._executor = ThreadPoolExecutor(1, "impressions")
        # Per event loop (one per worker; tests may run several): the group being
        # filled, and whether a commit is in flight.
        self._groups: dict[asyncio.AbstractEventLoop, _Group] = {}
        self._inflight: set[asyncio.AbstractEventLoop] = set()
        self._closed = False
        self.groups = 0
        self.events = 0

    async def log(self, events: list[dict[str, Any]]) -> bool:
        """Wait until ``events`` are durable (unless ``sync`` is off); False if the write
        failed (already logged and counted)."""
        if not events:
            return True
        if self._closed:
            raise RuntimeError("impression log is closed")
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = _Group()
            # After the callbacks ready now: requests finishing in this turn join.
            loop.call_soon(self._flush, loop)
        ts = None
        lines: list[bytes] = []
        for event in events:
            if event["ts"] != ts:  # an answer's events share one timestamp
                ts = event["ts"]
                lines = group.lines.setdefault(_day(ts), [])
            lines.append(orjson.dumps(event) + b"\n")
            version = event["model_version"]
            group.versions[version] = group.versions.get(version, 0) + 1
        group.events += len(events)
        if not self.sync and group.events <= MAX_PENDING_EVENTS:
            return True
        waiter = loop.create_future()
        group.waiters.append(waiter)
        # shield: a client that disconnects must not cancel the commit of its group.
        return await asyncio.shield(waiter)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop in self._inflight or self._closed:
            return  # the commit in flight (or close()) flushes this group
        group = self._groups.pop(loop, None)
        if group is None:
            return
        self._inflight.add(loop)
        future = loop.run_in_executor(self._executor, self._commit, group)

        def done(f: asyncio.Future[bool]) -> None:
            self._inflight.discard(loop)
            _settle(group.waiters, not f.cancelled() and f.exception() is None and f.result())
            self._flush(loop)

        future.add_done_callback(done)

    def _commit(self, group: _Group) -> bool:
        try:
            self.writer.append({d: b"".join(lines) for d, lines in group.lines.items()})
        except Exception as exc:
            log.error("impressions.write_failed", events=group.events, error=repr(exc))
            self.metrics.events_landed("impressions", 0, {"write_failed": group.events})
            return False
        self.groups += 1
        self.events += group.events
        self.metrics.events_landed("impressions", group.events, {})
        for version, n in group.versions.items():
            self.metrics.impressions.labels(version).inc(n)
        return True

    def seal_expired(self) -> None:
        self.writer.seal_expired()

    def close(self) -> None:
        """Commit what is queued, seal the open segments, stop."""
        self._closed = True
        self._executor.shutdown(wait=True)
        for loop in list(self._groups):
            group = self._groups.pop(loop)
            ok = self._commit(group)
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                loop.call_soon_threadsafe(_settle, group.waiters, ok)
        self.writer.close()


@functools.lru_cache(maxsize=4)
def _day_of_hour(hour: int) -> str:
    return utc_date(hour * 3600)


def _day(ts: float) -> str:
    """The UTC date partition of a timestamp (dates change on hour boundaries only)."""
    hour = int(ts // 3600)
    if 1e-6 <= ts - hour * 3600 <= 3600 - 1e-6:
        return _day_of_hour(hour)
    # Within a microsecond of an hour: datetime's own rounding decides the side.
    return utc_date(ts)


def _settle(waiters: list[asyncio.Future[bool]], ok: bool) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(ok)
