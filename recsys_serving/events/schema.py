"""The weblog event contract.

The contract is what external log shippers, the collector, the simulator and the
training pipeline agree on, so it lives in one pydantic model; the published JSON
Schema (``recsys_serving/schemas/weblog_event.schema.json``) is generated from it
and a test keeps the two identical.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from recsys_serving.layout import parse_rfc3339
from recsys_serving.settings import CollectorSettings, Settings, default_of

EVENT_TYPES: tuple[str, ...] = (
    "impression",
    "click",
    "view",
    "add_to_cart",
    "purchase",
    "rating",
)
EventType = Literal["impression", "click", "view", "add_to_cart", "purchase", "rating"]

MAX_ID_LENGTH = 256
# The intake limits' defaults are the collector settings' (declared once, there).
# orjson refuses to serialize deeper than 254 levels, and the landing line, the
# weblogs step and the document store all serialize ``context`` again: the depth limit
# stays far below that so no later step can be the first to notice.
MAX_CONTEXT_BYTES: int = default_of(CollectorSettings, "max_context_bytes")
MAX_CONTEXT_DEPTH: int = default_of(CollectorSettings, "max_context_depth")
EVENT_TS_MIN: date = default_of(CollectorSettings, "event_ts_min")
EVENT_MAX_FUTURE_SECONDS: float = default_of(CollectorSettings, "event_max_future_seconds")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# A rating, a price or a quantity: far past any of them, a finite ``value`` still
# overflows what training adds up (two ratings of 1e308 make an item's mean rating
# inf, and the blocking features-finite check then fails every retrain).
MAX_ABS_VALUE = 1e12

# Error types of the intake limits; the intake uses them as the rejection code.
LIMIT_CODES: frozenset[str] = frozenset(
    {"implausible_timestamp", "non_finite_number", "context_too_deep", "context_too_large"}
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a value must stay within so no later step (landing, weblogs, training)
    can fail on it; the defaults are the settings' defaults.

    ``now`` pins the clock the future bound is measured from (one per batch);
    None means the time of validation. Passed to validation as its context:
    ``WeblogEvent.model_validate(obj, context=limits)``.
    """

    ts_min: float = datetime.combine(EVENT_TS_MIN, datetime.min.time(), UTC).timestamp()
    max_future_seconds: float = EVENT_MAX_FUTURE_SECONDS
    context_max_depth: int = MAX_CONTEXT_DEPTH
    context_max_bytes: int = MAX_CONTEXT_BYTES
    now: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, now: float | None = None) -> Limits:
        return cls(
            ts_min=datetime.combine(
                settings.collector.event_ts_min, datetime.min.time(), UTC
            ).timestamp(),
            max_future_seconds=settings.collector.event_max_future_seconds,
            context_max_depth=settings.collector.max_context_depth,
            context_max_bytes=settings.collector.max_context_bytes,
            now=now,
        )

    def ts_max(self) -> float:
        return (time.time() if self.now is None else self.now) + self.max_future_seconds


DEFAULT_LIMITS = Limits()


def _limits(info: ValidationInfo) -> Limits:
    return info.context if isinstance(info.context, Limits) else DEFAULT_LIMITS


def _check_unicode(value: str) -> None:
    # Python strings can hold lone surrogates (a JSON parser other than orjson lets
    # "\ud800" through); no serializer downstream can write them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode (lone surrogate at character {exc.start})") from exc


def _coerce_id(value: Any) -> Any:
    # Log shippers often emit numeric ids; the contract stores them as strings so
    # "007" and 7 never collide silently. Booleans are a type error, not an id.
    if isinstance(value, bool):
        raise ValueError("must be a string, not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        _check_unicode(value)
    return value


def _coerce_ts(value: Any) -> float:
    """Accept RFC 3339 with an explicit offset or epoch seconds; store epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("must be an RFC 3339 string or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds):
            raise PydanticCustomError("non_finite_number", "epoch seconds must be finite")
        return seconds
    if isinstance(value, str):
        return parse_rfc3339(value).timestamp()
    raise ValueError("must be an RFC 3339 string or epoch seconds")


def _check_text(value: Any) -> Any:
    # A free string that reports and terminals print (model_version): no control
    # characters (NUL, terminal escapes) and nothing a serializer cannot write.
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        _check_unicode(value)
    return value


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 3.0; a boolean is never a number here.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_ts_range(value: float, info: ValidationInfo) -> float:
    """Refuse times no clock produced: they would land, then break the weblogs step
    (epoch microseconds overflow) or sit in a partition of the year 9999."""
    limits = _limits(info)
    latest = limits.ts_max()
    if limits.ts_min <= value <= latest:
        return value
    hint = ""
    if 1e11 <= abs(value) < 1e17:
        hint = " (milliseconds or microseconds? send epoch seconds)"
    raise PydanticCustomError(
        "implausible_timestamp",
        "{ts} is outside the plausible range {start} .. {end}{hint}",
        {"ts": f"{value:.17g}", "start": _iso(limits.ts_min), "end": _iso(latest), "hint": hint},
    )


def _json_problem(value: Any, max_depth: int) -> tuple[str, str] | None:
    """The first value no serializer or later step can take, as (code, reason).

    Iterative: a hostile nesting depth must not become Python recursion.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "context")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return (
                    "context_too_deep",
                    f"nests deeper than {max_depth} levels (at {where[:120]})",
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str):
                    _check_unicode(key)
                stack.append(
                    (
                        child,
                        depth + 1,
                        f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]",
                    )
                )
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int):
            if not _INT64_MIN <= node <= _UINT64_MAX:
                return ("schema", f"integer out of the 64-bit range at {where[:120]}")
        elif isinstance(node, float):
            if not math.isfinite(node):
                return ("non_finite_number", f"non-finite number at {where[:120]}")
        elif isinstance(node, str):
            _check_unicode(node)
        else:
            return ("schema", f"unsupported value of type {type(node).__name__} at {where[:120]}")
    return None


def _check_context(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, dict):
        return value  # the type check names it
    limits = _limits(info)
    # Size first, with the fast serializer, so the walk below only ever sees a small
    # context; a context it cannot even serialize is described by the walk.
    try:
        size = len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):
        size = 0
    if size > limits.context_max_bytes:
        raise PydanticCustomError(
            "context_too_large",
            "context larger than {limit} bytes",
            {"limit": limits.context_max_bytes},
        )
    problem = _json_problem(value, limits.context_max_depth)
    if problem is not None:
        code, reason = problem
        if code == "schema":
            raise ValueError(reason)
        raise PydanticCustomError(code, reason)
    if size == 0:
        raise ValueError("context cannot be serialized as JSON")
    return value


def coerce_timestamp(value: Any) -> float:
    """Epoch seconds of an RFC 3339 string or a number, exactly as the contract reads
    ``ts`` (the bulk fast path parses the forms msgspec cannot with this)."""
    return _coerce_ts(value)


def clean_context_bytes(value: Any, limits: Limits) -> bytes | None:
    """``value`` serialized as a landing line holds it when the contract accepts it as
    ``context``; None when the contract refuses it (its validator then says why).

    The same checks as ``_check_context`` in the same order, for the bulk fast path.
    """
    if not isinstance(value, dict):
        return None
    try:
        data = orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        return None
    if len(data) > limits.context_max_bytes:
        return None
    try:
        if _json_problem(value, limits.context_max_depth) is not None:
            return None
    except ValueError:
        return None
    return data


Id = Annotated[
    str,
    BeforeValidator(_coerce_id),
    Field(min_length=1, max_length=MAX_ID_LENGTH),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_ID_LENGTH,
                    "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
                },
                {"type": "integer"},
            ],
            "description": "A string id (integers are accepted and stored as strings).",
        }
    ),
]
Timestamp = Annotated[
    float,
    BeforeValidator(_coerce_ts),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
            "description": (
                "RFC 3339 with an offset, or epoch seconds; from 1970-01-01 "
                "(RECSYS_EVENT_TS_MIN) to one day past the receiver's clock "
                "(RECSYS_EVENT_MAX_FUTURE_SECONDS)."
            ),
        }
    ),
    AfterValidator(_check_ts_range),
]


class WeblogEvent(BaseModel):
    """One user interaction; unknown top-level fields are refused (use ``context``)."""

    model_config = ConfigDict(
        extra="forbid",
        title="WeblogEvent",
        json_schema_extra={"$id": "https://recsys.dev/schemas/weblog_event.schema.json"},
    )

    event_id: Id = Field(description="Unique id; the dedup key.")
    event_type: EventType
    user_id: Id
    item_id: Id
    ts: Timestamp
    session_id: Id | None = None
    request_id: Id | None = Field(
        default=None, description="The recommendation response an impression or click came from."
    )
    # Strict: a number, never a boolean or a numeric string (what the schema says).
    position: (
        Annotated[int, BeforeValidator(_integral), Field(ge=0, le=10_000, strict=True)] | None
    ) = Field(default=None, description="Rank at which the item was shown.")
    value: (
        Annotated[
            float,
            Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE),
        ]
        | None
    ) = Field(default=None, description="Rating, price, ...; at most 1e12 in magnitude.")
    model_version: (
        Annotated[
            str,
            Field(max_length=128, pattern="^[^\\u0000-\\u001f\\u007f]*$"),
            BeforeValidator(_check_text),
        ]
        | None
    ) = None
    context: Annotated[dict[str, Any], BeforeValidator(_check_context)] | None = Field(
        default=None,
        description="Free attributes: a JSON object of at most 8 KiB nested at most 32 "
        "levels (RECSYS_MAX_CONTEXT_BYTES, RECSYS_MAX_CONTEXT_DEPTH).",
    )


def describe_error(exc: ValidationError) -> str:
    """Turn a pydantic error into one short reason a log shipper's operator can act on."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (put free attributes under 'context')"
        elif err["type"] == "missing":
            msg = "required field missing"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def error_code(exc: ValidationError) -> str:
    """``schema``, or the intake limit the event broke (a rejection code of its own)."""
    for err in exc.errors(include_url=False, include_input=False):
        if err["type"] in LIMIT_CODES:
            return err["type"]
        if err["type"] == "finite_number":
            return "non_finite_number"
    return "schema"


def normalize(event: WeblogEvent) -> dict[str, Any]:
    """The landing representation: contract-valid, ids as strings, ``ts`` in epoch seconds."""
    return event.model_dump(exclude_none=True)


def json_schema() -> dict[str, Any]:
    schema = WeblogEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
