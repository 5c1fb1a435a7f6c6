"""online_ctr (CTR snapshot + service health from a real /metrics endpoint), the
health arithmetic, the nightly retrain schedule and the retrain-failure alert."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import orjson
import pytest
from monitoring_support import (
    failing_retrain,
    register_model,
    resources,
    run_failure_request,
    write_feedback,
)
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from recsys_assets.monitoring.assets import online_ctr
from recsys_assets.monitoring.health import (
    HealthSample,
    health_between,
    histogram_quantile,
    parse_metrics,
)
from recsys_assets.monitoring.operations import alert_job
from recsys_assets.monitoring.promotion import read_decisions
from recsys_assets.monitoring.schedules import build_nightly_retrain_schedule
from recsys_assets.monitoring.sensors import build_retrain_failure_sensor
from recsys_assets.monitoring.snapshot import HEALTH_LATEST, read_series_history
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.registry import ModelRegistry


class FakeServer:
    """A /metrics endpoint exporting the server's metric names (docs/architecture.md)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recsys_http_requests", "", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "recsys_http_request_duration_seconds",
            "",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )
        self.answers = Counter(
            "recsys_recommendations", "", ["served_by", "model_version"], registry=self.registry
        )

    def serve(self, n: int, latency: float, errors: int = 0, fallback: int = 0) -> None:
        route = "/recommendations/{user_id}"
        for _ in range(n):
            self.requests.labels(route, "GET", "200").inc()
            self.latency.labels(route).observe(latency)
        self.requests.labels(route, "GET", "500").inc(errors)
        self.answers.labels("champion", "v1").inc(n - fallback)
        self.answers.labels("fallback", "v1").inc(fallback)
        self.requests.labels("/healthz", "GET", "200").inc(50)


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, FakeServer]]:
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(fake.registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/metrics", fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.1: 0.0}) is None


def test_health_between_scrapes_and_across_a_restart() -> None:
    t0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
    inf = float("inf")
    before = HealthSample(t0, 100, 1, 0, {"champion": 90, "fallback": 10}, {0.01: 80, inf: 100})
    after = HealthSample(
        t0 + timedelta(seconds=10),
        300,
        5,
        0,
        {"champion": 250, "fallback": 50},
        {0.01: 240, inf: 300},
    )
    health = health_between(before, after)
    assert health["calls"] == 200 and health["rps"] == 20.0
    assert health["error_rate"] == pytest.approx(0.02)
    assert health["fallback_share"] == pytest.approx(40 / 200)
    assert health["latency_p50_ms"] == pytest.approx(10 * 100 / 160)
    restarted = HealthSample(t0 + timedelta(seconds=20), 30, 0, 0, {"champion": 30}, {0.01: 30})
    reset = health_between(after, restarted)
    assert reset["counter_reset"] and reset["calls"] == 30 and reset["rps"] is None
    assert HealthSample.from_dict(after.as_dict()) == after


def test_online_ctr_records_ctr_and_service_health(
    tmp_path: Path, metrics_server: tuple[str, FakeServer]
) -> None:
    url, fake = metrics_server
    lake = LocalLake(tmp_path / "lake")
    registry = ModelRegistry(lake)
    v1 = register_model(registry, tmp_path, "v1")
    registry.set_alias(PRODUCTION, v1, reason="test")
    now = datetime.now(UTC)
    write_feedback(lake, v1, now - timedelta(minutes=45), 45, 0.06, np.random.default_rng(0))
    res = resources(lake, service_metrics_url=url)
    fake.serve(100, 0.004)

    first = dg.materialize([online_ctr], resources=res)
    assert first.success
    meta = first.asset_materializations_for_node("online_ctr")[0].metadata
    assert meta["production_version"].value == v1
    assert meta["drop_test"].value in ("no_drop", "small_drop")
    assert 0.03 < meta["production_ctr"].value < 0.09
    assert meta["service_health"].value["calls"] == 150  # includes /healthz

    fake.serve(200, 0.02, errors=4, fallback=50)
    second = dg.materialize([online_ctr], resources=res)
    health = second.asset_materializations_for_node("online_ctr")[0].metadata["service_health"]
    assert health.value["calls"] == 254 and health.value["errors_5xx"] == 4
    assert health.value["fallback_share"] == pytest.approx(50 / 200)
    assert 10 < health.value["latency_p50_ms"] <= 25
    assert lake.exists(HEALTH_LATEST)
    records = [o.key for o in lake.list("monitoring/health/") if "/date=" in o.key]
    assert len(records) == 2

    history = read_series_history(lake, now - timedelta(hours=1))
    assert history["impressions"].sum() == 45 * 200  # overlapping snapshots merged

    # An unreachable server is recorded as such; CTR is still recorded.
    res_down = resources(lake, service_metrics_url="http://127.0.0.1:9/metrics")
    down = dg.materialize([online_ctr], resources=res_down)
    assert (
        "error"
        in down.asset_materializations_for_node("online_ctr")[0].metadata["service_health"].value
    )


def test_parse_metrics_reads_the_recommendation_route_only() -> None:
    fake = FakeServer()
    fake.serve(10, 0.004, errors=1)
    sample = parse_metrics(generate_latest(fake.registry).decode())
    assert sample.requests == 61 and sample.errors == 1
    assert sample.latency_buckets[float("inf")] == 10
    assert sample.answers == {"champion": 10.0, "fallback": 0.0}


def test_nightly_schedule_and_failed_retraining_alert(
    tmp_path: Path, alert_webhook_server: Any
) -> None:
    schedule = build_nightly_retrain_schedule("0 3 * * *", enabled=False)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert build_nightly_retrain_schedule("0 3 * * *", True).default_status == (
        dg.DefaultScheduleStatus.RUNNING
    )
    lake = LocalLake(tmp_path / "lake")
    registry = ModelRegistry(lake)
    v1 = register_model(registry, tmp_path, "v1")
    registry.set_alias(PRODUCTION, v1, reason="test")
    res = resources(lake, alert_webhook_server.url)
    with dg.instance_for_test() as instance:
        at = datetime(2026, 3, 3, 3, 0, tzinfo=UTC)
        # Schedule contexts open their own handle on a persistent instance: leave them.
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=at) as ctx:
            request = schedule.evaluate_tick(ctx).run_requests[0]
        assert request.run_key == "nightly-20260303T0300"
        assert request.tags["recsys/pipeline"] == "retrain"
        assert request.tags["recsys/trigger"] == "nightly"
        assert request.run_config == {"execution": {"config": {"in_process": {}}}}

        result = failing_retrain.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        # A queued or running retraining makes the schedule skip that night.
        instance.create_run_for_job(failing_retrain, tags={"recsys/pipeline": "retrain"})
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=at) as ctx:
            skipped = schedule.evaluate_tick(ctx)
        assert not skipped.run_requests and "in progress" in (skipped.skip_message or "")

        sensor = build_retrain_failure_sensor(30)
        request = run_failure_request(sensor, instance, result, res)
        # The sensor only decides: the alert is an alert_job run keyed by the failed run.
        assert isinstance(request, dg.RunRequest) and request.run_key == result.run_id
        assert read_decisions(lake) == [] and alert_webhook_server.requests == []
        alert_run = alert_job.execute_in_process(
            instance=instance,
            run_config=request.run_config,
            tags=request.tags,
            resources={k: res[k] for k in ("lake", "notifier")},
        )
        assert alert_run.success
        (logged,) = instance.get_runs(dg.RunsFilter(job_name="alert_job"))
        assert logged.tags["recsys/failed_run_id"] == result.run_id
        messages = [e.user_message for e in instance.all_logs(logged.run_id)]
        assert any("training window is empty" in m for m in messages)
    (decision,) = read_decisions(lake)
    assert decision["action"] == "retrain_failed" and decision["production_version"] == v1
    assert decision["evidence"]["trigger"] == "ctr_drop"
    (alert,) = alert_webhook_server.requests
    assert "production unchanged" in alert["text"]
    assert orjson.loads(orjson.dumps(alert["alert"]))["severity"] == "warning"
