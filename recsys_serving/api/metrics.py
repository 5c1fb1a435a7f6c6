"""Prometheus metrics of the service, with exactly the names of docs/architecture.md.

Each app owns its metric objects (tests run several apps in one process without
sharing counts). With several workers ``PROMETHEUS_MULTIPROC_DIR`` is set by
``recsys serve`` before any worker starts, prometheus_client then keeps every value
in per-process files, and ``GET /metrics`` on any worker aggregates all of them.

Two series are derived at scrape time rather than kept per process, because a
per-process value would be wrong once aggregated:

* ``recsys_online_ctr{model_version}``: total clicks / total impressions, computed
  from the aggregated counters;
* ``recsys_model_info{alias,version,worker}``: each worker publishes the versions it
  serves as a small JSON file in ``run_dir`` (multiprocess mode cannot remove a
  label set, and a version a worker no longer serves must disappear).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys_serving.model.bundle import is_version

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
WORKER_STATE_DIR = "workers"
# Bound on the cached label sets (routes x statuses, versions): never a leak.
_MAX_CACHED_LABELS = 1024


def multiprocess_dir() -> Path | None:
    """The shared metrics directory, if prometheus_client really runs in multiprocess mode.

    The mode is fixed when prometheus_client is first imported; trusting the variable
    alone would aggregate empty files if it was set later in the process.
    """
    from prometheus_client import values

    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not value or values.ValueClass is values.MutexValue:
        return None
    return Path(value)


def worker_id() -> str:
    return str(os.getpid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Distinct client-named model versions a worker gives their own click series.
MAX_CLICK_VERSIONS = 64


class ServiceMetrics:
    """The metric objects of one app and how to expose them."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiproc_dir = multiprocess_dir()
        self.run_dir = run_dir
        self.worker = worker_id()
        self._models: dict[str, str] = {}
        self._stand_ins: dict[str, dict[str, str]] = {}
        # Labelled children of the per-request metrics: ``labels()`` costs more than
        # the update itself.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._answer_children: dict[tuple[str, str], Any] = {}
        self._click_versions: set[str] = set()
        r = self.registry
        self.http_requests = Counter(
            "recsys_http_requests_total",
            "Requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "recsys_http_request_duration_seconds",
            "Request latency by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "recsys_recommendations_total",
            "Recommendation answers by who served them.",
            ["served_by", "model_version"],
            registry=r,
        )
        self.fallbacks = Counter(
            "recsys_fallback_total",
            "Answers from the bundle's popular list because a dependency failed.",
            ["reason"],
            registry=r,
        )
        self.model_ready = Gauge(
            "recsys_model_ready",
            "1 once a production model is loaded (minimum over live workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_load_failures = Counter(
            "recsys_model_load_failures_total",
            "Bundles refused (the previous model kept serving).",
            ["reason"],
            registry=r,
        )
        self.candidate_share = Gauge(
            "recsys_candidate_share",
            "Share of users routed to the candidate model.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.events_accepted = Counter(
            "recsys_events_accepted_total",
            "Events landed durably, by source.",
            ["source"],
            registry=r,
        )
        self.events_rejected = Counter(
            "recsys_events_rejected_total",
            "Events quarantined (or lost to a failed write), by reason.",
            ["reason"],
            registry=r,
        )
        self.last_event = Gauge(
            "recsys_last_event_timestamp_seconds",
            "Wall time of the last accepted event.",
            registry=r,
            multiprocess_mode="max",
        )
        self.impressions = Counter(
            "recsys_impressions_total",
            "Items served in recommendation answers.",
            ["model_version"],
            registry=r,
        )
        self.clicks = Counter(
            "recsys_clicks_total",
            "Click events received that name the model_version they came from.",
            ["model_version"],
            registry=r,
        )
        self.throttled = Counter(
            "recsys_throttled_total", "429 answers by key.", ["key_id"], registry=r
        )
        self.ranker_compile_failures = Counter(
            "recsys_ranker_compile_failures_total",
            "Models ranking with LightGBM because their ranker could not be compiled.",
            ["reason"],
            registry=r,
        )
        self.model_ready.set(0)
        self.candidate_share.set(0)

    # ---------------------------------------------------------------- recording
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, method, status))
        if children is None:
            label = method if method in _METHODS else "OTHER"
            children = (
                self.http_requests.labels(route, label, str(status)),
                self.http_duration.labels(route),
            )
            if len(self._request_children) < _MAX_CACHED_LABELS:
                self._request_children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def answered(self, served_by: str, version: str) -> None:
        """Count one recommendation answer."""
        child = self._answer_children.get((served_by, version))
        if child is None:
            child = self.recommendations.labels(served_by, version)
            if len(self._answer_children) < _MAX_CACHED_LABELS:
                self._answer_children[(served_by, version)] = child
        child.inc()

    def clicks_for(self, version: str, n: int) -> None:
        """Count clicks under the model version the client names, within bounds.

        The label comes from the client: unbounded, one hostile batch of 5,000 made
        5,000 series and a 616 KB ``/metrics``. Only a well-formed registry version
        gets its own series, and only the first ``MAX_CLICK_VERSIONS`` a worker sees
        (a deployment serves a handful over a process's life); the rest count as
        ``other``, so the totals stay exact.
        """
        if version not in self._click_versions:
            if is_version(version) and len(self._click_versions) < MAX_CLICK_VERSIONS:
                self._click_versions.add(version)
            else:
                version = "other"
        self.clicks.labels(version).inc(n)

    def events_landed(self, source: str, accepted: int, rejected: dict[str, int]) -> None:
        if accepted:
            self.events_accepted.labels(source).inc(accepted)
            self.last_event.set(time.time())
        for reason, n in rejected.items():
            self.events_rejected.labels(reason).inc(n)

    def set_models(
        self,
        models: dict[str, str],
        ready: bool,
        share: float,
        stand_ins: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Publish what this worker serves now: ``{alias: version}``, and which of those
        stand in for a version that cannot be loaded (``ServingState.stand_ins``)."""
        self._models = dict(models)
        self._stand_ins = dict(stand_ins or {})
        self.model_ready.set(1 if ready else 0)
        self.candidate_share.set(share)
        if self.run_dir is not None:
            directory = self.run_dir / WORKER_STATE_DIR
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / f"{self.worker}.json"
            tmp = directory / f".{self.worker}.json.tmp"
            state = {"models": self._models, "stand_ins": self._stand_ins, "at": time.time()}
            tmp.write_bytes(orjson.dumps(state))
            os.replace(tmp, target)

    # ---------------------------------------------------------------- exposition
    def render(self) -> bytes:
        if self.multiproc_dir is not None:
            self._forget_dead_workers()
            source = CollectorRegistry()
            MultiProcessCollector(source, path=str(self.multiproc_dir))
            families = list(source.collect())
        else:
            families = list(self.registry.collect())
        families.append(_online_ctr(families))
        families.append(self._model_info())
        families.append(self._stand_in_info())
        return generate_latest(_Families(families))  # type: ignore[arg-type]

    def _worker_models(self) -> Iterator[tuple[str, dict[str, str]]]:
        for worker, state in self._worker_states():
            yield worker, state.get("models", {})

    def _worker_states(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.run_dir is None:
            yield self.worker, {"models": self._models, "stand_ins": self._stand_ins}
            return
        for path in sorted((self.run_dir / WORKER_STATE_DIR).glob("*.json")):
            if not path.stem.isdigit():
                continue
            if not _pid_alive(int(path.stem)):
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                yield path.stem, orjson.loads(path.read_bytes())

    def _model_info(self) -> Metric:
        family = GaugeMetricFamily(
            "recsys_model_info",
            "1 for each model version a worker serves now, by alias.",
            labels=["alias", "version", "worker"],
        )
        for worker, models in self._worker_models():
            for alias, version in sorted(models.items()):
                family.add_metric([alias, version, worker], 1)
        return family

    def _stand_in_info(self) -> Metric:
        family = GaugeMetricFamily(
            "recsys_model_stand_in",
            "1 while a worker serves a last good version because the alias's own version "
            "cannot be loaded there.",
            labels=["alias", "version", "instead_of", "worker"],
        )
        for worker, state in self._worker_states():
            for alias, stand_in in sorted((state.get("stand_ins") or {}).items()):
                family.add_metric(
                    [alias, str(stand_in.get("version")), str(stand_in.get("instead_of")), worker],
                    1,
                )
        return family

    def _forget_dead_workers(self) -> None:
        """Drop the live-gauge files of workers that died (uvicorn restarts them)."""
        assert self.multiproc_dir is not None
        pattern = re.compile(r"^gauge_live\w+_(\d+)\.db$")
        for path in glob.glob(str(self.multiproc_dir / "gauge_live*_*.db")):
            m = pattern.match(os.path.basename(path))
            if m and not _pid_alive(int(m.group(1))):
                mark_process_dead(int(m.group(1)), str(self.multiproc_dir))


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def _online_ctr(families: list[Metric]) -> Metric:
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"impressions": 0.0, "clicks": 0.0})
    for family in families:
        kind = {"recsys_impressions": "impressions", "recsys_clicks": "clicks"}.get(family.name)
        if kind is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels.get("model_version", "")][kind] += sample.value
    ctr = GaugeMetricFamily(
        "recsys_online_ctr",
        "Clicks / impressions since start, per model version.",
        labels=["model_version"],
    )
    for version, t in sorted(totals.items()):
        if t["impressions"] > 0:
            ctr.add_metric([version], t["clicks"] / t["impressions"])
    return ctr


class MetricsMiddleware:
    """Counts and times every request by route template (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if template.startswith("/v1/"):
                template = template[3:]
            self.metrics.observe_request(
                template, scope.get("method", ""), status, time.perf_counter() - started
            )


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Prometheus text exposition, aggregated over every worker of this server.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics_endpoint(request: Request) -> Response:
    # Plain def: reading the per-worker files happens in the threadpool, off the loop.
    metrics: ServiceMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name from an exposition text (used by tests and the bench)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(found)


__all__ = ["MetricsMiddleware", "ServiceMetrics", "parse_metrics", "router"]
