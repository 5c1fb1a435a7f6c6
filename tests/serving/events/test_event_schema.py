"""The weblog event contract: what is accepted, how it is normalized, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from recsys_serving.events.schema import WeblogEvent, describe_error, json_schema, normalize

SCHEMA_FILE = Path(__file__).parents[3] / "recsys_serving" / "schemas" / "weblog_event.schema.json"
BASE = {"event_id": "e1", "event_type": "click", "user_id": "u1", "item_id": "i1"}


def test_published_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "regenerate with `recsys schema --out recsys_serving/schemas/weblog_event.schema.json`"
    )
    jsonschema.Draft202012Validator.check_schema(json_schema())


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-25T10:00:00Z", 1795600800.0),
        ("2026-11-25T12:00:00+02:00", 1795600800.0),
        ("2026-11-25T10:00:00.250000+00:00", 1795600800.25),
        (1795600800, 1795600800.0),
        (1795600800.5, 1795600800.5),
    ],
)
def test_timestamps_rfc3339_with_offset_or_epoch_seconds(ts: object, expected: float) -> None:
    assert WeblogEvent.model_validate({**BASE, "ts": ts}).ts == expected


def test_numeric_ids_are_stored_as_strings() -> None:
    ev = normalize(WeblogEvent.model_validate({**BASE, "user_id": 7, "item_id": 42, "ts": 1}))
    assert ev["user_id"] == "7" and ev["item_id"] == "42"
    assert "session_id" not in ev  # absent optional fields stay absent


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"ts": "2026-11-25T10:00:00"}, "must carry an offset"),
        ({"ts": "yesterday"}, "not an RFC 3339"),
        ({"ts": True}, "not a boolean"),
        ({"event_type": "clack"}, "event_type"),
        ({"user_id": ""}, "must not be empty"),
        ({"user_id": "a\x00b"}, "control characters"),
        ({"user_id": "x" * 300}, "at most 256"),
        ({"user_id": True}, "not a boolean"),
        ({"position": -1}, "position"),
        ({"value": float("nan")}, "value"),
        ({"context": "not an object"}, "context"),
        ({"context": {"k": "v" * 10_000}}, "context larger"),
        ({"extra_field": 1}, "unknown field"),
    ],
)
def test_invalid_events_get_a_precise_reason(patch: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        WeblogEvent.model_validate({**BASE, "ts": 1, **patch})
    assert fragment in describe_error(exc.value)


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ValidationError) as exc:
        WeblogEvent.model_validate({"event_type": "view"})
    reason = describe_error(exc.value)
    for name in ("event_id", "user_id", "item_id", "ts"):
        assert f"{name}: required field missing" in reason


def test_normalized_landing_form_is_itself_contract_valid() -> None:
    full = {
        **BASE,
        "ts": "2026-11-25T10:00:00Z",
        "session_id": "s1",
        "request_id": "r1",
        "position": 3,
        "value": 4.5,
        "model_version": "v1",
        "context": {"device": "ios"},
    }
    landed = normalize(WeblogEvent.model_validate(full))
    jsonschema.validate(landed, json_schema())
    assert WeblogEvent.model_validate(landed) == WeblogEvent.model_validate(full)
