"""The weblog event contract.

The contract is what external log shippers, the collector, the simulator and the
training pipeline agree on, so it lives in one pydantic model; the published JSON
Schema (``recsys_serving/schemas/weblog_event.schema.json``) is generated from it
and a test keeps the two identical.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

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
MAX_CONTEXT_BYTES = 8 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    return value


def _coerce_ts(value: Any) -> float:
    """Accept RFC 3339 with an explicit offset or epoch seconds; store epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("must be an RFC 3339 string or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("epoch seconds must be finite")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from exc
        if parsed.tzinfo is None:
            raise ValueError("RFC 3339 timestamp must carry an offset (e.g. Z or +02:00)")
        return parsed.timestamp()
    raise ValueError("must be an RFC 3339 string or epoch seconds")


def _check_context(value: Any) -> Any:
    if isinstance(value, dict) and len(orjson.dumps(value)) > MAX_CONTEXT_BYTES:
        raise ValueError(f"context larger than {MAX_CONTEXT_BYTES} bytes")
    return value


Id = Annotated[
    str,
    BeforeValidator(_coerce_id),
    Field(min_length=1, max_length=MAX_ID_LENGTH),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_LENGTH,
            "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
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
            "description": "RFC 3339 with an offset, or epoch seconds.",
        }
    ),
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
    position: Annotated[int, Field(ge=0, le=10_000)] | None = Field(
        default=None, description="Rank at which the item was shown."
    )
    value: float | None = Field(default=None, description="Rating, price, ...", allow_inf_nan=False)
    model_version: Annotated[str, Field(max_length=128)] | None = None
    context: Annotated[dict[str, Any], BeforeValidator(_check_context)] | None = None


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


def normalize(event: WeblogEvent) -> dict[str, Any]:
    """The landing representation: contract-valid, ids as strings, ``ts`` in epoch seconds."""
    return event.model_dump(exclude_none=True)


def event_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


def json_schema() -> dict[str, Any]:
    schema = WeblogEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
