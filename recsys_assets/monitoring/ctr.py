"""Online click-through rate, and the test that tells a real drop from noise.

CTR here is *attributed*: a click counts for the impression it came from, found by
joining on ``request_id`` and ``item_id`` (the served slate logs one impression per
item with the response's ``request_id``; the client echoes it on the click). A click
that matches no logged impression is counted as an orphan, never as a hit, so a
client that invents request ids cannot inflate a model's CTR.

The series is bucketed on the *impression* time, per ``model_version``, with counts
(requests, impressions, clicks), because a rate without its denominator cannot be
tested. The drop test compares a recent window with the baseline window just before
it for one model version with a one-sided two-proportion z-test; it refuses any
verdict until both windows hold enough impressions, and ignores drops too small to
be worth a retraining, so noise on a quiet site never launches a run.

Sources: the processed ``weblogs`` partitions (deduplicated, bot-filtered) for the
dates a window touches, plus the *landing tail*, the sealed landing segments the
last ``weblogs`` run has not seen yet. The tail is read because the processed
partitions trail live traffic by a landing-sensor tick plus a run (a minute or
more), while sealed segments trail it by ``landing_segment_max_age_seconds``; the
sensors then react in seconds rather than minutes. The tail is deduplicated by
``event_id`` against the processed rows; business rules (bot filter) are not
re-applied to it, which affects at most a few minutes of events and is corrected
as soon as the partition is reprocessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl
from scipy.stats import norm

from recsys_assets.weblogs.processing import read_landing
from recsys_serving.lake import Lake, read_parquet
from recsys_serving.landing import list_sealed
from recsys_serving.layout import LANDING_AREA, weblogs_key
from recsys_serving.policies import DropPolicy, floor_to_bucket
from recsys_serving.policies import utc as _utc

IMPRESSION = "impression"
CLICK = "click"
UNKNOWN_VERSION = "unknown"
FEEDBACK_COLUMNS = ["event_id", "event_type", "item_id", "ts", "request_id", "model_version"]
# Landing files sealed this long before a partition was (re)written may or may not be
# in it (they were sealed while the run was reading); the event_id dedup sorts them out.
LANDING_OVERLAP_SECONDS = 600.0

FEEDBACK_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "event_type": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "request_id": pl.String(),
    "model_version": pl.String(),
}

SERIES_SCHEMA: dict[str, pl.DataType] = {
    "bucket_start": pl.Datetime("us", "UTC"),
    "model_version": pl.String(),
    "requests": pl.Int64(),
    "impressions": pl.Int64(),
    "clicks": pl.Int64(),
    "ctr": pl.Float64(),
}


# ----------------------------------------------------------------------- reading
def feedback_days(since: datetime, until: datetime) -> list[str]:
    """The UTC dates (weblogs partitions) a time range touches."""
    start, end = _utc(since).date(), _utc(until).date()
    return [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]


def read_feedback(
    lake: Lake,
    since: datetime,
    until: datetime,
    *,
    include_landing: bool = True,
) -> pl.DataFrame:
    """Impressions and clicks with a ``request_id`` between ``since`` and ``until``."""
    since, until = _utc(since), _utc(until)
    frames: list[pl.DataFrame] = []
    for day in feedback_days(since, until):
        processed, written_at = _read_partition(lake, day)
        frames.append(processed)
        if include_landing:
            frames.append(_read_landing_tail(lake, day, written_at))
    events = pl.concat([pl.DataFrame(schema=FEEDBACK_SCHEMA), *frames], how="vertical_relaxed")
    # Processed rows come first, so the dedup keeps them over their landing copies.
    return events.unique("event_id", keep="first", maintain_order=True).filter(
        (pl.col("ts") >= since) & (pl.col("ts") < until)
    )


def _feedback_filter() -> pl.Expr:
    return pl.col("event_type").is_in([IMPRESSION, CLICK]) & pl.col("request_id").is_not_null()


def _read_partition(lake: Lake, day: str) -> tuple[pl.DataFrame, float | None]:
    key = weblogs_key(day)
    listed = list(lake.list(key))
    if not listed:
        return pl.DataFrame(schema=FEEDBACK_SCHEMA), None
    path = lake.local_path(key)
    if path is not None:
        df = pl.scan_parquet(path).select(FEEDBACK_COLUMNS).filter(_feedback_filter()).collect()
    else:
        df = read_parquet(lake, key, FEEDBACK_COLUMNS).filter(_feedback_filter())
    return df.cast(FEEDBACK_SCHEMA), listed[0].mtime  # type: ignore[arg-type]


def _read_landing_tail(lake: Lake, day: str, written_at: float | None) -> pl.DataFrame:
    files = list_sealed(lake, LANDING_AREA, date=day)
    if written_at is not None:
        floor_ns = int((written_at - LANDING_OVERLAP_SECONDS) * 1e9)
        files = [f for f in files if f.seal_ns >= floor_ns]
    if not files:
        return pl.DataFrame(schema=FEEDBACK_SCHEMA)
    landed, _unreadable = read_landing(lake, files)
    return (
        landed.filter(_feedback_filter() & pl.col("event_id").is_not_null())
        .with_columns(
            pl.from_epoch((pl.col("ts") * 1_000_000).round().cast(pl.Int64), time_unit="us")
            .dt.replace_time_zone("UTC")
            .alias("ts")
        )
        .select(FEEDBACK_COLUMNS)
        .cast(FEEDBACK_SCHEMA)  # type: ignore[arg-type]
    )


# -------------------------------------------------------------------- attribution
@dataclass(frozen=True)
class Attributed:
    """One row per impression with whether it was clicked, plus clicks nobody showed."""

    impressions: pl.DataFrame  # ts, model_version, request_id, item_id, clicked
    orphan_clicks: int


def attribute_clicks(events: pl.DataFrame) -> Attributed:
    """Join clicks to the impressions they came from on ``(request_id, item_id)``."""
    impressions = (
        events.filter(pl.col("event_type") == IMPRESSION)
        .sort("ts")
        .unique(["request_id", "item_id"], keep="first", maintain_order=True)
        .select(
            "ts",
            pl.col("model_version").fill_null(UNKNOWN_VERSION),
            "request_id",
            "item_id",
        )
    )
    clicks = (
        events.filter(pl.col("event_type") == CLICK)
        .select("request_id", "item_id")
        .unique()
        .with_columns(pl.lit(True).alias("clicked"))
    )
    joined = impressions.join(clicks, on=["request_id", "item_id"], how="left").with_columns(
        pl.col("clicked").fill_null(False)
    )
    matched = int(joined["clicked"].sum() or 0)
    return Attributed(joined, orphan_clicks=clicks.height - matched)


def ctr_series(attributed: Attributed | pl.DataFrame, bucket_seconds: int) -> pl.DataFrame:
    """CTR per impression-time bucket and model version, with its counts."""
    if bucket_seconds < 1:
        raise ValueError("bucket_seconds must be at least 1")
    rows = attributed.impressions if isinstance(attributed, Attributed) else attributed
    if rows.is_empty():
        return pl.DataFrame(schema=SERIES_SCHEMA)
    return (
        rows.group_by(
            pl.col("ts").dt.truncate(f"{bucket_seconds}s").alias("bucket_start"),
            "model_version",
        )
        .agg(
            pl.col("request_id").n_unique().cast(pl.Int64).alias("requests"),
            pl.len().cast(pl.Int64).alias("impressions"),
            pl.col("clicked").sum().cast(pl.Int64).alias("clicks"),
        )
        .with_columns((pl.col("clicks") / pl.col("impressions")).alias("ctr"))
        .sort("bucket_start", "model_version")
        .cast(SERIES_SCHEMA)  # type: ignore[arg-type]
    )


def load_ctr_series(
    lake: Lake,
    now: datetime,
    *,
    lookback: timedelta,
    bucket_seconds: int,
    include_landing: bool = True,
) -> tuple[pl.DataFrame, int]:
    """The series over ``lookback`` before ``now`` and the number of orphan clicks."""
    since = floor_to_bucket(_utc(now) - lookback, bucket_seconds)
    events = read_feedback(lake, since, _utc(now), include_landing=include_landing)
    attributed = attribute_clicks(events)
    return ctr_series(attributed, bucket_seconds), attributed.orphan_clicks


# --------------------------------------------------------------------- windows
@dataclass(frozen=True)
class WindowStats:
    """Counts of one model version over ``[start, end)``."""

    start: datetime
    end: datetime
    impressions: int
    clicks: int

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": None if self.ctr is None else round(self.ctr, 6),
        }


def window_stats(
    series: pl.DataFrame, model_version: str, start: datetime, end: datetime
) -> WindowStats:
    """Sum the buckets of one version that start inside ``[start, end)``."""
    rows = series.filter(
        (pl.col("model_version") == model_version)
        & (pl.col("bucket_start") >= _utc(start))
        & (pl.col("bucket_start") < _utc(end))
    )
    return WindowStats(
        start=_utc(start),
        end=_utc(end),
        impressions=int(rows["impressions"].sum() or 0),
        clicks=int(rows["clicks"].sum() or 0),
    )


# -------------------------------------------------------------------- the test
Alternative = Literal["less", "greater"]


def two_proportion_ztest(
    clicks_a: int,
    n_a: int,
    clicks_b: int,
    n_b: int,
    *,
    alternative: Alternative,
    margin: float = 0.0,
) -> tuple[float | None, float | None]:
    """One-sided z-test of ``p_a`` against ``(1 - margin) * p_b``; ``(z, p_value)``.

    With ``margin == 0`` it is the classic pooled test of ``p_a < p_b`` (or ``>``).
    With a margin it is the non-inferiority test of ``p_a > (1 - margin) p_b``, whose
    null hypothesis is not "equal", so the variance is not pooled (Wald form).
    Returns ``(None, None)`` when the variance is zero (no clicks, or all clicks),
    where no test can say anything.
    """
    if n_a <= 0 or n_b <= 0:
        return None, None
    p_a, p_b = clicks_a / n_a, clicks_b / n_b
    if margin == 0.0:
        pooled = (clicks_a + clicks_b) / (n_a + n_b)
        var = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
        diff = p_a - p_b
    else:
        factor = 1.0 - margin
        var = p_a * (1.0 - p_a) / n_a + factor**2 * p_b * (1.0 - p_b) / n_b
        diff = p_a - factor * p_b
    if var <= 0.0:
        return None, None
    z = diff / math.sqrt(var)
    p_value = float(norm.cdf(z)) if alternative == "less" else float(norm.sf(z))
    return float(z), p_value


DropOutcome = Literal["drop", "no_drop", "small_drop", "thin_evidence", "warming_up", "no_model"]


@dataclass(frozen=True)
class DropVerdict:
    """The drop test's answer with everything needed to audit it later."""

    outcome: DropOutcome
    model_version: str | None
    recent: WindowStats | None
    baseline: WindowStats | None
    relative_drop: float | None
    z: float | None
    p_value: float | None
    policy: DropPolicy

    @property
    def dropped(self) -> bool:
        return self.outcome == "drop"

    def describe(self) -> str:
        if self.recent is None or self.baseline is None:
            return f"{self.outcome}: no production model"
        base, recent = self.baseline.ctr, self.recent.ctr
        text = (
            f"{self.outcome}: {self.model_version} CTR "
            f"{_pct(base)} -> {_pct(recent)} "
            f"({self.baseline.impressions} -> {self.recent.impressions} impressions)"
        )
        if self.p_value is not None:
            text += f", z={self.z:.2f}, p={self.p_value:.2g}"
        return text

    def evidence(self) -> dict[str, Any]:
        """JSON-ready; what the retraining run's tags and the alert carry."""
        return {
            "outcome": self.outcome,
            "model_version": self.model_version,
            "recent": None if self.recent is None else self.recent.as_dict(),
            "baseline": None if self.baseline is None else self.baseline.as_dict(),
            "relative_drop": _round(self.relative_drop),
            "z": _round(self.z),
            "p_value": None if self.p_value is None else float(f"{self.p_value:.4g}"),
            "alpha": self.policy.alpha,
            "min_relative_drop": self.policy.min_relative_drop,
            "min_impressions": self.policy.min_impressions,
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def drop_test(
    series: pl.DataFrame,
    model_version: str | None,
    now: datetime,
    policy: DropPolicy,
) -> DropVerdict:
    """Is the recent CTR of ``model_version`` significantly below its baseline?

    Both windows only count the given version, so a model promoted a minute ago has
    no baseline yet and cannot be blamed for its predecessor's numbers. The version's
    traffic must also have begun before the baseline window (``warming_up`` until it
    has): a baseline made of a service's first seconds compares two different regimes.
    """
    if model_version is None:
        return DropVerdict("no_model", None, None, None, None, None, None, policy)
    baseline_start, recent_start, end = policy.windows(now)
    baseline = window_stats(series, model_version, baseline_start, recent_start)
    recent = window_stats(series, model_version, recent_start, end)

    if min(recent.impressions, baseline.impressions) < policy.min_impressions:
        return DropVerdict(
            "thin_evidence", model_version, recent, baseline, None, None, None, policy
        )
    earlier = series.filter(
        (pl.col("model_version") == model_version) & (pl.col("bucket_start") < baseline_start)
    )
    if earlier.is_empty():
        return DropVerdict("warming_up", model_version, recent, baseline, None, None, None, policy)
    assert recent.ctr is not None and baseline.ctr is not None
    relative = 1.0 - recent.ctr / baseline.ctr if baseline.ctr > 0 else None
    z, p = two_proportion_ztest(
        recent.clicks,
        recent.impressions,
        baseline.clicks,
        baseline.impressions,
        alternative="less",
    )
    outcome: DropOutcome
    if p is None or p >= policy.alpha:
        outcome = "no_drop"
    elif relative is None or relative < policy.min_relative_drop:
        outcome = "small_drop"
    else:
        outcome = "drop"
    return DropVerdict(outcome, model_version, recent, baseline, relative, z, p, policy)


def series_rows(
    series: pl.DataFrame, versions: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """JSON-ready rows (ISO times) for metadata, reports and the monitoring snapshot."""
    if versions is not None:
        series = series.filter(pl.col("model_version").is_in(list(versions)))
    return [
        {**row, "bucket_start": row["bucket_start"].isoformat(), "ctr": round(row["ctr"], 6)}
        for row in series.iter_rows(named=True)
    ]
