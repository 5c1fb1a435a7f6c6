"""Regression tests for the hostile-client probes of issue 12 (items 1, 3 and 7).

Each probe goes through every way into the lake: ``POST /events`` on the service
(with an API key) and on the collector alone, and ``recsys ingest`` through the
CLI. The bar is the same everywhere: a value that could break a later step is
refused with a JSON (or ``file:line``) reason, every other event of the batch or
file lands, and the accounting is exact (accepted + rejected == sent, and what
was accepted is exactly what landed and was processed).
"""

from __future__ import annotations

import calendar
import gzip
import socket
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from recsys_assets.cli import app as cli
from recsys_serving.api.app import create_app
from recsys_serving.lake import LocalLake, read_parquet
from recsys_serving.landing import SegmentWriter
from recsys_serving.layout import LANDING_AREA, weblogs_key, weblogs_quarantine_key
from recsys_serving.settings import Settings
from serving_support import new_key, running_app, service_settings
from support import ndjson_lines

NOW = time.time()
runner = CliRunner()


def ev(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "event_type": "view",
        "user_id": f"u{i}",
        "item_id": "i1",
        "ts": NOW - 3_600,
        **extra,
    }


def nested(depth: int) -> dict[str, Any]:
    """A context object nested ``depth`` levels deep ({"a": {"a": ... 1}})."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_bytes(depth: int) -> bytes:
    # Built as text: neither orjson nor the json module writes past their own limits.
    return b'{"a":' * depth + b"1" + b"}" * depth


def raw_event(i: int, field: str, value: bytes) -> bytes:
    """An NDJSON line whose ``field`` holds exactly ``value`` (no serializer between)."""
    base = {k: v for k, v in ev(i).items() if k != field}
    return orjson.dumps(base)[:-1] + b',"' + field.encode() + b'":' + value + b"}"


# Every probe: an NDJSON line no step after the intake could survive, and the
# rejection code that must name it.
PROBES: dict[str, tuple[bytes, str]] = {
    "ts_1e308": (raw_event(1, "ts", b"1e308"), "implausible_timestamp"),
    "ts_1e20": (raw_event(2, "ts", b"1e20"), "implausible_timestamp"),
    "ts_negative": (raw_event(3, "ts", b"-1e12"), "implausible_timestamp"),
    "ts_milliseconds": (raw_event(4, "ts", str(int(NOW * 1000)).encode()), "implausible_timestamp"),
    "ts_two_days_ahead": (
        raw_event(5, "ts", str(NOW + 2 * 86_400).encode()),
        "implausible_timestamp",
    ),
    "ts_year_9999": (raw_event(6, "ts", b'"9999-12-31T23:59:59Z"'), "implausible_timestamp"),
    "ts_year_1": (raw_event(7, "ts", b'"0001-01-01T00:00:00Z"'), "implausible_timestamp"),
    "ts_overflowing_integer": (raw_event(8, "ts", b"1" + b"0" * 400), "invalid_json"),
    "ts_inf": (raw_event(9, "ts", b"1e400"), "invalid_json"),
    "ts_nan": (raw_event(10, "ts", b"NaN"), "invalid_json"),
    "value_inf": (raw_event(11, "value", b"-1e400"), "invalid_json"),
    "position_huge": (raw_event(12, "position", b"1e30"), "schema"),
    "context_depth_33": (raw_event(13, "context", nested_bytes(33)), "context_too_deep"),
    "context_depth_254": (raw_event(14, "context", nested_bytes(254)), "context_too_deep"),
    "context_depth_300": (raw_event(15, "context", nested_bytes(300)), "context_too_deep"),
    "context_depth_1100": (raw_event(16, "context", nested_bytes(1100)), "invalid_json"),
    "context_list_depth_500": (
        raw_event(17, "context", b'{"l":' + b"[" * 500 + b"]" * 500 + b"}"),
        "context_too_deep",
    ),
    "context_too_large": (
        raw_event(18, "context", orjson.dumps({"k": "v" * 9_000})),
        "context_too_large",
    ),
    "context_integer_past_64_bits": (
        raw_event(19, "context", b'{"n": 1' + b"0" * 30 + b"}"),
        None,  # orjson reads it as a float: harmless, and accepted
    ),
    "lone_surrogate": (raw_event(20, "user_id", b'"\\ud800"'), "invalid_json"),
    "id_float": (raw_event(21, "user_id", b"1e30"), "schema"),
}
HOSTILE = {k: v for k, v in PROBES.items() if v[1] is not None}


def test_the_limits_admit_what_real_data_holds() -> None:
    """MovieLens-shaped backfills (1997-2003), a near-future clock skew, a 32-deep context."""
    for ts in ("1997-09-20T03:05:10Z", 874_724_710, NOW + 3_600, 1):
        from recsys_serving.events.schema import WeblogEvent

        assert WeblogEvent.model_validate({**ev(1), "ts": ts, "context": nested(32)})


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(params=["service", "collector"])
def http(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, dict]]:
    """``POST /events`` as the service answers it (with a key) and as the collector does."""
    if request.param == "service":
        settings = service_settings(tmp_path / "home")
        headers = {"X-API-Key": new_key(settings, "events")}
        app = create_app(settings, docstore=None)
    else:
        settings = Settings(home=tmp_path / "home")
        headers = {}
        app = create_app(settings, collector_only=True)
    with TestClient(app) as client:
        yield client, headers


def _landed_and_quarantined(client: TestClient) -> tuple[list[dict], list[dict]]:
    client.app.state.intake.close()  # seal the open segments
    lake = client.app.state.lake
    return ndjson_lines(lake, "landing/"), ndjson_lines(lake, "quarantine/intake/")


@pytest.mark.parametrize("probe", sorted(HOSTILE))
def test_a_hostile_event_alone_gets_a_json_422_with_its_reason(
    http: tuple[TestClient, dict], probe: str
) -> None:
    client, headers = http
    line, code = HOSTILE[probe]
    r = client.post(
        "/events", content=line, headers={**headers, "Content-Type": "application/x-ndjson"}
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert (body["received"], body["accepted"], body["rejected"]) == (1, 0, 1)
    assert body["errors"][0]["code"] == code and body["errors"][0]["reason"]
    landed, quarantined = _landed_and_quarantined(client)
    assert landed == [] and len(quarantined) == 1
    assert quarantined[0]["code"] == code


def test_a_batch_with_every_probe_keeps_every_valid_event(http: tuple[TestClient, dict]) -> None:
    client, headers = http
    good = [orjson.dumps(ev(f"ok{i}")) for i in range(5)]
    lines = [*good[:2], *(line for line, _ in PROBES.values()), *good[2:]]
    r = client.post(
        "/events",
        content=b"\n".join(lines),
        headers={**headers, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    harmless = len(PROBES) - len(HOSTILE)
    assert body["received"] == len(lines)
    assert body["accepted"] == len(good) + harmless
    assert body["accepted"] + body["rejected"] == len(lines)
    assert sorted(body["reasons"].items()) == sorted(
        _count(code for _, code in HOSTILE.values()).items()
    )
    landed, quarantined = _landed_and_quarantined(client)
    assert len(landed) == body["accepted"] and len(quarantined) == body["rejected"]
    assert {e["event_id"] for e in landed} >= {f"eok{i}" for i in range(5)}


@pytest.mark.parametrize("depth", [253, 254, 300, 1000])
def test_deep_context_in_a_json_array_is_refused_not_a_500(
    http: tuple[TestClient, dict], depth: int
) -> None:
    client, headers = http
    body = (
        b"[" + orjson.dumps(ev("ok")) + b"," + raw_event(1, "context", nested_bytes(depth)) + b"]"
    )
    r = client.post(
        "/events", content=body, headers={**headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 202, r.text
    answer = r.json()
    assert (answer["accepted"], answer["rejected"]) == (1, 1)
    assert answer["errors"][0]["code"] == "context_too_deep"
    assert answer["errors"][0]["at"] == "index 1"
    landed, quarantined = _landed_and_quarantined(client)
    assert [e["event_id"] for e in landed] == ["eok"]
    assert len(quarantined) == 1 and quarantined[0]["at"] == "index 1"


def test_a_whole_body_nested_past_the_parser_is_a_json_400(http: tuple[TestClient, dict]) -> None:
    client, headers = http
    r = client.post(
        "/events",
        content=b"[" * 5_000 + b"]" * 5_000,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"


def _count(codes: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for code in codes:
        out[code] = out.get(code, 0) + 1
    return out


# ---------------------------------------------------------------------- recsys ingest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    yield tmp_path / "home"


def _parquet_rows(lake: LocalLake, prefix: str) -> pl.DataFrame:
    frames = [read_parquet(lake, o.key) for o in lake.list(prefix) if o.key.endswith(".parquet")]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def test_ingest_of_every_probe_lands_every_valid_line_and_processes(
    home: Path, tmp_path: Path
) -> None:
    f = tmp_path / "hostile.ndjson"
    good = [orjson.dumps(ev(f"ok{i}")) for i in range(20)]
    lines = good[:10] + [line for line, _ in PROBES.values()] + good[10:]
    f.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(cli, ["ingest", str(f), "--show-errors", "100"])
    assert result.exit_code == 0, result.output
    rejected = len(HOSTILE)
    accepted = len(lines) - rejected
    assert (
        f"ingested {len(lines)} events from 1 file(s): {accepted} landed, {rejected} quarantined"
        in result.output
    )
    for n, (_line, code) in enumerate(PROBES.values(), 11):
        if code is not None:
            assert f"{f}:{n}: {code}" in result.output
    assert "Traceback" not in result.output
    assert "succeeded" in result.output
    lake = LocalLake(home / "lake")
    landed = ndjson_lines(lake, "landing/")
    quarantined = ndjson_lines(lake, "quarantine/intake/")
    assert len(landed) == accepted and len(quarantined) == rejected
    weblogs = _parquet_rows(lake, "weblogs/")
    later = _parquet_rows(lake, "quarantine/weblogs/")
    assert weblogs.height + later.height == accepted  # nothing accepted was lost
    assert {f"eok{i}" for i in range(20)} <= set(weblogs["event_id"].to_list())


def test_ingest_json_array_with_an_item_nested_past_the_parser_lands_the_rest(
    home: Path, tmp_path: Path
) -> None:
    f = tmp_path / "deep.json"
    items = [orjson.dumps(ev(f"ok{i}")) for i in range(4)]
    items.insert(2, raw_event(1, "context", nested_bytes(5_000)))
    f.write_bytes(b"[" + b",\n".join(items) + b"]")
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 0, result.output
    assert f"{f}:item 2: context_too_deep" in result.output
    assert "ingested 5 events from 1 file(s): 4 landed, 1 quarantined" in result.output


def test_ingest_of_a_wholly_rejected_file_exits_non_zero_with_a_summary(
    home: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"\n".join(line for line, _ in HOSTILE.values()) + b"\n")
    result = runner.invoke(cli, ["ingest", str(bad)])
    assert result.exit_code == 1, result.output
    assert f"{bad}: all {len(HOSTILE)} events rejected" in result.output
    assert f"ingested {len(HOSTILE)} events from 1 file(s): 0 landed" in result.output
    assert "Traceback" not in result.output
    # ...and one bad file among good ones still fails the command, after the rest landed.
    good = tmp_path / "good.ndjson"
    good.write_bytes(orjson.dumps(ev("fine")) + b"\n")
    result = runner.invoke(cli, ["ingest", str(bad), str(good), "--no-process"])
    assert result.exit_code == 1
    assert f"{bad}: all {len(HOSTILE)} events rejected" in result.output
    assert f"{good}: all" not in result.output and "1 landed" in result.output


# ------------------------------------------------------- processing, behind the intake


def test_processing_quarantines_rows_it_cannot_convert_and_the_run_succeeds(
    home: Path,
) -> None:
    """A sealed landing file written past the intake (an old version, a hand copy): the
    weblogs step quarantines what it cannot convert, keeps the rest, and succeeds."""
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 86_400))
    t = calendar.timegm(time.strptime(day + " 12", "%Y-%m-%d %H"))
    good = [orjson.dumps(ev(f"ok{i}", ts=t + i)) for i in range(6)]
    hostile = {
        "ts_1e308": raw_event(1, "ts", b"1e308"),
        "ts_1e20": raw_event(2, "ts", b"1e20"),
        "ts_minus_1e20": raw_event(3, "ts", b"-1e20"),
        "ts_inf": raw_event(4, "ts", b"1e400"),
        "value_inf": raw_event(5, "value", b"1e400"),
        "ts_string": raw_event(6, "ts", b'"soon"'),
        "deep_context": raw_event(7, "context", nested_bytes(3_000)),
    }
    lake = LocalLake(home / "lake")
    writer = SegmentWriter(lake, LANDING_AREA, writer_id="hand-copy")
    writer.append(
        {day: b"".join(line + b"\n" for line in [*good[:3], *hostile.values(), *good[3:]])}
    )
    writer.close()

    result = runner.invoke(cli, ["process"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    assert "6 rows" in result.output and f"{len(hostile)} quarantined" in result.output
    weblogs = read_parquet(lake, weblogs_key(day))
    assert sorted(weblogs["event_id"].to_list()) == [f"eok{i}" for i in range(6)]
    q = read_parquet(lake, weblogs_quarantine_key(day))
    assert q.height == len(hostile)
    assert q["reason"].null_count() == 0 and q["detail"].null_count() == 0
    reasons = q["reason"].value_counts().sort("reason")
    assert dict(zip(reasons["reason"], reasons["count"], strict=True)) == {
        "invalid_timestamp": 3,  # 1e308, 1e20, -1e20: no datetime holds them
        "corrupt_landing_line": 4,  # not JSON orjson reads (1e400), a string ts, too deep
    }


# ------------------------------------------------------- HTTP details (issue 12, item 7)


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The service under uvicorn with the protocol `recsys serve` runs (no model needed)."""
    settings = service_settings(tmp_path_factory.mktemp("hostile-http") / "home")
    key = new_key(settings, "recommend,events,admin")
    app = create_app(settings, docstore=None)
    with running_app(app, wait_ready=False) as base:
        yield base, key


def _json_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"]
    return body


@pytest.mark.parametrize("path", ["/healthz", "/recommendations/u1", "/events"])
def test_a_too_long_url_gets_a_json_400(real_server: tuple[str, str], path: str) -> None:
    base, key = real_server
    target = f"{path}?" + "&".join(f"exclude=i{n:0>200}" for n in range(400))  # ~80 KB
    # http.client, as httpx refuses to send a URL this long itself.
    conn = HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", target, headers={"X-API-Key": key})
        raw = conn.getresponse()
        r = httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
    finally:
        conn.close()
    body = _json_error(r, 400)
    assert body["error"] == "bad_request" and "64 KiB" in body["detail"]
    # The server is fine afterwards (the refused connection was closed, not the server).
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/recommendations/%ff",
        "/similar/a%C3%28b",  # an invalid 2-byte sequence
        "/recommendations/u1?exclude=%fe",
        "/v1/recommendations/u1?category=%80",
    ],
)
def test_an_invalid_utf8_percent_escape_is_a_422_not_u_fffd(
    real_server: tuple[str, str], path: str
) -> None:
    base, key = real_server
    body = _json_error(httpx.get(base + path, headers={"X-API-Key": key}, timeout=10), 422)
    assert body["error"] == "invalid_request"
    assert body["detail"][0]["type"] == "invalid_percent_encoding"
    # A correctly encoded non-ASCII id (and an encoded U+FFFD itself) is still fine.
    r = httpx.get(f"{base}/recommendations/%C3%BC%EF%BF%BD", headers={"X-API-Key": key})
    assert r.status_code in (200, 503), r.text  # 503: this server has no model
    assert r.status_code == 200 or r.json()["error"] != "invalid_request"


def test_405_lists_every_method_of_the_path(real_server: tuple[str, str]) -> None:
    base, key = real_server
    for prefix in ("", "/v1"):
        for alias in ("production", "candidate"):
            r = httpx.post(f"{base}{prefix}/admin/aliases/{alias}", headers={"X-API-Key": key})
            _json_error(r, 405)
            assert r.headers["allow"] == "DELETE, PUT"
    r = httpx.get(f"{base}/events", headers={"X-API-Key": key})
    _json_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.delete(f"{base}/recommendations/u1", headers={"X-API-Key": key})
    _json_error(r, 405)
    assert r.headers["allow"] == "GET"


def test_the_openapi_documents_what_the_routes_answer(real_server: tuple[str, str]) -> None:
    base, key = real_server
    spec = httpx.get(f"{base}/openapi.json").json()
    post = spec["paths"]["/events"]["post"]
    # An empty batch is invalid by the schema, and its 422 error body is documented.
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["oneOf"][0]["minItems"] == 1
    r = httpx.post(f"{base}/events", json=[], headers={"X-API-Key": key})
    assert r.status_code == 422 and r.json()["error"] == "empty_batch"
    assert {"$ref": "#/components/schemas/ErrorBody"} in (
        post["responses"]["422"]["content"]["application/json"]["schema"]["anyOf"]
    )
    # Every route behind a key documents 401, 403 and 429; every route documents 400.
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert "400" in op["responses"], (method, path)
            if op.get("security"):
                assert {"401", "403", "429"} <= set(op["responses"]), (method, path)
    assert httpx.post(f"{base}/events", json=[ev(1)]).status_code == 401
    # Both aliases document their own body: the candidate needs its share.
    candidate = spec["paths"]["/admin/aliases/candidate"]
    production = spec["paths"]["/admin/aliases/production"]
    assert set(candidate) == set(production) == {"put", "delete"}
    ref = candidate["put"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert "share" in spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["required"]


def _array_items() -> list[bytes]:
    """A JSON array's items: valid JSON that orjson refuses, each one item's problem."""
    return [
        orjson.dumps(ev("ok1")),
        raw_event(2, "value", b"1e400"),  # past float range: non-finite
        raw_event(3, "ts", b"-1e400"),
        raw_event(4, "model_version", b'"\\ud800"'),  # a lone surrogate escape
        raw_event(5, "context", b'{"n": 1' + b"0" * 30 + b"}"),  # past 64 bits
        raw_event(6, "context", nested_bytes(300)),
        orjson.dumps(ev("ok2")),
    ]


def test_ingest_json_array_with_values_orjson_refuses_lands_the_valid_items(
    home: Path, tmp_path: Path
) -> None:
    f = tmp_path / "odd.json"
    f.write_bytes(b"[" + b",\n".join(_array_items()) + b"]")
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 0, result.output
    assert "ingested 7 events from 1 file(s): 2 landed, 5 quarantined" in result.output
    for i, code in [(1, "non_finite_number"), (2, "non_finite_number"), (5, "context_too_deep")]:
        assert f"{f}:item {i}: {code}" in result.output
    lake = LocalLake(home / "lake")
    assert sorted(e["event_id"] for e in ndjson_lines(lake, "landing/")) == ["eok1", "eok2"]
    assert len(ndjson_lines(lake, "quarantine/intake/")) == 5


def test_ingest_streamed_array_cut_by_a_parse_error_lands_what_came_before(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An array too large to parse whole is streamed; its parser stops at a number past
    float range. The items before it land (as the message says), and the file is
    reported failed."""
    monkeypatch.setattr("recsys_assets.ingest.WHOLE_FILE_JSON_LIMIT", 64)
    f = tmp_path / "odd.json.gz"
    f.write_bytes(gzip.compress(b"[" + b",\n".join(_array_items()) + b"]"))
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 1, result.output
    assert "items 0..0 were ingested, the rest was not" in result.output
    assert "ingested 1 events from 1 file(s): 1 landed, 0 quarantined" in result.output
    lake = LocalLake(home / "lake")
    assert [e["event_id"] for e in ndjson_lines(lake, "landing/")] == ["eok1"]


def test_ingest_of_a_gzip_cut_by_a_crash_lands_what_it_could_read(
    home: Path, tmp_path: Path
) -> None:
    f = tmp_path / "cut.ndjson.gz"
    whole = gzip.compress(b"\n".join(orjson.dumps(ev(f"ok{i}")) for i in range(2_000)) + b"\n")
    f.write_bytes(whole[: len(whole) * 3 // 4])
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 1, result.output
    assert "cannot read" in result.output and "before that point were ingested" in result.output
    lake = LocalLake(home / "lake")
    landed = ndjson_lines(lake, "landing/")
    assert 0 < len(landed) < 2_000
    assert f"{len(landed):,} landed, 0 quarantined" in result.output
    assert [e["event_id"] for e in landed] == [f"eok{i}" for i in range(len(landed))]


def test_contiguous_days() -> None:
    from recsys_assets.cli.acquisition import contiguous_days

    days = ["2001-09-09", "2026-12-04", "2026-12-05", "2026-12-07"]
    assert contiguous_days(days) == [["2001-09-09"], ["2026-12-04", "2026-12-05", "2026-12-07"]]
    assert contiguous_days(days, max_gap=0) == [
        ["2001-09-09"],
        ["2026-12-04", "2026-12-05"],
        ["2026-12-07"],
    ]
    month_apart = ["2026-01-01", "2026-02-02", "2026-03-07"]  # 31, then 32 empty days
    assert contiguous_days(month_apart) == [["2026-01-01", "2026-02-02"], ["2026-03-07"]]
    assert contiguous_days([]) == []


def test_ingest_of_an_old_event_among_recent_ones_processes_only_their_dates(
    home: Path, tmp_path: Path
) -> None:
    """A 2001 event in a file of today's must not make one run over 25 years of empty
    partitions (minutes of work): each stretch of dates is its own run."""
    f = tmp_path / "mixed.ndjson"
    f.write_bytes(
        b"\n".join([orjson.dumps(ev("old", ts=1_000_000_000)), orjson.dumps(ev("new"))]) + b"\n"
    )
    result = runner.invoke(cli, ["ingest", str(f)])
    assert result.exit_code == 0, result.output
    assert "weblogs 2001-09-09..2001-09-09: 1 rows" in result.output
    assert result.output.count("succeeded") == 2


# ------------------------------------------- red team: kinds the issue did not list
#
# Each kind below was sent through `recsys ingest` and `POST /events` (service and
# collector). The first three broke something before their fix: a finite but huge
# ``value`` landed and processed, then became inf in training's float32 feature
# tables (an item's mean rating) so the blocking features-finite check failed every
# retrain; control characters in ``model_version`` (NUL, terminal escapes) landed
# and reached every report printing it; a UTF-8 byte order mark at the start of a
# file cost its first event (NDJSON) or turned a JSON array file into one rejected
# line. The rest are accepted or refused as the contract says, with exact accounting.

RED_HOSTILE: dict[str, bytes] = {
    "value_1e308": raw_event(101, "value", b"1e308"),
    "value_integer_past_64_bits": raw_event(102, "value", str(2**70).encode()),
    "value_minus_1e300_rating": orjson.dumps(ev(103, event_type="rating", value=-1e300)),
    "model_version_nul": raw_event(104, "model_version", b'"v\\u0000"'),
    "model_version_escape": raw_event(105, "model_version", b'"\\u001b[31mred"'),
    "value_as_string": raw_event(106, "value", b'"5"'),
    "ts_numeric_string": raw_event(107, "ts", b'"1700000000"'),
    "ts_boolean": raw_event(108, "ts", b"true"),
    "ts_year_1_with_offset": raw_event(109, "ts", b'"0001-01-01T00:00:00+01:00"'),
    "ts_year_9999_with_offset": raw_event(110, "ts", b'"9999-12-31T23:59:59-01:00"'),
    "position_boolean": raw_event(111, "position", b"true"),
    "event_type_upper_case": orjson.dumps(ev(112, event_type="VIEW")),
    "event_type_unknown": orjson.dumps(ev(113, event_type="hover")),
    "context_array": orjson.dumps(ev(114, context=[1, 2])),
    "context_long_key": orjson.dumps(ev(115, context={"k" * 9_000: 1})),
    "session_id_empty": raw_event(116, "session_id", b'""'),
    "id_100k_chars": raw_event(117, "user_id", orjson.dumps("x" * 100_000)),
    "invalid_utf8": raw_event(118, "user_id", b'"u\xff\xfe"'),
    "bom_mid_file": b"\xef\xbb\xbf" + orjson.dumps(ev(119)),
    "top_level_array": b"[" + orjson.dumps(ev(120)) + b"]",
    "top_level_number": b"42",
    "binary": bytes(b for b in range(256) if b != 10),
}
# Odd but harmless: each lands, is processed and kept.
RED_HARMLESS: dict[str, bytes] = {
    "crlf": orjson.dumps(ev(201)) + b"\r",
    "duplicate_keys": raw_event(202, "user_id", b'"a","user_id":"b"'),
    "id_whitespace_only": raw_event(203, "user_id", b'"   "'),
    "id_path_like": raw_event(204, "item_id", b'"../../etc/passwd"'),
    "id_nfc": orjson.dumps(ev(205, user_id="caf\u00e9")),
    "id_nfd": orjson.dumps(ev(206, user_id="cafe\u0301")),
    "id_zero_width": orjson.dumps(ev(207, user_id="\u200b")),
    "id_256_emoji": orjson.dumps(ev(208, user_id="\U0001f600" * 256)),
    "id_integer_past_int64": raw_event(209, "user_id", str(2**63).encode()),
    "ts_fractional": raw_event(210, "ts", str(NOW - 3_600.123456789).encode()),
    "context_nul": raw_event(211, "context", b'{"k":"a\\u0000b","\\u0000":1}'),
    "context_empty": orjson.dumps(ev(212, context={})),
    "context_largest_float": orjson.dumps(ev(213, context={"f": 1.7976931348623157e308})),
    "value_at_the_bound": orjson.dumps(ev(214, event_type="rating", value=-1e12)),
    "request_id_garbage": orjson.dumps(ev(215, event_type="click", request_id="\u202e\ufeffx")),
}


@pytest.mark.parametrize(
    "probe", ["value_1e308", "value_integer_past_64_bits", "model_version_nul", "binary"]
)
def test_red_team_probe_alone_gets_a_json_422(http: tuple[TestClient, dict], probe: str) -> None:
    client, headers = http
    for content_type in ("application/x-ndjson", "application/json"):
        r = client.post(
            "/events",
            content=RED_HOSTILE[probe],
            headers={**headers, "Content-Type": content_type},
        )
        assert 400 <= r.status_code < 500, r.text
        assert r.headers["content-type"].startswith("application/json")
        if r.status_code == 422:
            assert r.json()["rejected"] == 1 and r.json()["errors"][0]["reason"]
    landed, _ = _landed_and_quarantined(client)
    assert landed == []


def test_red_team_batch_keeps_every_valid_event(http: tuple[TestClient, dict]) -> None:
    client, headers = http
    lines = [*RED_HOSTILE.values(), *RED_HARMLESS.values()]
    r = client.post(
        "/events",
        content=b"\n".join(lines),
        headers={**headers, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["received"], body["accepted"], body["rejected"]) == (
        len(lines),
        len(RED_HARMLESS),
        len(RED_HOSTILE),
    )
    landed, quarantined = _landed_and_quarantined(client)
    assert len(landed) == len(RED_HARMLESS) and len(quarantined) == len(RED_HOSTILE)


@pytest.mark.slow
def test_red_team_ingest_accounts_for_every_line_and_processing_keeps_every_accepted(
    home: Path, tmp_path: Path
) -> None:
    """One file mixing every kind (empty and blank lines, no final newline), plus a
    landing file placed past the intake with a value training cannot sum: one
    `recsys ingest` run accounts for each line, and processing keeps or quarantines
    every accepted event, with a reason."""
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 3_600))
    lake = LocalLake(home / "lake")
    writer = SegmentWriter(lake, LANDING_AREA, writer_id="hand-copy")
    writer.append({day: raw_event(301, "value", b"1e308") + b"\n"})
    writer.close()

    good = [orjson.dumps(ev(f"ok{i}")) for i in range(6)]
    lines = [
        *good[:3],
        *RED_HOSTILE.values(),
        b"",
        b"  \t ",
        *RED_HARMLESS.values(),
        *good[3:],
    ]
    f = tmp_path / "red.ndjson"
    f.write_bytes(b"\n".join(lines))  # no final newline
    result = runner.invoke(cli, ["ingest", str(f), "--show-errors", "100"])
    assert result.exit_code == 0, result.output
    accepted, rejected = len(good) + len(RED_HARMLESS), len(RED_HOSTILE)
    assert (
        f"ingested {accepted + rejected} events from 1 file(s): {accepted} landed, "
        f"{rejected} quarantined" in result.output
    )
    for n, line in enumerate(lines, 1):
        if line in RED_HOSTILE.values():
            assert f"{f}:{n}: " in result.output
    assert "Traceback" not in result.output and "succeeded" in result.output
    weblogs = read_parquet(lake, weblogs_key(day))
    later = read_parquet(lake, weblogs_quarantine_key(day))
    assert weblogs.height + later.height == accepted + 1  # + the hand-placed line
    assert later.filter(pl.col("event_id") == "e301")["reason"].to_list() == ["implausible_value"]
    assert {f"eok{i}" for i in range(6)} | {f"e{i}" for i in range(201, 216)} <= set(
        weblogs["event_id"]
    )


@pytest.mark.parametrize("name", ["bom.ndjson", "bom.json", "bom.ndjson.gz", "bom.json.gz"])
def test_ingest_of_a_file_starting_with_a_utf8_bom_lands_every_event(
    home: Path, tmp_path: Path, name: str
) -> None:
    good = [orjson.dumps(ev(f"ok{i}")) for i in range(5)]
    body = b"[" + b",".join(good) + b"]" if ".json" in name and "ndjson" not in name else None
    data = b"\xef\xbb\xbf" + (body if body is not None else b"\n".join(good) + b"\n")
    f = tmp_path / name
    f.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 0, result.output
    assert "ingested 5 events from 1 file(s): 5 landed, 0 quarantined" in result.output
    lake = LocalLake(home / "lake")
    assert sorted(e["event_id"] for e in ndjson_lines(lake, "landing/")) == [
        f"eok{i}" for i in range(5)
    ]


def _events_requests(base: str, key: str, status: str) -> float:
    metrics = httpx.get(f"{base}/metrics", headers={"X-API-Key": key}, timeout=10).text
    prefix = f'recsys_http_requests_total{{method="POST",route="/events",status="{status}"}} '
    return sum(
        float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix)
    )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_gone_mid_body_is_not_a_500(real_server: tuple[str, str], framing: str) -> None:
    """A shipper killed (or a phone losing signal) in the middle of its body: before,
    the intake raised ClientDisconnect, logged a traceback and counted a 500 in
    ``recsys_http_requests_total``, which is what error-rate alerts watch."""
    base, key = real_server
    host, port = base.removeprefix("http://").split(":")
    event = orjson.dumps(ev("gone"))
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(event) + event[:10]
    else:
        head = b"Content-Length: %d\r\n\r\n" % (len(event) + 100) + event
    before = _events_requests(base, key, "400")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /events HTTP/1.1\r\nHost: t\r\nX-API-Key: "
            + key.encode()
            + b"\r\nContent-Type: application/json\r\n"
            + head
        )
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # until the server closes: it answers no one
            pass
    deadline = time.monotonic() + 10
    while _events_requests(base, key, "400") == before and time.monotonic() < deadline:
        pass  # the app records the request after the server dropped the connection
    assert _events_requests(base, key, "400") == before + 1
    assert _events_requests(base, key, "500") == 0
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_ingest_of_one_old_event_processes_its_day_not_every_day_since(
    home: Path, tmp_path: Path
) -> None:
    """A valid event from years ago (a backfill line, a client clock reset) in today's
    file: ingest used to run weblogs over every partition from that day to today
    (2020-06-01: 2,300+ partitions, minutes), now the touched days only."""
    f = tmp_path / "old.ndjson"
    lines = [orjson.dumps(ev(f"ok{i}")) for i in range(3)]
    lines.append(orjson.dumps(ev("old", ts="2020-06-01T12:00:00Z")))
    f.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(cli, ["ingest", str(f)])
    assert result.exit_code == 0, result.output
    assert result.output.count("succeeded") == 2, result.output
    lake = LocalLake(home / "lake")
    days = {o.key.split("/")[1] for o in lake.list("weblogs/") if o.key.endswith(".parquet")}
    today = time.strftime("date=%Y-%m-%d", time.gmtime(NOW - 3_600))
    assert days == {"date=2020-06-01", today}
    assert _parquet_rows(lake, "weblogs/").height == 4


def test_ingest_of_a_gzipped_array_with_values_orjson_refuses_accounts_for_each_item(
    home: Path, tmp_path: Path
) -> None:
    """Before, a .gz array was always streamed and stopped at the first value the
    streaming parser refuses (1e400): the items after it were neither landed nor
    rejected and the file failed. One that fits is now parsed whole, like a plain one."""
    f = tmp_path / "odd.json.gz"
    f.write_bytes(gzip.compress(b"\xef\xbb\xbf[" + b",\n".join(_array_items()) + b"]"))
    result = runner.invoke(cli, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 0, result.output
    assert "ingested 7 events from 1 file(s): 2 landed, 5 quarantined" in result.output
    lake = LocalLake(home / "lake")
    assert sorted(e["event_id"] for e in ndjson_lines(lake, "landing/")) == ["eok1", "eok2"]
    # A gzip stream cut by a crash is still streamed: what precedes the cut lands.
    whole = gzip.compress(b"[" + b",".join(orjson.dumps(ev(f"c{i}")) for i in range(2_000)) + b"]")
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    result = runner.invoke(cli, ["ingest", str(cut), "--no-process"])
    assert result.exit_code == 1, result.output
    landed = [e for e in ndjson_lines(lake, "landing/") if e["event_id"].startswith("ec")]
    assert 0 < len(landed) < 2_000
    assert [e["event_id"] for e in landed] == [f"ec{i}" for i in range(len(landed))]


def test_a_null_item_of_a_json_array_is_not_an_object_not_an_empty_line(
    http: tuple[TestClient, dict],
) -> None:
    """Before, ``null`` in an array was reported as "empty: empty line" and quarantined
    with no bytes at all."""
    client, headers = http
    body = b"[null," + orjson.dumps(ev("ok")) + b"]"
    r = client.post(
        "/events", content=body, headers={**headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["errors"] == [
        {
            "at": "index 0",
            "code": "not_an_object",
            "reason": "event must be a JSON object, got null",
        }
    ]
    landed, quarantined = _landed_and_quarantined(client)
    assert [e["event_id"] for e in landed] == ["eok"]
    assert [(q["code"], q["raw"]) for q in quarantined] == [("not_an_object", "null")]


def test_client_named_model_versions_cannot_flood_the_metrics(
    http: tuple[TestClient, dict],
) -> None:
    """``model_version`` on a click comes from the client: 5,000 distinct values must not
    become 5,000 series. Well-formed versions get a series up to a bound, the rest count
    as ``other``; the total stays exact."""
    from recsys_serving.api.metrics import MAX_CLICK_VERSIONS

    client, headers = http
    real = [f"v20261201000000-{i:08x}" for i in range(MAX_CLICK_VERSIONS + 36)]
    forged = [f"attacker-{i}" for i in range(400)]
    events = [
        ev(f"c{i}", event_type="click", model_version=version, request_id=f"r{i}")
        for i, version in enumerate(real + forged)
    ]
    r = client.post("/events", json=events, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == len(events)
    clicks = {
        s.labels["model_version"]: s.value
        for family in client.app.state.metrics.registry.collect()
        if family.name == "recsys_clicks"
        for s in family.samples
        if s.name == "recsys_clicks_total"
    }
    assert len(clicks) == MAX_CLICK_VERSIONS + 1
    assert set(clicks) - {"other"} == set(real[:MAX_CLICK_VERSIONS])
    assert clicks["other"] == 36 + 400
    assert sum(clicks.values()) == len(events)
