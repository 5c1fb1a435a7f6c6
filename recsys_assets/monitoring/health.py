"""Service and model health from the server's own Prometheus metrics.

The server exports cumulative counters and histograms (names in
docs/architecture.md). One scrape says little; two scrapes say what happened in
between. So a :class:`HealthSample` keeps the raw cumulative figures, and
:func:`health_between` turns two of them into the rates a person reads: calls,
error rate, latency quantiles of the recommendation route and the share of
fallback answers (the model-health signal: a store or index failing shows up
there before it shows up in CTR). A server restart resets counters; that interval
is then measured from zero rather than reported as negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "recsys_http_requests"
DURATION = "recsys_http_request_duration_seconds"
RECOMMENDATIONS = "recsys_recommendations"
RECOMMEND_ROUTE_HINT = "recommendations"


@dataclass
class HealthSample:
    """Cumulative figures of one scrape."""

    at: datetime
    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    client_errors: float = 0.0  # 4xx answers
    answers: dict[str, float] = field(default_factory=dict)  # served_by -> count
    # Cumulative histogram of the recommendation route: upper bound -> count.
    latency_buckets: dict[float, float] = field(default_factory=dict)
    model_versions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "answers": self.answers,
            "latency_buckets": {_le(k): v for k, v in sorted(self.latency_buckets.items())},
            "model_versions": self.model_versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealthSample:
        return cls(
            at=datetime.fromisoformat(data["at"]),
            requests=float(data["requests"]),
            errors=float(data["errors"]),
            client_errors=float(data.get("client_errors", 0.0)),
            answers={k: float(v) for k, v in data.get("answers", {}).items()},
            latency_buckets={float(k): float(v) for k, v in data["latency_buckets"].items()},
            model_versions=list(data.get("model_versions", [])),
        )


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def parse_metrics(text: str, at: datetime | None = None) -> HealthSample:
    """Read the figures health needs from a Prometheus text exposition."""
    sample = HealthSample(at=at or datetime.now(UTC))
    versions: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == f"{REQUESTS}_total":
                sample.requests += s.value
                status = str(labels.get("status", ""))
                if status.startswith("5"):
                    sample.errors += s.value
                elif status.startswith("4"):
                    sample.client_errors += s.value
            elif s.name == f"{DURATION}_bucket":
                if RECOMMEND_ROUTE_HINT not in str(labels.get("route", "")):
                    continue
                bound = float(labels["le"])
                sample.latency_buckets[bound] = sample.latency_buckets.get(bound, 0.0) + s.value
            elif s.name == f"{RECOMMENDATIONS}_total":
                who = str(labels.get("served_by", "unknown"))
                sample.answers[who] = sample.answers.get(who, 0.0) + s.value
            elif s.name == "recsys_model_info" and s.value:
                versions.add(f"{labels.get('alias', '?')}={labels.get('version', '?')}")
    sample.model_versions = sorted(versions)
    return sample


def scrape(url: str, timeout: float = 5.0) -> HealthSample:
    response = httpx.get(url, timeout=timeout)
    response.raise_for_status()
    return parse_metrics(response.text)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the best a histogram can say about its top bucket
            span = count - lower_count
            fraction = (rank - lower_count) / span if span > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def health_between(previous: HealthSample | None, current: HealthSample) -> dict[str, Any]:
    """What happened between two scrapes (or since the server started)."""

    def delta(now: float, before: float) -> float:
        return now - before if now >= before else now  # a restart reset the counter

    prev = previous or HealthSample(at=current.at)
    reset = current.requests < prev.requests
    if reset:
        prev = HealthSample(at=prev.at)
    calls = delta(current.requests, prev.requests)
    errors = delta(current.errors, prev.errors)
    answers = {k: delta(v, prev.answers.get(k, 0.0)) for k, v in current.answers.items()}
    buckets = {
        k: delta(v, prev.latency_buckets.get(k, 0.0)) for k, v in current.latency_buckets.items()
    }
    seconds = (current.at - prev.at).total_seconds() if previous and not reset else None
    answered = sum(answers.values())

    def ms(q: float) -> float | None:
        value = histogram_quantile(q, buckets)
        return None if value is None else round(value * 1000, 3)

    return {
        "at": current.at.isoformat(),
        "since": prev.at.isoformat() if previous and not reset else None,
        "calls": int(calls),
        "rps": round(calls / seconds, 3) if seconds else None,
        "errors_5xx": int(errors),
        "error_rate": round(errors / calls, 6) if calls else None,
        "latency_p50_ms": ms(0.5),
        "latency_p95_ms": ms(0.95),
        "latency_p99_ms": ms(0.99),
        "answers": {k: int(v) for k, v in answers.items()},
        "fallback_share": round(answers.get("fallback", 0.0) / answered, 6) if answered else None,
        "model_versions": current.model_versions,
        "counter_reset": reset,
    }
