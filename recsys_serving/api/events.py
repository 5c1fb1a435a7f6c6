"""``POST /events``: the collector, the log shipper's endpoint into the lake.

It can be deployed alone (``recsys collector``) or inside the recommendation
service. An accepted event is on disk (or in S3) before the answer leaves.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from recsys_serving.api.errors import ApiError, ErrorBody, json_response
from recsys_serving.events.intake import EventIntake, IntakeResult, RawEvent
from recsys_serving.events.schema import WeblogEvent
from recsys_serving.landing import iter_lines
from recsys_serving.settings import Settings

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/json-lines",
    "application/jsonlines",
}

router = APIRouter(tags=["events"])


class EventError(BaseModel):
    at: str = Field(description="Where in the batch: `index N` (JSON array) or `line N` (NDJSON).")
    code: str = Field(
        description="Machine-readable reason, e.g. `schema`, `truncated`, `duplicate_event_id`."
    )
    reason: str
    event_id: str | None = None


class IntakeResponse(BaseModel):
    received: int
    accepted: int = Field(description="Events written durably to the landing zone.")
    rejected: int = Field(description="Events written to quarantine with their reason.")
    reasons: dict[str, int]
    errors: list[EventError] = Field(description="The first 100 rejections.")
    errors_truncated: bool


async def get_intake(request: Request) -> EventIntake:
    return request.app.state.intake


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise ApiError(400, "bad_request", "invalid Content-Length header") from exc
        if size > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"body of {size} bytes exceeds the {limit}-byte limit; split the batch",
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413, "payload_too_large", f"body exceeds the {limit}-byte limit; split the batch"
            )
    return bytes(body)


@router.post(
    "/events",
    status_code=202,
    response_model=IntakeResponse,
    summary="Submit a batch of weblog events",
    description=(
        "A JSON array (or one object) with `Content-Type: application/json`, or NDJSON with "
        "`application/x-ndjson`. Each event is validated against the weblog contract; valid "
        "events are durable in the landing zone before `202` is returned, invalid ones are "
        "quarantined with their original bytes and listed with a reason. When every event is "
        "rejected the answer is `422` with the same body."
    ),
    responses={
        400: {"model": ErrorBody, "description": "Body is not parseable JSON."},
        413: {"model": ErrorBody, "description": "Body or batch too large."},
        415: {"model": ErrorBody, "description": "Unsupported Content-Type."},
        422: {
            "description": (
                "Every event in the batch was rejected (the per-event report), or the batch "
                "holds no events (an error body). Some rules of the contract are beyond what a "
                "JSON Schema states: `ts` within the plausible range around the receiver's "
                "clock, an `event_id` not accepted before."
            ),
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/IntakeResponse"},
                            {"$ref": "#/components/schemas/ErrorBody"},
                        ]
                    }
                }
            },
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {
                                "type": "array",
                                "minItems": 1,
                                "items": {"$ref": "#/components/schemas/WeblogEvent"},
                            },
                            {"$ref": "#/components/schemas/WeblogEvent"},
                        ]
                    }
                },
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def post_events(
    request: Request,
    intake: Annotated[EventIntake, Depends(get_intake)],
    settings: Annotated[Settings, Depends(get_settings_dep)],
) -> Response:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES | NDJSON_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'!r} not supported; "
            "use application/json or application/x-ndjson",
        )
    body = await _read_body(request, settings.collector.max_request_bytes)
    events = _split(body, ctype, intake)
    if not events:
        raise ApiError(422, "empty_batch", "the batch holds no events")
    if len(events) > settings.collector.max_batch_events:
        raise ApiError(
            413,
            "batch_too_large",
            f"{len(events)} events exceed the "
            f"{settings.collector.max_batch_events}-event batch limit; "
            "split the batch",
        )
    result = await run_in_threadpool(intake.submit, events, "collector")
    metrics = request.app.state.metrics
    metrics.events_landed("collector", result.accepted, result.reasons)
    for version, n in _accepted_clicks(events, result).items():
        metrics.clicks_for(version, n)
    status = 202 if result.accepted > 0 else 422
    return json_response(result.as_dict(), status_code=status)


def _split(body: bytes, ctype: str, intake: EventIntake) -> list[RawEvent]:
    if ctype in NDJSON_TYPES:
        return [RawEvent(f"line {n}", raw) for n, raw in iter_lines(body) if raw.strip()]
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Not an accepted batch, but still never dropped silently: keep the bytes.
        detail = _describe_json_error(body, exc)
        intake.quarantine_raw(body, "invalid_json", detail, "collector", "body")
        raise ApiError(400, "invalid_json", detail) from exc
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        intake.quarantine_raw(
            body, "not_an_array", "body must be a JSON array or object", "collector", "body"
        )
        raise ApiError(
            400, "invalid_json", "body must be a JSON array of events or one event object"
        )
    return [RawEvent(f"index {i}", b"", parsed=item) for i, item in enumerate(parsed)]


def _accepted_clicks(events: list[RawEvent], result: IntakeResult) -> dict[str, int]:
    """Accepted clicks that name the model that served them, by model version.

    The intake reports rejections by locator (the first 100); beyond that, click
    events not listed are re-validated against the contract, so only a duplicate in a
    batch with over 100 rejections could be miscounted.
    """
    clicks: list[tuple[str, str, Any]] = []
    for ev in events:
        obj = ev.parsed
        if obj is None:
            if b'"click"' not in ev.raw or b"model_version" not in ev.raw:
                continue
            try:
                obj = orjson.loads(ev.raw)
            except orjson.JSONDecodeError:
                continue
        if (
            isinstance(obj, dict)
            and obj.get("event_type") == "click"
            and isinstance(obj.get("model_version"), str)
        ):
            clicks.append((ev.locator, obj["model_version"], obj))
    if not clicks:
        return {}
    rejected = {e["at"] for e in result.errors}
    exact = result.rejected <= len(result.errors)
    counts: dict[str, int] = {}
    for locator, version, obj in clicks:
        if locator in rejected or (not exact and not _valid(obj)):
            continue
        counts[version] = counts.get(version, 0) + 1
    return counts


def _valid(obj: dict[str, Any]) -> bool:
    try:
        WeblogEvent.model_validate(obj)
    except ValidationError:
        return False
    return True


def _describe_json_error(body: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return f"body is not valid UTF-8 (byte {uexc.start})"
    if not body.strip():
        return "empty body"
    return f"malformed JSON: {str(exc).split(':')[0]} at byte {exc.pos}"


__all__ = ["router"]
