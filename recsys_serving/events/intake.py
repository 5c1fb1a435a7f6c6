"""The processing function in front of the lake: validate, route, land or quarantine.

The collector endpoint and ``recsys ingest`` both go through :class:`EventIntake`,
so a file backfill and live traffic obey the same contract and the same accounting:
every event received is either landed or quarantined with its original bytes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import msgspec
import orjson
from pydantic import ValidationError

from recsys_serving.events import fastpath
from recsys_serving.events.schema import (
    Limits,
    WeblogEvent,
    describe_error,
    error_code,
    normalize,
)
from recsys_serving.lake import Lake
from recsys_serving.landing import SegmentWriter, quarantine_record
from recsys_serving.layout import INTAKE_QUARANTINE_AREA, LANDING_AREA, utc_date, utc_today
from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

MAX_ERRORS_LISTED = 100


@dataclass(slots=True)
class RawEvent:
    """An event as received: its bytes (for quarantine) and where it came from."""

    locator: str
    raw: bytes
    parsed: Any = None  # already-decoded JSON when the transport parsed a whole array


@dataclass
class IntakeResult:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    days: set[str] = field(default_factory=set)

    def reject(self, locator: str, code: str, reason: str, event_id: Any = None) -> None:
        self.rejected += 1
        self.reasons[code] += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            entry: dict[str, Any] = {"at": locator, "code": code, "reason": reason}
            if isinstance(event_id, str | int) and not isinstance(event_id, bool):
                entry["event_id"] = str(event_id)[:256]
            self.errors.append(entry)

    def merge(self, other: IntakeResult) -> None:
        self.received += other.received
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.reasons.update(other.reasons)
        self.days |= other.days
        room = MAX_ERRORS_LISTED - len(self.errors)
        if room > 0:
            self.errors.extend(other.errors[:room])

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reasons": dict(self.reasons),
            "errors": self.errors,
            "errors_truncated": self.rejected > len(self.errors),
        }


def reserialize(obj: Any) -> bytes:
    """An item of a parsed JSON array back as bytes, for its quarantine record.

    The transport parsed the array, so the item's own bytes are gone; whatever the
    item holds (nesting past orjson's 254 levels, lone surrogates, integers past 64
    bits) it is still quarantined, as the closest text that can be written.
    """
    try:
        return orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):
        pass
    try:
        return json.dumps(obj, ensure_ascii=True).encode("ascii")
    except (RecursionError, ValueError, TypeError) as exc:
        return f'"<unserializable item: {type(exc).__name__}>"'.encode("ascii")


class RecentIds:
    """A bounded memory of accepted event ids, to answer a retried batch precisely.

    The weblogs asset deduplicates exactly per partition; this cache only lets the
    collector tell a client at once that it resent something. Ids are kept per batch
    (a list each, oldest first) beside one set, so a batch is checked and remembered
    with a few set operations instead of one per id; the oldest are forgotten first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: set[str] = set()
        self._batches: deque[list[str]] = deque()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def isdisjoint(self, event_ids: Iterable[str]) -> bool:
        return self._ids.isdisjoint(event_ids)

    def add(self, event_id: str) -> None:
        self.add_batch([event_id])

    def claim(self, event_ids: list[str]) -> bool:
        """Take a batch of distinct ids into the set unless one of them is remembered
        already (then the set is as before, and False): one set operation where a check
        then an update took two. Follow with ``add_batch(ids, claimed=True)`` once the
        batch is landed, or :meth:`unclaim` if it could not be."""
        if self.capacity <= 0 or not event_ids:
            return True
        before = len(self._ids)
        self._ids.update(event_ids)
        if len(self._ids) - before == len(event_ids):
            return True
        # Rare (a resent block): the set is the union of the batches, rebuilt.
        self._ids = set(chain.from_iterable(self._batches))
        return False

    def unclaim(self, event_ids: list[str]) -> None:
        """Forget a claimed batch that was not landed after all."""
        if self.capacity > 0:
            self._ids.difference_update(event_ids)

    def add_batch(self, event_ids: list[str], *, claimed: bool = False) -> None:
        """Remember a batch's accepted ids (in acceptance order).

        ``claimed``: the batch went through :meth:`claim` (so its ids are distinct,
        were not remembered before, and are in the set already)."""
        if self.capacity <= 0 or not event_ids:
            return
        if not claimed and (
            not self._ids.isdisjoint(event_ids) or len(set(event_ids)) != len(event_ids)
        ):
            event_ids = [i for i in dict.fromkeys(event_ids) if i not in self._ids]
        if len(event_ids) >= self.capacity:
            kept = event_ids[len(event_ids) - self.capacity :]
            self._ids = set(kept)
            self._batches = deque([kept])
            return
        if not claimed:
            self._ids.update(event_ids)
        self._batches.append(event_ids)
        excess = len(self._ids) - self.capacity
        while excess > 0:
            oldest = self._batches[0]
            if len(oldest) <= excess:
                self._batches.popleft()
                self._ids.difference_update(oldest)
                excess -= len(oldest)
            else:
                self._ids.difference_update(oldest[:excess])
                self._batches[0] = oldest[excess:]
                excess = 0


@dataclass(slots=True)
class _Rejection:
    at: int  # position in the batch
    code: str
    reason: str
    event_id: Any = None


@dataclass(slots=True)
class _Accepted:
    at: int
    event_id: str
    ts: float
    line: Any  # a fast-path Struct, or the contract path's landing line as msgspec.Raw


class EventIntake:
    """Validates events and writes them durably to landing or quarantine."""

    def __init__(self, lake: Lake, settings: Settings, writer_id: str | None = None) -> None:
        self.lake = lake
        self.settings = settings
        seg = {
            "writer_id": writer_id,
            "max_bytes": settings.collector.landing_segment_max_bytes,
            "max_age_seconds": settings.collector.landing_segment_max_age_seconds,
        }
        self.landing = SegmentWriter(lake, LANDING_AREA, **seg)
        self.quarantine = SegmentWriter(lake, INTAKE_QUARANTINE_AREA, **seg)
        self.recent = RecentIds(settings.collector.dedup_cache_size)
        self._recent_lock = threading.Lock()
        self._router = fastpath.DayRouter(fastpath.catalog_epoch_seconds(settings))

    def submit(self, events: Iterable[RawEvent], source: str, *, sync: bool = True) -> IntakeResult:
        """Validate a batch, make it durable, and report exactly what happened to each event.

        ``sync=False``: as for :meth:`submit_lines`."""
        batch = events if isinstance(events, list) else list(events)
        raw = [i for i, ev in enumerate(batch) if ev.parsed is None and ev.raw]
        lines = [batch[i].raw for i in raw]
        return self._submit(
            len(batch),
            lines,
            raw,
            lambda i: batch[i],
            source,
            sync=sync,
        )

    def submit_lines(
        self,
        lines: Sequence[bytes],
        locate: Callable[[int], str],
        source: str,
        *,
        sync: bool = True,
    ) -> IntakeResult:
        """:meth:`submit` for non-blank NDJSON lines (``locate(i)`` names line ``i`` in a
        rejection), without building an event object per line.

        ``sync=False`` leaves the fsync to :meth:`flush` or :meth:`close` (a bulk
        ingest makes its data durable once, before it reports success, instead of
        once per batch); the collector keeps ``sync=True``: durable before its 202.
        """
        return self._submit(
            len(lines),
            lines,
            range(len(lines)),
            lambda i: RawEvent(locate(i), lines[i]),
            source,
            sync=sync,
        )

    def _submit(
        self,
        n: int,
        lines: Sequence[bytes],
        line_at: Sequence[int],
        event_at: Callable[[int], RawEvent],
        source: str,
        *,
        sync: bool,
    ) -> IntakeResult:
        """The one intake: raw lines through the compiled fast path, everything it does
        not accept (and every already-parsed item) through the pydantic contract, then
        duplicates, partitions and durable writes, in the order the events came."""
        result = IntakeResult(received=n)
        now = time.time()
        arrival_day = utc_date(now)
        latest_ok = now + self.settings.events.future_tolerance_seconds
        max_event = self.settings.collector.max_event_bytes
        limits = Limits.from_settings(self.settings, now=now)

        fast = fastpath.validate(lines, limits, max_event)
        if len(line_at) == n and isinstance(line_at, range):
            positions = fast.positions
            slow = fast.rest
        else:
            positions = [line_at[k] for k in fast.positions]
            in_fast = set(positions)
            slow = [i for i in range(n) if i not in in_fast]
        rejected: list[_Rejection] = []
        accepted: list[_Accepted] = []
        for i in slow:
            outcome = self._contract(event_at(i), limits, max_event)
            if isinstance(outcome, _Rejection):
                outcome.at = i
                rejected.append(outcome)
            else:
                outcome.at = i
                accepted.append(outcome)

        at, ids, ts, items = positions, fast.event_ids, fast.ts, fast.events
        if accepted:
            merged = sorted([*map(_Accepted, at, ids, ts, items), *accepted], key=lambda a: a.at)
            at = [a.at for a in merged]
            ids = [a.event_id for a in merged]
            ts = [a.ts for a in merged]
            items = [a.line for a in merged]

        with self._recent_lock:
            # A resent event (its id accepted before, or earlier in this batch) is
            # refused; in the usual batch there is none, which two set operations show.
            if len(set(ids)) != len(ids) or not self.recent.isdisjoint(ids):
                seen: set[str] = set()
                keep = []
                for k, event_id in enumerate(ids):
                    if event_id in self.recent or event_id in seen:
                        rejected.append(
                            _Rejection(
                                at[k],
                                "duplicate_event_id",
                                f"event_id {event_id!r} was already accepted",
                                event_id,
                            )
                        )
                    else:
                        seen.add(event_id)
                        keep.append(k)
                at = [at[k] for k in keep]
                ids = [ids[k] for k in keep]
                ts = [ts[k] for k in keep]
                items = [items[k] for k in keep]

            landed = self._router.route(items, ts, latest_ok, arrival_day)
            quarantined = b""
            if rejected:
                rejected.sort(key=lambda r: r.at)
                records = []
                for r in rejected:
                    ev = event_at(r.at)
                    result.reject(ev.locator, r.code, r.reason, r.event_id)
                    raw = ev.raw if ev.raw else reserialize(ev.parsed)
                    records.append(quarantine_record(raw, r.reason, r.code, source, ev.locator))
                quarantined = b"".join(records)
            # Durable before answering: quarantine first so a crash between the two
            # writes can only duplicate a rejection, never lose an accepted event.
            if quarantined:
                self.quarantine.append({arrival_day: quarantined}, sync=sync)
            self.landing.append(landed, sync=sync)
            self.recent.add_batch(ids)
            result.accepted = len(ids)
            result.days.update(landed)
        return result

    def land_prevalidated(
        self, batch: fastpath.Prevalidated, *, sync: bool = True
    ) -> IntakeResult | None:
        """Land a batch validated elsewhere (``fastpath.prevalidate``, in a worker
        process of a bulk ingest) once no id of it was accepted before; None when one
        was: the caller then submits the batch's lines as usual, and each duplicate
        is refused with its reason."""
        # prevalidate refused any batch with an id twice, so the ids are distinct.
        with self._recent_lock:
            if not self.recent.claim(batch.event_ids):
                return None
            try:
                self.landing.append(batch.landed, sync=sync)
            except BaseException:
                self.recent.unclaim(batch.event_ids)
                raise
            self.recent.add_batch(batch.event_ids, claimed=True)
        n = batch.received
        return IntakeResult(received=n, accepted=n, days=set(batch.landed))

    def _contract(self, ev: RawEvent, limits: Limits, max_event: int) -> _Rejection | _Accepted:
        """One event through the pydantic contract: the reference for every decision."""
        obj = ev.parsed
        # No bytes means an item of a parsed array (blank lines never get here),
        # so a None there is the JSON null it holds, not "still to parse".
        if obj is None and ev.raw:
            if len(ev.raw) > max_event:
                return _Rejection(0, "too_large", f"event larger than {max_event} bytes")
            if not ev.raw.strip():
                return _Rejection(0, "empty", "empty line")
            try:
                obj = orjson.loads(ev.raw)
            except orjson.JSONDecodeError as exc:
                code, reason = _json_error(ev.raw, exc)
                return _Rejection(0, code, reason)
        if not isinstance(obj, dict):
            return _Rejection(0, "not_an_object", f"event must be a JSON object, got {_kind(obj)}")
        try:
            event = WeblogEvent.model_validate(obj, context=limits)
            line = orjson.dumps(normalize(event))
        except ValidationError as exc:
            return _Rejection(0, error_code(exc), describe_error(exc), obj.get("event_id"))
        except Exception as exc:  # one event never fails its batch
            # The contract should have refused it; whatever slipped through is
            # still accounted for (quarantined with its bytes), never a 500.
            log.warning("intake.unexpected_rejection", at=ev.locator, error=repr(exc))
            return _Rejection(
                0, "invalid_event", f"cannot be stored: {type(exc).__name__}: {exc}"[:300]
            )
        return _Accepted(0, event.event_id, event.ts, msgspec.Raw(line))

    def quarantine_raw(self, raw: bytes, code: str, reason: str, source: str, locator: str) -> None:
        """Keep bytes that never became events (an unparseable body, a cut-off file tail)."""
        self.quarantine.append({utc_today(): quarantine_record(raw, reason, code, source, locator)})

    def flush(self) -> None:
        """Make everything appended so far durable (quarantine first, as in a batch)."""
        self.quarantine.flush()
        self.landing.flush()

    def seal_expired(self) -> None:
        self.landing.seal_expired()
        self.quarantine.seal_expired()

    def close(self) -> None:
        self.quarantine.close()
        self.landing.close()


def _kind(obj: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(obj), "null" if obj is None else type(obj).__name__
    )


def _json_error(raw: bytes, exc: orjson.JSONDecodeError) -> tuple[str, str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return "not_utf8", f"not valid UTF-8 (byte {uexc.start})"
    msg = str(exc).split(":")[0]
    pos = getattr(exc, "pos", None)
    if pos is not None and pos >= len(raw.rstrip()):
        return "truncated", f"truncated JSON (input ends at column {pos + 1})"
    return "invalid_json", f"malformed JSON: {msg} at column {(pos or 0) + 1}"
