"""The processing function in front of the lake: validate, route, land or quarantine.

The collector endpoint and ``recsys ingest`` both go through :class:`EventIntake`,
so a file backfill and live traffic obey the same contract and the same accounting:
every event received is either landed or quarantined with its original bytes.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from recsys_serving.events.schema import (
    Limits,
    WeblogEvent,
    describe_error,
    error_code,
    normalize,
)
from recsys_serving.lake import Lake
from recsys_serving.landing import INTAKE_QUARANTINE_AREA, LANDING_AREA, SegmentWriter
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


def quarantine_record(raw: bytes, reason: str, code: str, source: str, locator: str) -> bytes:
    """One quarantine line; keeps the exact original bytes (base64 when not UTF-8)."""
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
    collector tell a client at once that it resent something.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        if self.capacity <= 0 or event_id in self._ids:
            return
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())


class EventIntake:
    """Validates events and writes them durably to landing or quarantine."""

    def __init__(self, lake: Lake, settings: Settings, writer_id: str | None = None) -> None:
        self.lake = lake
        self.settings = settings
        seg = {
            "writer_id": writer_id,
            "max_bytes": settings.landing_segment_max_bytes,
            "max_age_seconds": settings.landing_segment_max_age_seconds,
        }
        self.landing = SegmentWriter(lake, LANDING_AREA, **seg)
        self.quarantine = SegmentWriter(lake, INTAKE_QUARANTINE_AREA, **seg)
        self.recent = RecentIds(settings.dedup_cache_size)
        self._recent_lock = threading.Lock()
        self._epoch = datetime.combine(settings.catalog_epoch, datetime.min.time(), UTC).timestamp()

    def submit(self, events: Iterable[RawEvent], source: str) -> IntakeResult:
        """Validate a batch, make it durable, and report exactly what happened to each event."""
        result = IntakeResult()
        landed: dict[str, list[bytes]] = {}
        quarantined: list[bytes] = []
        now = time.time()
        arrival_day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        latest_ok = now + self.settings.future_tolerance_seconds
        max_event = self.settings.max_event_bytes
        limits = Limits.from_settings(self.settings, now=now)
        batch_ids: set[str] = set()

        def reject(ev: RawEvent, code: str, reason: str, event_id: Any = None) -> None:
            result.reject(ev.locator, code, reason, event_id)
            raw = ev.raw if ev.raw else reserialize(ev.parsed)
            quarantined.append(quarantine_record(raw, reason, code, source, ev.locator))

        with self._recent_lock:
            for ev in events:
                result.received += 1
                obj = ev.parsed
                # No bytes means an item of a parsed array (blank lines never get here),
                # so a None there is the JSON null it holds, not "still to parse".
                if obj is None and ev.raw:
                    if len(ev.raw) > max_event:
                        reject(ev, "too_large", f"event larger than {max_event} bytes")
                        continue
                    if not ev.raw.strip():
                        reject(ev, "empty", "empty line")
                        continue
                    try:
                        obj = orjson.loads(ev.raw)
                    except orjson.JSONDecodeError as exc:
                        code, reason = _json_error(ev.raw, exc)
                        reject(ev, code, reason)
                        continue
                if not isinstance(obj, dict):
                    reject(ev, "not_an_object", f"event must be a JSON object, got {_kind(obj)}")
                    continue
                try:
                    event = WeblogEvent.model_validate(obj, context=limits)
                    line = orjson.dumps(normalize(event)) + b"\n"
                except ValidationError as exc:
                    reject(ev, error_code(exc), describe_error(exc), obj.get("event_id"))
                    continue
                except Exception as exc:  # one event never fails its batch
                    # The contract should have refused it; whatever slipped through is
                    # still accounted for (quarantined with its bytes), never a 500.
                    log.warning("intake.unexpected_rejection", at=ev.locator, error=repr(exc))
                    reject(
                        ev, "invalid_event", f"cannot be stored: {type(exc).__name__}: {exc}"[:300]
                    )
                    continue
                if event.event_id in self.recent or event.event_id in batch_ids:
                    reject(
                        ev,
                        "duplicate_event_id",
                        f"event_id {event.event_id!r} was already accepted",
                        event.event_id,
                    )
                    continue
                batch_ids.add(event.event_id)
                # Out-of-range timestamps land under the arrival date so the weblogs
                # asset quarantines them with the business rule that explains why.
                day = _day(event.ts) if self._epoch <= event.ts <= latest_ok else arrival_day
                landed.setdefault(day, []).append(line)
                result.accepted += 1
            # Durable before answering: quarantine first so a crash between the two
            # writes can only duplicate a rejection, never lose an accepted event.
            if quarantined:
                self.quarantine.append({arrival_day: b"".join(quarantined)})
            self.landing.append({d: b"".join(lines) for d, lines in landed.items()})
            for event_id in batch_ids:
                self.recent.add(event_id)
            for day in landed:
                result.days.add(day)
        return result

    def quarantine_raw(self, raw: bytes, code: str, reason: str, source: str, locator: str) -> None:
        """Keep bytes that never became events (an unparseable body, a cut-off file tail)."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        self.quarantine.append({day: quarantine_record(raw, reason, code, source, locator)})

    def seal_expired(self) -> None:
        self.landing.seal_expired()
        self.quarantine.seal_expired()

    def close(self) -> None:
        self.landing.close()
        self.quarantine.close()


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


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
