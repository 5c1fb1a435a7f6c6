"""The service dashboard's figures and endpoints: quantiles, windows, counter resets,
history wording, auth, and the data endpoint against what ``/metrics`` reports."""

from __future__ import annotations

import math
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from model_support import TinyWorld, tiny_params, tiny_world  # noqa: F401

from recsys_assets.training.pipeline import train_bundle
from recsys_serving.api.metrics import ServiceMetrics, parse_metrics
from recsys_serving.dashboard.figures import (
    RECOMMENDATIONS_ROUTE,
    Histogram,
    SnapshotRing,
    classify,
    counter_increase,
    describe_history,
    histogram_quantile,
    parse_snapshot,
    summarize,
)
from recsys_serving.lake import LocalLake
from recsys_serving.registry import AliasEvent, ModelRegistry
from recsys_serving.settings import Settings
from serving_support import new_key, service_settings, serving_client, wait_for

INF = math.inf

# --------------------------------------------------------------------------- figures


def test_quantiles_interpolate_inside_buckets_like_prometheus() -> None:
    buckets = [(0.01, 5.0), (0.1, 10.0), (INF, 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.01 + 0.09 * 2.5 / 5)
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.01 * 2 / 5)
    # A rank in +Inf reports the highest finite bound; nothing observed: no quantile.
    assert histogram_quantile(0.99, [(0.1, 1.0), (INF, 10.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    # Empty buckets below the rank are skipped, not interpolated into.
    assert histogram_quantile(0.5, [(0.01, 0.0), (0.1, 0.0), (1.0, 4.0), (INF, 4.0)]) == (
        pytest.approx(0.55)
    )
    with pytest.raises(ValueError, match=r"\+Inf"):
        histogram_quantile(0.5, [(0.1, 1.0)])
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantile(1.5, buckets)


def test_counters_that_go_down_were_reset_and_count_from_zero() -> None:
    assert counter_increase({"a": 10.0, "b": 3.0, "c": 2.0}, {"a": 4.0, "b": 7.0}) == {
        "a": 6.0,
        "b": 3.0,  # reset: the new value is all increase
        "c": 2.0,  # new series
    }
    before = Histogram(((0.1, 4.0), (INF, 5.0)), 5.0, 0.4)
    after = Histogram(((0.1, 6.0), (INF, 9.0)), 9.0, 1.0)
    assert after.since(before) == Histogram(((0.1, 2.0), (INF, 4.0)), 4.0, pytest.approx(0.6))
    restarted = Histogram(((0.1, 1.0), (INF, 1.0)), 1.0, 0.01)
    assert restarted.since(after) == restarted


def test_ring_prefers_the_oldest_reading_inside_the_window() -> None:
    ring = SnapshotRing(horizon_seconds=100)
    for at in (0.0, 50.0, 80.0, 95.0, 99.8):
        ring.add(parse_snapshot("", at))
    assert ring.baseline(100.0, window_seconds=30).at == 80.0
    assert ring.baseline(100.0, window_seconds=3).at == 95.0  # 99.8 is too recent
    # Nothing inside the window: the newest older reading, and the span says how long.
    assert ring.baseline(160.0, window_seconds=10).at == 99.8
    assert ring.baseline(0.2, window_seconds=30) is None
    ring.add(parse_snapshot("", 300.0))
    assert len(ring) == 1  # older than the horizon: forgotten


def test_summary_from_a_real_exposition() -> None:
    metrics = ServiceMetrics()
    for seconds in (0.002, 0.004, 0.004, 0.02, 0.3):
        metrics.observe_request(RECOMMENDATIONS_ROUTE, "GET", 200, seconds)
    metrics.observe_request(RECOMMENDATIONS_ROUTE, "GET", 500, 0.001)
    metrics.observe_request("/events", "POST", 202, 0.001)
    metrics.observe_request("/dashboard/data", "GET", 200, 0.001)
    metrics.recommendations.labels("champion", "v1").inc(4)
    metrics.recommendations.labels("fallback", "v1").inc(1)
    metrics.impressions.labels("v1").inc(40)
    metrics.clicks.labels("v1").inc(3)
    metrics.set_models({"production": "v1"}, True, 0.0)
    then = parse_snapshot(metrics.render().decode(), 1000.0)
    metrics.observe_request("/events", "POST", 202, 0.001)
    metrics.observe_request("/events", "POST", 503, 0.001)
    metrics.recommendations.labels("fallback", "v1").inc(1)
    now = parse_snapshot(metrics.render().decode(), 1010.0)

    view = summarize(now, then)
    assert view["window"] == {"seconds": 10.0, "start": 1000.0}
    assert view["calls"]["total"] == 9  # /dashboard/* is not counted
    assert view["calls"]["per_second"] == pytest.approx(0.2)
    assert {(r["route"], r["status"]): r["total"] for r in view["calls"]["by_route"]} == {
        ("/events", "202"): 2,
        ("/events", "503"): 1,
        (RECOMMENDATIONS_ROUTE, "200"): 5,
        (RECOMMENDATIONS_ROUTE, "500"): 1,
    }
    assert view["errors"]["total_5xx"] == 2
    assert view["errors"]["per_second"] == pytest.approx(0.1)
    assert view["errors"]["ratio"] == pytest.approx(0.5)
    assert view["recommendations"]["total"] == 6
    assert view["recommendations"]["fallback_share"] == pytest.approx(2 / 6)
    assert view["recommendations"]["fallback_share_window"] == pytest.approx(1.0)
    assert view["ctr"] == [
        {"model_version": "v1", "impressions": 40, "clicks": 3, "ctr": pytest.approx(3 / 40)}
    ]
    assert view["models"]["ready"] is True
    assert [(w["alias"], w["version"]) for w in view["models"]["workers"]] == [("production", "v1")]
    since_start = view["latency"]["since_start"]
    assert since_start["count"] == 6
    # Six observations: the median's rank (3) sits in the (2.5 ms, 5 ms] bucket.
    assert 2.5 <= since_start["p50_ms"] <= 5.0
    assert 250.0 <= since_start["p99_ms"] <= 500.0
    assert view["latency"]["window"] is None  # no /recommendations call in the window

    first = summarize(then, None)
    assert first["window"] is None and first["calls"]["per_second"] is None
    assert first["errors"]["ratio"] is None and first["calls"]["total"] == 7


def _event(minute: int, alias: str, version: str | None, previous: str | None, **kw: Any) -> Any:
    return AliasEvent(
        key=f"k{minute}",
        at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute),
        alias=alias,
        action="set" if version else "clear",
        version=version,
        previous=previous,
        share=kw.get("share", 1.0 if version and alias == "production" else None),
        reason=kw.get("reason", "because"),
        evidence={},
        seq=minute,
    )


def test_history_names_promotions_phase_ins_and_rollbacks() -> None:
    # Versions whose names do not sort by age: only the replayed stack can tell.
    events = [
        _event(0, "production", "vB", None),
        _event(1, "candidate", "vA", None, share=0.1),
        _event(2, "production", "vA", "vB"),
        _event(3, "candidate", None, "vA", reason="promoted to production: won"),
        _event(4, "production", "vB", "vA", reason="manual: rollback"),
        _event(5, "production", "vA", "vB", reason="fixed, promote again"),
        _event(6, "candidate", "vC", None, share=0.5),
        _event(7, "candidate", None, "vC", reason="canary: worse CTR"),
    ]
    rows = describe_history(reversed(events))  # the registry gives newest first
    assert [r["kind"] for r in rows] == [
        "rollback",
        "phase-in",
        "promotion",
        "rollback",
        "phase-in completed",
        "promotion",
        "phase-in",
        "promotion",
    ]
    assert rows[0]["reason"] == "canary: worse CTR"
    assert rows[-1]["at"] == "2026-01-01T00:00:00+00:00"
    # A move whose history was not read: falls back to the version order.
    assert classify(_event(9, "production", "v20250101000000-aa", "v20260101000000-bb")) == (
        "rollback"
    )


# --------------------------------------------------------------------------- endpoints


@pytest.fixture(scope="module")
def two_bundles(
    tiny_world: TinyWorld,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path]:
    """Two real versions, the second newer (versions carry their creation second)."""
    out = tmp_path_factory.mktemp("dashboard-bundles")
    first = train_bundle(tiny_world.lake, tiny_params(1, tiny_world.settings), out).bundle_path
    time.sleep(1.05)
    second = train_bundle(tiny_world.lake, tiny_params(2, tiny_world.settings), out).bundle_path
    return first, second


def _promote_with_history(settings: Settings, bundles: tuple[Path, Path]) -> tuple[str, str]:
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    v1 = registry.register(bundles[0]).version
    v2 = registry.register(bundles[1]).version
    registry.promote(v1, reason="first model")
    registry.set_alias("candidate", v2, reason="canary", share=0.5)
    registry.promote(v2, reason="canary won")
    registry.rollback(reason="manual: CTR fell after the promotion")
    return v1, v2


def _ready(client: TestClient, version: str) -> bool:
    return client.app.state.manager.state.versions().get("production") == version


def _samples(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_metrics(client.get("/metrics").text)


def test_page_is_public_and_the_data_needs_the_admin_scope(
    tmp_path: Path, two_bundles: tuple[Path, Path]
) -> None:
    settings = service_settings(tmp_path / "home")
    _promote_with_history(settings, two_bundles)
    admin = {"X-API-Key": new_key(settings, "admin")}
    other = {"X-API-Key": new_key(settings, "recommend,events")}
    with serving_client(settings) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="dashboard/static/dashboard.js"' in page.text
        config = client.get("/dashboard/config").json()
        assert config["auth_required"] is True and config["scope"] == "admin"
        assert config["header"] == "X-API-Key"

        missing = client.get("/dashboard/data")
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        wrong = client.get("/dashboard/data", headers={"X-API-Key": "rsk_nope"})
        assert wrong.status_code == 401
        scope = client.get("/dashboard/data", headers=other)
        assert scope.status_code == 403 and "admin" in scope.json()["detail"]
        assert client.get("/dashboard/data", headers=admin).status_code == 200
        bad_window = client.get("/dashboard/data?window=1", headers=admin)
        assert bad_window.status_code == 422 and bad_window.json()["error"] == "invalid_request"


def test_static_files_validators_and_the_local_chart_library(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "home", auth_enabled=False)
    with serving_client(settings) as client:
        script = client.get("/dashboard/static/dashboard.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        again = client.get(
            "/dashboard/static/dashboard.js", headers={"If-None-Match": script.headers["etag"]}
        )
        assert again.status_code == 304 and again.content == b""
        assert client.get("/dashboard/static/dashboard.css").status_code == 200
        for name in ("nope.js", "..%2F..%2Fsettings.py", "index.html"):
            missing = client.get(f"/dashboard/static/{name}")
            assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        # The first request builds the bundle (seconds of CPU) in a child process: the
        # server keeps answering meanwhile.
        fetched: list[Any] = []
        fetch = threading.Thread(
            target=lambda: fetched.append(
                client.get("/dashboard/vendor/vega-embed.js", headers={"Accept-Encoding": "gzip"})
            )
        )
        fetch.start()
        slowest = 0.0
        while fetch.is_alive():
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
        fetch.join()
        assert slowest < 1.0
        (bundle,) = fetched
        assert bundle.status_code == 200
        assert bundle.headers["content-encoding"] == "gzip"
        # httpx decodes gzip: this is the script the browser runs, with no network needs.
        assert "window.vegaEmbed=" in bundle.text
        assert "cdn.jsdelivr" not in bundle.text
        config = client.get("/dashboard/config").json()
        assert config["auth_required"] is False
        assert set(config["libraries"]) == {"vega", "vega_lite", "vega_embed"}
        assert client.get("/dashboard/data").status_code == 200  # auth off: it just works


def test_data_matches_metrics_after_known_traffic(
    tmp_path: Path, two_bundles: tuple[Path, Path]
) -> None:
    settings = service_settings(tmp_path / "home")
    v1, v2 = _promote_with_history(settings, two_bundles)
    admin = {"X-API-Key": new_key(settings, "admin")}
    key = {"X-API-Key": new_key(settings, "recommend,events")}
    with serving_client(settings) as client:
        wait_for(lambda: _ready(client, v1), 30, "the rolled-back model")
        first = client.get("/dashboard/data", headers=admin).json()

        shown: list[dict[str, Any]] = []
        for i in range(12):
            r = client.get(f"/recommendations/user-{i}?k=5", headers=key)
            assert r.status_code == 200
            shown.append(r.json())
        assert client.get("/recommendations/u1?k=0", headers=key).status_code == 422
        assert client.get("/recommendations/u1", headers={"X-API-Key": "bad"}).status_code == 401
        assert client.get("/no/such/route").status_code == 404
        now = time.time()
        clicks = [
            {
                "event_id": f"click-{n}",
                "event_type": "click",
                "user_id": answer["user_id"],
                "item_id": answer["items"][0]["item_id"],
                "ts": now,
                "request_id": answer["request_id"],
                "position": 0,
                "model_version": answer["model_version"],
            }
            for n, answer in enumerate(shown[:3])
        ]
        posted = client.post(
            "/events",
            content=b"\n".join(orjson.dumps(c) for c in clicks),
            headers={**key, "Content-Type": "application/x-ndjson"},
        )
        assert posted.status_code == 202
        sent = 12 + 3 + 1  # recommendations, 422 + 401 on the same route, 404, events
        time.sleep(0.6)  # the window needs two readings at least half a second apart
        view = client.get("/dashboard/data", headers=admin).json()
        samples = _samples(client)

    # Totals equal /metrics (all routes but the dashboard's own).
    requests = [
        (labels, n)
        for labels, n in samples["recsys_http_requests_total"]
        if not labels["route"].startswith("/dashboard")
    ]
    assert view["calls"]["total"] == sum(n for _, n in requests)
    assert view["calls"]["total"] - first["calls"]["total"] == sent
    by_route = {(r["route"], r["status"]): r["total"] for r in view["calls"]["by_route"]}
    expected: dict[tuple[str, str], float] = {}
    for labels, n in requests:
        key_ = (labels["route"], labels["status"])
        expected[key_] = expected.get(key_, 0) + n
    assert by_route == expected
    assert by_route[(RECOMMENDATIONS_ROUTE, "200")] == 12
    assert by_route[(RECOMMENDATIONS_ROUTE, "422")] == 1
    assert by_route[("unmatched", "404")] == 1
    # Rates: the window's calls divided by its span.
    window = view["window"]["seconds"]
    assert window >= 0.5
    assert view["calls"]["per_second"] * window == pytest.approx(sent)
    assert view["errors"]["total_5xx"] == 0 and view["errors"]["per_second"] == 0

    answers = samples["recsys_recommendations_total"]
    assert view["recommendations"]["total"] == sum(n for _, n in answers) == 12
    assert view["recommendations"]["by_served_by"] == {"champion": 12}
    assert view["recommendations"]["fallback_share"] == 0
    ctr = {c["model_version"]: c for c in view["ctr"]}
    (metric_ctr,) = samples["recsys_online_ctr"]
    assert set(ctr) == {v1} == {metric_ctr[0]["model_version"]}
    assert ctr[v1]["ctr"] == pytest.approx(metric_ctr[1])
    assert ctr[v1]["clicks"] == 3
    assert ctr[v1]["impressions"] == sum(len(a["items"]) for a in shown)

    latency = view["latency"]["since_start"]
    buckets = sorted(
        (float(labels["le"]), n)
        for labels, n in samples["recsys_http_request_duration_seconds_bucket"]
        if labels["route"] == RECOMMENDATIONS_ROUTE
    )
    count = buckets[-1][1]
    assert latency["count"] == count == 14  # 12 answers, the 422 and the 401
    rank = 0.99 * count
    upper = next(le for le, n in buckets if n >= rank)
    lower = max([le for le, n in buckets if le < upper], default=0.0)
    assert lower * 1000 <= latency["p99_ms"] <= upper * 1000
    assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert view["latency"]["window"]["count"] == count

    assert view["models"]["ready"] is True
    workers = view["models"]["workers"]
    assert [(w["alias"], w["version"]) for w in workers] == [("production", v1)]
    assert [(labels["alias"], labels["version"]) for labels, _ in samples["recsys_model_info"]] == [
        ("production", v1)
    ]

    history = view["history"]
    assert history["error"] is None
    assert [(e["kind"], e["alias"], e["version"]) for e in history["events"]] == [
        ("rollback", "production", v1),
        ("phase-in completed", "candidate", None),
        ("promotion", "production", v2),
        ("phase-in", "candidate", v2),
        ("promotion", "production", v1),
    ]
    assert history["events"][0]["reason"] == "manual: CTR fell after the promotion"
    assert view["source"]["pinned"] is False
    assert view["server"]["host"] == socket.gethostname()


def test_history_failure_is_shown_not_fatal(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "home", auth_enabled=False)
    with serving_client(settings) as client:

        class BrokenRegistry:
            def history(self, limit: int) -> list[Any]:
                raise OSError("lake unreachable")

        client.get("/dashboard/data")  # creates the dashboard state
        assert client.get("/healthz").status_code == 200  # a call the view must still count
        client.app.state.dashboard.history.read = lambda: BrokenRegistry().history(20)
        client.app.state.dashboard.history.ttl = 0
        view = client.get("/dashboard/data").json()
    assert view["history"] == {"events": [], "error": "OSError: lake unreachable"}
    # The rest of the view is still computed from the metrics despite the failure.
    assert view["models"]["ready"] is False
    assert view["calls"]["total"] == 1
    assert [(r["route"], r["status"], r["total"]) for r in view["calls"]["by_route"]] == [
        ("/healthz", "200", 1)
    ]
