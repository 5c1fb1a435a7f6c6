"""POST /events: the collector's answers to good and bad input, and its accounting."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from recsys_serving.api.app import create_app
from recsys_serving.landing import list_sealed
from recsys_serving.settings import Settings
from support import ndjson_lines

NOW = time.time()


def ev(i: int, **extra: object) -> dict[str, object]:
    return {
        "event_id": f"e{i}",
        "event_type": "click",
        "user_id": f"u{i % 5}",
        "item_id": "i1",
        "ts": NOW - 60,
        **extra,
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, max_request_bytes=200_000, max_batch_events=1_000)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, collector_only=True)) as c:
        yield c


def landed(client: TestClient) -> list[dict[str, object]]:
    client.app.state.intake.close()  # seal open segments so they are visible
    return ndjson_lines(client.app.state.lake, "landing/")


def quarantined(client: TestClient) -> list[dict[str, object]]:
    client.app.state.intake.close()
    return ndjson_lines(client.app.state.lake, "quarantine/intake/")


def test_json_array_batch_is_accepted_and_durable(client: TestClient) -> None:
    r = client.post("/events", json=[ev(i) for i in range(10)])
    assert r.status_code == 202
    body = r.json()
    assert body == {
        "received": 10,
        "accepted": 10,
        "rejected": 0,
        "reasons": {},
        "errors": [],
        "errors_truncated": False,
    }
    # Durable before the answer: the bytes are already in the open segment on disk.
    open_files = list((client.app.state.lake.root / "landing" / "_open").rglob("*.ndjson"))
    assert sum(f.read_bytes().count(b"\n") for f in open_files) == 10
    assert {e["event_id"] for e in landed(client)} == {f"e{i}" for i in range(10)}


def test_single_object_and_v1_alias(client: TestClient) -> None:
    assert client.post("/v1/events", json=ev(1)).json()["accepted"] == 1


def test_ndjson_with_bad_lines_names_each_line_and_quarantines_original_bytes(
    client: TestClient,
) -> None:
    good = orjson.dumps(ev(1))
    body = b"\n".join(
        [
            good,
            b'{"event_id": "e2", "event_type": "click", "user_id": "u',  # truncated
            orjson.dumps(ev(3, event_type="teleport")),  # unknown event type
            orjson.dumps({k: v for k, v in ev(4).items() if k != "user_id"}),  # missing id
            orjson.dumps(ev(5, position="third")),  # wrong type
            b'{"event_id": "e6", "caf\xe9": 1}',  # not UTF-8
            b"[1, 2]",
            b"",
        ]
    )
    r = client.post("/events", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202
    out = r.json()
    assert (out["received"], out["accepted"], out["rejected"]) == (7, 1, 6)
    at = {e["at"]: e for e in out["errors"]}
    assert at["line 2"]["code"] == "truncated"
    assert at["line 3"]["code"] == "schema" and "event_type" in at["line 3"]["reason"]
    assert "user_id: required field missing" in at["line 4"]["reason"]
    assert "position" in at["line 5"]["reason"]
    assert at["line 6"]["code"] == "not_utf8"
    assert at["line 7"]["code"] == "not_an_object"
    q = {row["at"]: row for row in quarantined(client)}
    assert q["line 2"]["raw"].encode() == body.split(b"\n")[1]
    assert base64.b64decode(q["line 6"]["raw_b64"]) == b'{"event_id": "e6", "caf\xe9": 1}'
    assert all(row["source"] == "collector" and row["reason"] for row in q.values())


def test_every_event_is_landed_or_quarantined(client: TestClient) -> None:
    sent = 0
    for batch in range(5):
        events: list[object] = [ev(batch * 100 + i) for i in range(40)]
        events += [{"event_id": f"bad{batch}-{i}"} for i in range(3)]
        events += [ev(batch * 100)]  # in-batch duplicate
        sent += len(events)
        r = client.post("/events", json=events)
        assert r.status_code == 202
        assert r.json()["received"] == r.json()["accepted"] + r.json()["rejected"]
    assert len(landed(client)) + len(quarantined(client)) == sent
    assert len(landed(client)) == 200


def test_resent_batch_is_answered_precisely(client: TestClient) -> None:
    batch = [ev(i) for i in range(5)]
    assert client.post("/events", json=batch).status_code == 202
    again = client.post("/events", json=batch)
    assert again.status_code == 422
    assert again.json()["reasons"] == {"duplicate_event_id": 5}
    assert "already accepted" in again.json()["errors"][0]["reason"]
    assert len(landed(client)) == 5 and len(quarantined(client)) == 5


def test_all_invalid_batch_is_422_with_reasons(client: TestClient) -> None:
    r = client.post("/events", json=[{"event_id": "x"}, {"nope": 1}])
    assert r.status_code == 422
    assert r.json()["rejected"] == 2 and r.json()["accepted"] == 0


def test_oversized_body_is_413(client: TestClient, settings: Settings) -> None:
    big = orjson.dumps([ev(i, context={"pad": "x" * 1000}) for i in range(300)])
    assert len(big) > settings.collector.max_request_bytes
    r = client.post("/events", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b" " * 10_000

    r = client.post("/events", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_too_many_events_is_413(client: TestClient) -> None:
    r = client.post(
        "/events",
        content=b"\n".join(orjson.dumps({"e": i}) for i in range(1_001)),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 413 and r.json()["error"] == "batch_too_large"


def test_malformed_json_is_400_and_kept(client: TestClient) -> None:
    r = client.post(
        "/events", content=b'[{"event_id": ', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_json" and "byte" in r.json()["detail"]
    assert quarantined(client)[0]["raw"] == '[{"event_id": '


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", ""])
def test_wrong_content_type_is_415(client: TestClient, ctype: str) -> None:
    r = client.post("/events", content=b"[]", headers={"Content-Type": ctype})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


def test_empty_batch_is_422(client: TestClient) -> None:
    r = client.post("/events", json=[])
    assert r.status_code == 422 and r.json()["error"] == "empty_batch"


def test_unknown_route_and_method_get_json_errors(client: TestClient) -> None:
    assert client.get("/nope").json() == {"error": "not_found", "detail": "Not Found"}
    r = client.get("/events")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_events_route_by_event_date_and_out_of_range_by_arrival(client: TestClient) -> None:
    old = ev(1, ts="2026-01-02T03:04:05Z")
    future = ev(2, ts=NOW + 3_600)  # past the clock-skew tolerance, within a day
    before = time.strftime("%Y-%m-%d", time.gmtime())
    assert client.post("/events", json=[old, future]).json()["accepted"] == 2
    after = time.strftime("%Y-%m-%d", time.gmtime())
    client.app.state.intake.close()
    dates = {f.date for f in list_sealed(client.app.state.lake)}
    assert dates in ({"2026-01-02", before}, {"2026-01-02", after})  # arrival day, midnight-safe


def test_idle_segments_are_sealed_in_the_background(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, landing_segment_max_age_seconds=0.2)
    with TestClient(create_app(settings, collector_only=True)) as c:
        assert c.post("/events", json=[ev(1)]).status_code == 202
        deadline = time.time() + 5
        while not list_sealed(c.app.state.lake) and time.time() < deadline:
            time.sleep(0.1)
        assert len(list_sealed(c.app.state.lake)) == 1


def test_openapi_documents_the_collector(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/events" in spec["paths"]
    contract = spec["components"]["schemas"]["WeblogEvent"]
    assert set(contract["required"]) == {"event_id", "event_type", "user_id", "item_id", "ts"}
    body = spec["paths"]["/events"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-ndjson"} <= set(body)
