"""What the closed-loop report shows, gathered from the run's own records.

* the live simulator's timeline (``recsys simulate live --timeline``): per interval and
  model version the observed CTR (clicks drawn by the ground truth over impressions
  served), the *expected* CTR of the served slates under the ground truth (the model's
  quality without click noise) and the oracle CTR (the best slates the truth allows);
* the closed loop's decisions (``monitoring/decisions/`` in the lake): drop detected,
  canary started, ramps, promotion, rollback, failed retraining;
* the retraining runs (start and end, from the Dagster instance, passed in by the
  caller so this module stays free of Dagster).

Phases: *before* the drift, *during* (drift until the promotion of a new model, the
stale model's traffic only) and *after* the promotion. Because users and the ground
truth are the same during and after, the change of expected CTR between those two
phases is entirely the new model's doing; :attr:`Recovery.model_share` states it
against what the drift took.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from recsys_serving.layout import utc_datetime

MARKER_LABELS = {
    "drift": "preferences drift",
    "drop_detected": "CTR drop detected",
    "retrain": "retraining",
    "canary_started": "canary started",
    "ramp": "canary ramped",
    "promote": "promoted",
    "rollback": "rolled back",
    "rejected": "challenger rejected",
    "retrain_failed": "retraining failed",
}


@dataclass(frozen=True)
class Marker:
    kind: str
    at: datetime
    label: str
    end: datetime | None = None  # a span (retraining runs)
    version: str | None = None


@dataclass(frozen=True)
class RetrainRun:
    run_id: str
    start: datetime
    end: datetime | None
    status: str
    trigger: str | None = None


@dataclass(frozen=True)
class Phase:
    name: str
    start: datetime
    end: datetime
    impressions: int
    clicks: int
    expected_clicks: float
    oracle_clicks: float

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None

    @property
    def expected_ctr(self) -> float | None:
        return self.expected_clicks / self.impressions if self.impressions else None

    @property
    def oracle_ctr(self) -> float | None:
        return self.oracle_clicks / self.impressions if self.impressions else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": _r(self.ctr),
            "expected_ctr": _r(self.expected_ctr),
            "oracle_ctr": _r(self.oracle_ctr),
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


@dataclass(frozen=True)
class Recovery:
    """How far CTR came back, and how much of that the new model did."""

    observed: float | None  # (after - during) / (before - during), observed CTR
    expected: float | None  # the same on expected CTR (no click noise)
    model_share: float | None  # expected-CTR gain after promotion / loss at the drift

    def as_dict(self) -> dict[str, Any]:
        return {k: _r(v) for k, v in self.__dict__.items()}


@dataclass
class ReportData:
    start: datetime
    end: datetime
    intervals: pl.DataFrame  # at, minute, model_version, label, impressions, clicks, ctr, ...
    markers: list[Marker]
    phases: dict[str, Phase]
    labels: dict[str, str]  # model version -> legend label
    live: dict[str, Any] = field(default_factory=dict)  # the simulator's end record

    @property
    def recovery(self) -> Recovery | None:
        before, during, after = (self.phases.get(n) for n in ("before", "during", "after"))
        if before is None or during is None or after is None:
            return None

        def ratio(b: float | None, d: float | None, a: float | None) -> float | None:
            if b is None or d is None or a is None or b - d <= 0:
                return None
            return (a - d) / (b - d)

        exp = ratio(before.expected_ctr, during.expected_ctr, after.expected_ctr)
        return Recovery(
            observed=ratio(before.ctr, during.ctr, after.ctr),
            expected=exp,
            model_share=exp,
        )

    def minute(self, at: datetime) -> float:
        return (at - self.start).total_seconds() / 60.0


def read_timeline(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _interval_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    nominal = max(
        (r.get("seconds", 0.0) for r in records if r.get("type") == "interval"), default=0.0
    )
    for rec in records:
        if rec.get("type") != "interval":
            continue
        if rec.get("seconds", 0.0) < nominal / 2:
            continue  # the stub interval at the end: too few impressions to plot
        mid = utc_datetime(rec["ts"] - rec["seconds"] / 2)
        for version, stats in rec.get("by_version", {}).items():
            n = stats["impressions"]
            if not n:
                continue
            rows.append(
                {
                    "at": mid,
                    "model_version": version,
                    "impressions": n,
                    "clicks": stats["clicks"],
                    "expected_clicks": (stats.get("expected_ctr") or 0.0) * n,
                    "oracle_clicks": (stats.get("oracle_ctr") or 0.0) * n,
                }
            )
    return rows


def _phase(name: str, rows: pl.DataFrame, start: datetime, end: datetime) -> Phase | None:
    part = rows.filter((pl.col("at") >= start) & (pl.col("at") < end))
    if part.is_empty():
        return None
    return Phase(
        name,
        start,
        end,
        int(part["impressions"].sum()),
        int(part["clicks"].sum()),
        float(part["expected_clicks"].sum()),
        float(part["oracle_clicks"].sum()),
    )


def build_report_data(
    timeline: Path,
    decisions: list[dict[str, Any]],
    retrains: Sequence[RetrainRun] = (),
    *,
    initial_version: str | None = None,
) -> ReportData:
    records = read_timeline(timeline)
    starts = [r for r in records if r.get("type") == "start"]
    if not starts:
        raise ValueError(f"{timeline}: no start record; is this a `recsys simulate live` timeline?")
    start = utc_datetime(starts[0]["ts"])
    ends = [r for r in records if r.get("type") == "end"]
    end = utc_datetime(ends[-1]["ts"]) if ends else utc_datetime(records[-1]["ts"])
    rows = _interval_rows(records)
    schema = {
        "at": pl.Datetime("us", "UTC"),
        "model_version": pl.String,
        "impressions": pl.Int64,
        "clicks": pl.Int64,
        "expected_clicks": pl.Float64,
        "oracle_clicks": pl.Float64,
    }
    frame = pl.DataFrame(rows, schema=schema)

    markers: list[Marker] = [
        Marker("drift", utc_datetime(r["ts"]), MARKER_LABELS["drift"])
        for r in records
        if r.get("type") == "drift"
    ]
    for d in decisions:
        at = datetime.fromisoformat(d["at"])
        if start <= at <= end and d["action"] in MARKER_LABELS:
            markers.append(Marker(d["action"], at, MARKER_LABELS[d["action"]], None, d["version"]))
    for run in retrains:
        if run.end is None or run.end >= start:
            label = f"{MARKER_LABELS['retrain']} ({run.status.lower()})"
            markers.append(Marker("retrain", run.start, label, run.end or end))
    markers.sort(key=lambda m: m.at)

    # Legend labels in order of first appearance: the first model, then retrained ones.
    labels: dict[str, str] = {}
    seen = frame.sort("at")["model_version"].unique(maintain_order=True).to_list()
    if initial_version and initial_version in seen:
        seen.remove(initial_version)
        seen.insert(0, initial_version)
    for n, version in enumerate(seen):
        kind = "model before the drift" if n == 0 else f"retrained model #{n}"
        labels[version] = f"{kind} ({version[-8:]})"

    drift = next((m.at for m in markers if m.kind == "drift"), None)
    promoted = next(
        (m.at for m in markers if m.kind == "promote" and (drift is None or m.at > drift)), None
    )
    phases: dict[str, Phase] = {}
    cut_points = [("before", start, drift or end)]
    if drift is not None:
        cut_points.append(("during", drift, promoted or end))
    if promoted is not None:
        cut_points.append(("after", promoted, end))
    stale = next(iter(labels), None)  # the model serving when the live traffic began
    for name, lo, hi in cut_points:
        # "During" is the stale model's own traffic: a canary's share is not the drop.
        rows = frame.filter(pl.col("model_version") == stale) if name == "during" else frame
        phase = _phase(name, rows, lo, hi)
        if phase is not None:
            phases[name] = phase

    intervals = frame.with_columns(
        ((pl.col("at") - pl.lit(start)).dt.total_milliseconds() / 60_000).alias("minute"),
        (pl.col("clicks") / pl.col("impressions")).alias("ctr"),
        (pl.col("expected_clicks") / pl.col("impressions")).alias("expected_ctr"),
        (pl.col("oracle_clicks") / pl.col("impressions")).alias("oracle_ctr"),
        pl.col("model_version").replace_strict(labels, default=None).alias("label"),
    )
    return ReportData(
        start=start,
        end=end,
        intervals=intervals,
        markers=markers,
        phases=phases,
        labels=labels,
        live=ends[-1] if ends else {},
    )
