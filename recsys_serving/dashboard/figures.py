"""What the dashboard shows, computed from the same exposition ``GET /metrics`` serves.

A :class:`Snapshot` is one reading of the server's metrics, already aggregated over
every worker (``ServiceMetrics.render()``), so two snapshots taken by *any* workers of
a server can be compared. Rates and latency quantiles need two readings in time; the
rolling window lives in each worker as a small :class:`SnapshotRing` fed by the
dashboard's own polls: the newest reading is compared with the oldest one still inside
the window. With several workers each ring sees only the polls that worker answered,
which changes how many readings a window holds, never what the figures mean.

Counters are compared the way Prometheus' ``rate()`` does: a counter that went down was
reset (its worker restarted with a fresh metrics directory) and counts from zero.
Quantiles interpolate inside histogram buckets like ``histogram_quantile()``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from recsys_serving.layout import PRODUCTION

RECOMMENDATIONS_ROUTE = "/recommendations/{user_id}"
# The dashboard's own polling would dominate a quiet service's call charts.
EXCLUDED_ROUTE_PREFIX = "/dashboard"
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
MIN_SPAN_SECONDS = 0.5

K = TypeVar("K")

# sample name -> (field of Snapshot, label names forming the key)
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "recsys_http_requests_total": ("requests", ("route", "method", "status")),
    "recsys_recommendations_total": ("recommendations", ("served_by", "model_version")),
    "recsys_fallback_total": ("fallbacks", ("reason",)),
    "recsys_impressions_total": ("impressions", ("model_version",)),
    "recsys_clicks_total": ("clicks", ("model_version",)),
    "recsys_model_load_failures_total": ("model_load_failures", ("reason",)),
    "recsys_events_accepted_total": ("events_accepted", ("source",)),
    "recsys_events_rejected_total": ("events_rejected", ("reason",)),
    "recsys_throttled_total": ("throttled", ("key_id",)),
}
_LATENCY = "recsys_http_request_duration_seconds"


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts ``(upper bound, count)``, ascending, ``+Inf`` last."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def since(self, earlier: Histogram | None) -> Histogram:
        """Observations made after ``earlier`` (all of them if the counts were reset)."""
        if earlier is None:
            return self
        before = dict(earlier.buckets)
        deltas = tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets)
        if self.count < earlier.count or any(n < 0 for _, n in deltas):
            return self
        return Histogram(deltas, self.count - earlier.count, self.total - earlier.total)

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile estimated from cumulative buckets, as Prometheus estimates it:
    linear inside the bucket that holds the rank, the first bucket starting at 0, and
    the highest finite bound when the rank falls in ``+Inf``. None without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        raise ValueError("a histogram needs a +Inf bucket")
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                finite = [le for le, _ in ordered if not math.isinf(le)]
                return finite[-1] if finite else None
            if upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return None  # pragma: no cover  (the +Inf bucket always holds the rank)


@dataclass(frozen=True, slots=True)
class ModelSlot:
    worker: str
    alias: str
    version: str


@dataclass(frozen=True)
class Snapshot:
    """One reading of the server's metrics at wall time ``at`` (seconds)."""

    at: float
    requests: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    latency: Mapping[str, Histogram] = field(default_factory=dict)
    recommendations: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    fallbacks: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    impressions: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    clicks: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    model_load_failures: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    events_accepted: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    events_rejected: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    throttled: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    online_ctr: Mapping[str, float] = field(default_factory=dict)
    models: tuple[ModelSlot, ...] = ()
    model_ready: float | None = None
    candidate_share: float | None = None
    last_event_at: float | None = None


def parse_snapshot(text: str, at: float) -> Snapshot:
    """Read an exposition text (what ``GET /metrics`` answers) into a :class:`Snapshot`."""
    counters: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
    buckets: dict[str, dict[float, float]] = defaultdict(dict)
    counts: dict[str, float] = defaultdict(float)
    sums: dict[str, float] = defaultdict(float)
    gauges: dict[str, float] = {}
    ctr: dict[str, float] = {}
    models: list[ModelSlot] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            spec = _COUNTERS.get(name)
            if spec is not None:
                target = counters[spec[0]]
                key = tuple(labels.get(label, "") for label in spec[1])
                target[key] = target.get(key, 0.0) + value
            elif name == f"{_LATENCY}_bucket":
                route_buckets = buckets[labels.get("route", "")]
                le = float(labels["le"])
                route_buckets[le] = route_buckets.get(le, 0.0) + value
            elif name == f"{_LATENCY}_count":
                counts[labels.get("route", "")] += value
            elif name == f"{_LATENCY}_sum":
                sums[labels.get("route", "")] += value
            elif name == "recsys_online_ctr":
                ctr[labels.get("model_version", "")] = value
            elif name == "recsys_model_info" and value > 0:
                models.append(
                    ModelSlot(labels.get("worker", ""), labels.get("alias", ""), labels["version"])
                )
            elif name in (
                "recsys_model_ready",
                "recsys_candidate_share",
                "recsys_last_event_timestamp_seconds",
            ):
                gauges[name] = value
    latency = {
        route: Histogram(tuple(sorted(found.items())), counts.get(route, 0.0), sums[route])
        for route, found in buckets.items()
    }
    last_event = gauges.get("recsys_last_event_timestamp_seconds")
    return Snapshot(
        at=at,
        latency=latency,
        online_ctr=ctr,
        models=tuple(sorted(models, key=lambda m: (m.worker, m.alias))),
        model_ready=gauges.get("recsys_model_ready"),
        candidate_share=gauges.get("recsys_candidate_share"),
        last_event_at=last_event if last_event else None,
        **{name: dict(values) for name, values in counters.items()},
    )


def counter_increase(now: Mapping[K, float], then: Mapping[K, float] | None) -> dict[K, float]:
    """Per-key increase of counters between two readings (a decrease means a reset)."""
    if then is None:
        return dict(now)
    found = {}
    for key, value in now.items():
        delta = value - then.get(key, 0.0)
        found[key] = value if delta < 0 else delta
    return found


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _quantiles(hist: Histogram | None) -> dict[str, Any] | None:
    if hist is None:
        return None
    figures: dict[str, Any] = {"count": _number(hist.count)}
    for name, q in QUANTILES:
        figures[f"{name}_ms"] = _ms(hist.quantile(q))
    figures["mean_ms"] = _ms(hist.total / hist.count) if hist.count > 0 else None
    return figures


def summarize(now: Snapshot, then: Snapshot | None) -> dict[str, Any]:
    """The dashboard's figures: totals since the server started, and rates over the
    window from ``then`` to ``now`` (None without a usable earlier reading)."""
    span = now.at - then.at if then is not None else 0.0
    windowed = then is not None and span > 0

    def per_second(n: float) -> float | None:
        return n / span if windowed else None

    calls_total: dict[tuple[str, str], float] = defaultdict(float)
    for (route, _method, status), n in now.requests.items():
        if not route.startswith(EXCLUDED_ROUTE_PREFIX):
            calls_total[(route, status)] += n
    calls_window: dict[tuple[str, str], float] = defaultdict(float)
    if windowed:
        for (route, _method, status), n in counter_increase(
            now.requests, then.requests if then else None
        ).items():
            if not route.startswith(EXCLUDED_ROUTE_PREFIX):
                calls_window[(route, status)] += n
    total_calls = sum(calls_total.values())
    window_calls = sum(calls_window.values())
    errors_total = sum(n for (_, status), n in calls_total.items() if status.startswith("5"))
    errors_window = sum(n for (_, status), n in calls_window.items() if status.startswith("5"))

    served_total: dict[str, float] = defaultdict(float)
    for (served_by, _version), n in now.recommendations.items():
        served_total[served_by] += n
    served_window: dict[str, float] = defaultdict(float)
    if windowed:
        for (served_by, _version), n in counter_increase(
            now.recommendations, then.recommendations if then else None
        ).items():
            served_window[served_by] += n
    answers_total = sum(served_total.values())
    answers_window = sum(served_window.values())

    hist = now.latency.get(RECOMMENDATIONS_ROUTE)
    hist_window = (
        hist.since(then.latency.get(RECOMMENDATIONS_ROUTE) if then else None)
        if hist is not None and windowed
        else None
    )
    versions = sorted({k[0] for k in now.impressions} | {k[0] for k in now.clicks})
    return {
        "generated_at": now.at,
        "window": {"seconds": span, "start": then.at} if windowed and then else None,
        "calls": {
            "total": _number(total_calls),
            "per_second": per_second(window_calls),
            "excluded_route_prefix": EXCLUDED_ROUTE_PREFIX,
            "by_route": [
                {
                    "route": route,
                    "status": status,
                    "total": _number(n),
                    "per_second": per_second(calls_window.get((route, status), 0.0)),
                }
                for (route, status), n in sorted(calls_total.items())
            ],
        },
        "errors": {
            "total_5xx": _number(errors_total),
            "per_second": per_second(errors_window),
            "ratio": _ratio(errors_window, window_calls) if windowed else None,
            "ratio_since_start": _ratio(errors_total, total_calls),
        },
        "latency": {
            "route": RECOMMENDATIONS_ROUTE,
            "window": _quantiles(hist_window) if hist_window and hist_window.count else None,
            "since_start": _quantiles(hist) if hist and hist.count else None,
        },
        "recommendations": {
            "total": _number(answers_total),
            "per_second": per_second(answers_window),
            "by_served_by": {k: _number(v) for k, v in sorted(served_total.items())},
            "fallback_share": _ratio(served_total.get("fallback", 0.0), answers_total),
            "fallback_share_window": (
                _ratio(served_window.get("fallback", 0.0), answers_window) if windowed else None
            ),
            "fallbacks_by_reason": {k[0]: _number(v) for k, v in sorted(now.fallbacks.items())},
        },
        "ctr": [
            {
                "model_version": version,
                "impressions": _number(now.impressions.get((version,), 0.0)),
                "clicks": _number(now.clicks.get((version,), 0.0)),
                "ctr": now.online_ctr.get(version),
            }
            for version in versions
        ],
        "models": {
            "ready": None if now.model_ready is None else now.model_ready >= 1,
            "candidate_share": now.candidate_share,
            "workers": [
                {"worker": m.worker, "alias": m.alias, "version": m.version} for m in now.models
            ],
            "load_failures": {k[0]: _number(v) for k, v in sorted(now.model_load_failures.items())},
        },
        "events": {
            "accepted": {k[0]: _number(v) for k, v in sorted(now.events_accepted.items())},
            "rejected": {k[0]: _number(v) for k, v in sorted(now.events_rejected.items())},
            "last_event_at": now.last_event_at,
            "throttled": {k[0]: _number(v) for k, v in sorted(now.throttled.items())},
        },
    }


class SnapshotRing:
    """The readings this process took recently, to compare the newest one against.

    ``baseline`` prefers the oldest reading inside the window (a steady rate over the
    whole window); if none is there (this worker was not polled lately) it takes the
    newest older one and the answer says how long the window really was.
    """

    def __init__(self, horizon_seconds: float = 900.0, max_samples: int = 1024) -> None:
        self.horizon = horizon_seconds
        self._samples: deque[Snapshot] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def baseline(
        self, at: float, window_seconds: float, min_span: float = MIN_SPAN_SECONDS
    ) -> Snapshot | None:
        with self._lock:
            usable = [s for s in self._samples if at - self.horizon <= s.at <= at - min_span]
        if not usable:
            return None
        inside = [s for s in usable if s.at >= at - window_seconds]
        return inside[0] if inside else usable[-1]

    def add(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._samples.append(snapshot)
            while self._samples and self._samples[0].at < snapshot.at - self.horizon:
                self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)


# --- promotions and rollbacks --------------------------------------------------------


class AliasMove(Protocol):
    """What the page needs of ``recsys_serving.registry.AliasEvent``."""

    @property
    def at(self) -> Any: ...
    @property
    def alias(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def version(self) -> str | None: ...
    @property
    def previous(self) -> str | None: ...
    @property
    def share(self) -> float | None: ...
    @property
    def reason(self) -> str: ...


PROMOTED_PREFIX = "promoted to production"


def _unwound(stack: list[str], current: str | None) -> list[str]:
    """The registry's rollback skips entries equal to the version being left."""
    while stack and stack[0] == current:
        stack = stack[1:]
    return stack


def classify(
    event: AliasMove, production_stack: list[str] | None = None, complete: bool = False
) -> str:
    """Name an alias move the way an operator thinks of it.

    ``production_stack`` is the registry's ``previous_versions`` of production as
    replayed from the older records (most recent first): production moving to its top
    is what ``ModelRegistry.rollback()`` does, so that is a rollback. ``complete`` says
    the replay started at production's first move; otherwise an empty stack means the
    earlier moves are beyond the history read, and production moving to an older version
    (versions sort by creation time, ``v<YYYYmmddHHMMSS>-<hex>``) counts as a rollback.
    A candidate set starts a phase-in; a candidate cleared because it was promoted
    completed it, any other clear stopped it (a canary rollback).
    """
    if event.alias == PRODUCTION:
        if event.action == "clear":
            return "production cleared"
        stack = _unwound(list(production_stack or []), event.previous)
        if stack:
            return "rollback" if event.version == stack[0] else "promotion"
        if complete:
            return "promotion"
        if event.previous and event.version and event.version < event.previous:
            return "rollback"
        return "promotion"
    if event.action == "set":
        return "phase-in"
    if event.reason.startswith(PROMOTED_PREFIX):
        return "phase-in completed"
    return "rollback"


def describe_history(events: Iterable[AliasMove]) -> list[dict[str, Any]]:
    """Rows for the page, newest first as given (``ModelRegistry.history()`` order)."""
    ordered = list(events)
    stack: list[str] = []
    complete = False
    kinds: list[str] = []
    for event in reversed(ordered):  # replay oldest first, as the registry moved
        if event.alias == PRODUCTION and event.previous is None:
            stack, complete = [], True  # production's first move: nothing before it
        kind = classify(event, stack, complete)
        kinds.append(kind)
        if event.alias != PRODUCTION:
            continue
        unwound = _unwound(stack, event.previous)
        if kind == "rollback" and unwound and unwound[0] == event.version:
            stack = unwound[1:]
        elif event.previous and event.previous != event.version:
            stack = [event.previous, *stack]
    return [
        {
            "at": e.at.isoformat() if hasattr(e.at, "isoformat") else str(e.at),
            "kind": kind,
            "alias": e.alias,
            "action": e.action,
            "version": e.version,
            "previous": e.previous,
            "share": e.share,
            "reason": e.reason,
        }
        for e, kind in zip(ordered, reversed(kinds), strict=True)
    ]


class CachedHistory:
    """The registry history, read at most every ``ttl`` seconds per process: every open
    page polls, and on S3 a history read is a LIST plus one GET per record."""

    def __init__(
        self,
        read: Callable[[], list[dict[str, Any]]],
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._read_at = -math.inf

    def get(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            if self._value is None or now - self._read_at >= self.ttl:
                try:
                    self._value = {"events": self.read(), "error": None}
                except Exception as exc:  # the page shows it; the other figures still load
                    self._value = {"events": [], "error": f"{type(exc).__name__}: {exc}"}
                self._read_at = now
            return self._value
