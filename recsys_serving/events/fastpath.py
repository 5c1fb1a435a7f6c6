"""A compiled validator for the common, valid event, in front of the pydantic contract.

Validating a line through :class:`~recsys_serving.events.schema.WeblogEvent` costs
~15 us; a bulk ingest of millions of lines needs ~1 us. msgspec decodes a line
straight into a typed Struct in C (strict types, unknown fields refused, the
contract's length and range bounds), and the rules msgspec cannot state (the
timestamp window, which moves with the clock; RFC 3339 strings; the context limits)
are checked over a whole batch here.

This path only ever *accepts*. A line it does not accept cleanly is handed back
(``FastBatch.rest``) and goes through the pydantic model as before, so every
rejection reason and every odd-but-valid event (a ``position`` of ``3.0``, a
timestamp with a ``+05:30:15`` offset) gets the one answer the contract gives; what
is accepted here lands as exactly the bytes the contract path would write.
``tests/serving/events/test_intake_fastpath.py`` checks the two paths line by line.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import numpy as np
import orjson
from msgspec import Meta

from recsys_serving.events.schema import (
    MAX_ABS_VALUE,
    MAX_ID_LENGTH,
    EventType,
    Limits,
    clean_context_bytes,
    coerce_timestamp,
)

if TYPE_CHECKING:
    from recsys_serving.settings import Settings

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# orjson (what the contract path parses with) reads integers in this range as int and
# larger ones as float, which an id refuses; msgspec reads any size as int.
_StrId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_Position = Annotated[int, Meta(ge=0, le=10_000)]
_Value = Annotated[float, Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
_ModelVersion = Annotated[str, Meta(max_length=128)]
_NO_CONTEXT = msgspec.Raw()
# The longest RFC 3339 string msgspec parses to the same instant as the contract:
# 19 characters of date and time, a fraction of at most 6 digits, "Z". Past 6
# digits msgspec rounds where ``datetime.fromisoformat`` truncates; longer strings
# (an offset and a fraction) are parsed by the contract's own function instead.
_MSGSPEC_TS_MAX_LEN = 27
_TS_CACHE_MAX = 4_096


def _struct(name: str, id_type: Any) -> type[msgspec.Struct]:
    """The event as a Struct, fields in the contract's order: encoding one with
    ``omit_defaults`` writes what ``orjson.dumps(normalize(event))`` writes."""
    return msgspec.defstruct(
        name,
        [
            ("event_id", id_type),
            ("event_type", EventType),
            ("user_id", id_type),
            ("item_id", id_type),
            ("ts", float | str),
            ("session_id", id_type | None, None),
            ("request_id", id_type | None, None),
            ("position", _Position | None, None),
            ("value", _Value | None, None),
            ("model_version", _ModelVersion | None, None),
            ("context", msgspec.Raw, _NO_CONTEXT),
        ],
        forbid_unknown_fields=True,
        omit_defaults=True,
        # Never part of a cycle: untracked, so a million of them cost the collector nothing.
        gc=False,
    )


_Event = _struct("FastEvent", _StrId)
# Log shippers often send numeric ids: a second, rarer pass takes them as int too.
_EventIntIds = _struct("FastEventIntIds", _StrId | int)
_ID_FIELDS = ("event_id", "user_id", "item_id", "session_id", "request_id")
_DECODE = msgspec.json.Decoder(_Event).decode
_DECODE_INT_IDS = msgspec.json.Decoder(_EventIntIds).decode
_DATETIMES = msgspec.json.Decoder(list[Annotated[datetime, Meta(tz=True)]])
_DATETIME = msgspec.json.Decoder(Annotated[datetime, Meta(tz=True)])
_ENCODE = msgspec.json.Encoder()
_TS = attrgetter("ts")
_EVENT_ID = attrgetter("event_id")
# msgspec raises RecursionError past its nesting limit (a hostile context), not a
# DecodeError: either way the line is the contract path's to judge.
_DecodeError = (msgspec.DecodeError, RecursionError)


@dataclass(slots=True)
class FastBatch:
    """What the fast path decided about a batch of lines.

    ``positions[k]`` is the index (in the lines given) of the accepted event
    ``events[k]``, whose ``event_id`` and epoch ``ts`` are ``event_ids[k]`` and
    ``ts[k]``; ``rest`` are the indices left to the contract path, in order.
    """

    positions: list[int] = field(default_factory=list)
    events: list[msgspec.Struct] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)


def encode_lines(items: Sequence[Any]) -> bytes:
    """Accepted events (Structs, or ``msgspec.Raw`` landing lines) as NDJSON, one C call."""
    return _ENCODE.encode_lines(items)


def validate(
    lines: Sequence[bytes], limits: Limits, max_bytes: int, joined: bytes | None = None
) -> FastBatch:
    """Accept the lines that are certainly valid; hand back the others, in order.

    ``joined``: the lines' bytes as one buffer, when the caller has it (a block of a
    file), so it is not joined again for the few scans over the whole batch."""
    n = len(lines)
    if not n:
        return FastBatch()
    if joined is None:
        joined = b"\n".join(lines)
    # Escapes are the only way a JSON string gets control characters or a lone
    # surrogate, and DEL is the one control byte JSON lets through raw: lines with
    # either get their strings checked one by one (rare in logs).
    escaped = b"\\" in joined or b"\x7f" in joined
    has_context = b'"context"' in joined
    where: list[int] | None = None  # line index of each candidate, when not all are
    candidates = lines
    if len(joined) > max_bytes and max(map(len, lines)) > max_bytes:
        where = [i for i, line in enumerate(lines) if len(line) <= max_bytes]
        candidates = [lines[i] for i in where]
    del joined

    at, events = _decode(candidates)
    dropped: set[int] = set()
    if escaped:
        dropped.update(
            k
            for k, (i, event) in enumerate(zip(at, events, strict=True))
            if (b"\\" in candidates[i] or b"\x7f" in candidates[i]) and not _plain_strings(event)
        )
    if has_context:
        dropped.update(
            k
            for k, event in enumerate(events)
            if event.context and not _settle_context(event, event.context, limits)  # type: ignore[attr-defined]
        )
    ts = _timestamps(events)
    low, high = limits.ts_min, limits.ts_max()
    if ts and not (low <= min(ts) and max(ts) <= high):
        dropped.update(k for k, value in enumerate(ts) if not low <= value <= high)
    if dropped:
        keep = [k for k in range(len(events)) if k not in dropped]
        at = [at[k] for k in keep]
        events = [events[k] for k in keep]
        ts = [ts[k] for k in keep]
    positions = at if where is None else [where[k] for k in at]
    if len(positions) == n:
        rest: list[int] = []
    else:
        taken = set(positions)
        rest = [i for i in range(n) if i not in taken]
    return FastBatch(
        positions=positions,
        events=events,
        event_ids=list(map(_EVENT_ID, events)),
        ts=ts,
        rest=rest,
    )


def _decode(lines: Sequence[bytes]) -> tuple[list[int], list[msgspec.Struct]]:
    """The lines msgspec decodes (their indices, their events), in one C loop while
    they decode; only the others are looked at one by one."""
    events: list[msgspec.Struct] = []
    failed: list[int] = []
    decoded = map(_DECODE, lines)
    while True:
        try:
            events.extend(decoded)  # keeps what it decoded before a failure
            break
        except _DecodeError:
            failed.append(len(events) + len(failed))
    if not failed:
        return list(range(len(lines))), events
    numeric = [(i, e) for i in failed if (e := _with_int_ids(lines[i])) is not None]
    skip = set(failed)
    pairs = zip((i for i in range(len(lines)) if i not in skip), events, strict=True)
    merged = sorted([*pairs, *numeric], key=lambda pair: pair[0])
    return [i for i, _ in merged], [e for _, e in merged]


def _with_int_ids(line: bytes) -> msgspec.Struct | None:
    """The event with numeric ids (as the contract stores them: strings), or None.

    Integers past orjson's 64-bit range reach the contract as floats, which an id
    refuses, so those are left to it.
    """
    try:
        event = _DECODE_INT_IDS(line)
    except _DecodeError:
        return None
    for name in _ID_FIELDS:
        value = getattr(event, name)
        if value.__class__ is int:
            if not _INT64_MIN <= value <= _UINT64_MAX:
                return None
            setattr(event, name, str(value))
    return event


def _plain_strings(event: msgspec.Struct) -> bool:
    """No control character in the ids, ``model_version`` or a string ``ts``: what the
    contract refuses there (its context check covers the context)."""
    for name in (*_ID_FIELDS, "model_version", "ts"):
        value = getattr(event, name)
        if value.__class__ is str and not value.isprintable() and _unwritable(value):
            return False
    return True


def _unwritable(text: str) -> bool:
    """A control character, or a lone surrogate (which msgspec should never produce)."""
    return any(c < 0x20 or c == 0x7F or 0xD800 <= c <= 0xDFFF for c in map(ord, text))


def _settle_context(event: msgspec.Struct, raw: msgspec.Raw, limits: Limits) -> bool:
    """Replace the context's raw bytes by what the contract path lands; False when the
    contract would refuse the context or the line (the contract path says why)."""
    data = bytes(raw)
    if data == b"null":
        event.context = _NO_CONTEXT  # type: ignore[attr-defined]
        return True
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    landed = clean_context_bytes(value, limits)
    if landed is None:
        return False
    event.context = msgspec.Raw(landed)  # type: ignore[attr-defined]
    return True


def _timestamps(events: list[msgspec.Struct]) -> list[float]:
    """Epoch seconds of each event (inf where the contract must decide: out of any
    range), and string timestamps replaced by those seconds in the events, as they land."""
    values: list[Any] = list(map(_TS, events))
    texts = [v for v in set(values) if v.__class__ is str]
    if not texts:
        return values
    seconds = _parse_texts(texts)
    values = list(map(seconds.get, values, values))  # a float is never a key
    deque(map(setattr, events, repeat("ts"), values), maxlen=0)
    return values


def _parse_texts(texts: Collection[str]) -> dict[str, float]:
    """Each distinct timestamp string once (impressions of one response share theirs)."""
    seconds: dict[str, float] = {}
    short = [t for t in texts if len(t) <= _MSGSPEC_TS_MAX_LEN]
    if short:
        try:
            parsed = _DATETIMES.decode(_ENCODE.encode(short))
        except (*_DecodeError, UnicodeEncodeError):  # one bad string: each on its own
            parsed = [_one_datetime(t) for t in short]
        for text, value in zip(short, parsed, strict=True):
            if value is not None:
                seconds[text] = value.timestamp()
    for text in texts:
        if text not in seconds:  # longer, or a form msgspec refuses (" 2026-...Z")
            seconds[text] = _contract_seconds(text)
    return seconds


def _one_datetime(text: str) -> datetime | None:
    try:
        return _DATETIME.decode(_ENCODE.encode(text))
    except (*_DecodeError, UnicodeEncodeError):
        return None


def _contract_seconds(text: str) -> float:
    """The contract's own parse; whatever it refuses (or raises) is its to report."""
    try:
        return coerce_timestamp(text)
    except Exception:
        return math.inf


class DayRouter:
    """Accepted events as NDJSON per event date, in arrival order.

    Out-of-range timestamps land under the arrival date so the weblogs asset
    quarantines them with the business rule that explains why. Dates come from
    whole-batch arithmetic; the few events within 10 us before a midnight (where
    ``fromtimestamp`` rounds to the next day) are dated by ``_day`` itself. Needs no
    lake, so a worker process of a bulk ingest routes its blocks with it too.
    """

    def __init__(self, epoch: float) -> None:
        self.epoch = epoch  # events before the catalogue epoch land under the arrival date
        self._days: dict[int, str] = {}

    def route(
        self, items: list[Any], ts: list[float], latest_ok: float, arrival_day: str
    ) -> dict[str, bytes]:
        if not items:
            return {}
        seconds = np.asarray(ts, dtype=np.float64)
        index = np.floor_divide(seconds, 86_400.0)
        inside = (seconds >= self.epoch) & (seconds <= latest_ok)
        exact = inside & ((index + 1.0) * 86_400.0 - seconds >= 1e-5)
        if exact.all() and index.min() == index.max():
            return {self._date(int(index[0])): encode_lines(items)}
        codes = index.astype(np.int64)
        codes[~inside] = _day_index(arrival_day)
        for k in np.flatnonzero(inside & ~exact).tolist():
            codes[k] = _day_index(_day(ts[k]))
        order = np.argsort(codes, kind="stable")  # arrival order within a date
        cuts = np.flatnonzero(np.diff(codes[order])) + 1
        landed = {}
        for group in np.split(order, cuts):
            picked = group.tolist()
            day = self._date(int(codes[picked[0]]))
            landed[day] = encode_lines(
                itemgetter(*picked)(items) if len(picked) > 1 else [items[picked[0]]]
            )
        return landed

    def _date(self, index: int) -> str:
        day = self._days.get(index)
        if day is None:
            day = self._days[index] = _day(index * 86_400.0)
        return day


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


_EPOCH_DATE = date(1970, 1, 1)


def _day_index(day: str) -> int:
    """Days since 1970-01-01 of an ISO date (what ``_date`` turns back into it)."""
    return (date.fromisoformat(day) - _EPOCH_DATE).days


def catalog_epoch_seconds(settings: Settings) -> float:
    return datetime.combine(settings.events.catalog_epoch, datetime.min.time(), UTC).timestamp()


@dataclass(slots=True)
class Prevalidated:
    """A batch of lines every one of which the fast path accepted, with no id twice:
    its event ids (in order) and the bytes to land per date. Built where there is no
    lake and no memory of earlier batches (a worker process of a bulk ingest); the
    intake lands it (:meth:`EventIntake.land_prevalidated`) after its duplicate check."""

    received: int
    event_ids: list[str]
    landed: dict[str, bytes]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled with its ids as one string (a worker sends every batch back): a list
        of 20k short strings costs ~10x more to pickle than their join. The fast path
        never accepts an id with a control character, so a newline separates them;
        should one hold a newline anyway, the list is pickled as it is."""
        ids = self.event_ids
        joined = "\n".join(ids)
        if ids and joined.count("\n") == len(ids) - 1:
            return _prevalidated_from_joined, (self.received, joined, self.landed)
        return Prevalidated, (self.received, ids, self.landed)


def _prevalidated_from_joined(received: int, joined: str, landed: dict[str, bytes]) -> Prevalidated:
    return Prevalidated(received, joined.split("\n"), landed)


def prevalidate(
    lines: Sequence[bytes], settings: Settings, router: DayRouter, joined: bytes | None = None
) -> Prevalidated | None:
    """The intake's decision for a batch when it is the common one (every line valid,
    no id repeated), without the intake; None otherwise: the batch then goes through
    the intake as usual, which gives every rejection its reason. The clock is read
    here, as the intake reads it per batch. ``joined``: as for :func:`validate`."""
    now = time.time()
    limits = Limits.from_settings(settings, now=now)
    fast = validate(lines, limits, settings.collector.max_event_bytes, joined)
    if fast.rest or len(set(fast.event_ids)) != len(fast.event_ids):
        return None
    arrival_day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    latest_ok = now + settings.events.future_tolerance_seconds
    landed = router.route(fast.events, fast.ts, latest_ok, arrival_day)
    return Prevalidated(received=len(lines), event_ids=fast.event_ids, landed=landed)


__all__ = [
    "DayRouter",
    "FastBatch",
    "Prevalidated",
    "catalog_epoch_seconds",
    "encode_lines",
    "prevalidate",
    "validate",
]
