"""A point-in-time record of online CTR and service health, written to the lake.

The ``online_ctr`` asset calls :func:`take_snapshot` on a schedule. Each snapshot
stores the attributed CTR series over the drop test's lookback (Parquet) and one
health record (JSON) computed against the previous scrape, so "how did CTR and
latency evolve" is answerable from the lake alone, long after the server restarted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl

from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.ctr import (
    DropVerdict,
    drop_test,
    load_ctr_series,
    window_stats,
)
from recsys_assets.monitoring.health import HealthSample, health_between, scrape
from recsys_serving.lake import Lake, write_parquet
from recsys_serving.layout import CANDIDATE, CTR_AREA, HEALTH_AREA, PRODUCTION, dated_key
from recsys_serving.logging import get_logger
from recsys_serving.registry import ModelRegistry

log = get_logger(__name__)

HEALTH_LATEST = f"{HEALTH_AREA}/latest.json"


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    series: pl.DataFrame
    orphan_clicks: int
    production_version: str | None
    candidate_version: str | None
    candidate_share: float | None
    verdict: DropVerdict
    recent: dict[str, dict[str, Any]]  # version -> recent-window stats
    health: dict[str, Any] | None
    series_key: str
    health_key: str | None


def _stamp(at: datetime) -> tuple[str, str]:
    at = at.astimezone(UTC)
    return at.date().isoformat(), at.strftime("%Y%m%dT%H%M%S%fZ")


def record_health(
    lake: Lake, url: str, at: datetime, scraper: Any = scrape
) -> tuple[dict[str, Any], str]:
    """Scrape ``url`` and store health since the previous scrape; failures are recorded."""
    day, stamp = _stamp(at)
    key = dated_key(HEALTH_AREA, day, f"{stamp}.json")
    previous = None
    if lake.exists(HEALTH_LATEST):
        try:
            previous = HealthSample.from_dict(orjson.loads(lake.get_bytes(HEALTH_LATEST)))
        except (ValueError, KeyError) as exc:
            log.warning("monitoring.health_latest_unreadable", error=str(exc))
    try:
        sample: HealthSample = scraper(url)
    except Exception as exc:  # an unreachable server is itself the health signal
        record = {"at": at.isoformat(), "url": url, "error": f"{type(exc).__name__}: {exc}"}
        lake.put_bytes(key, orjson.dumps(record))
        return record, key
    record = {"url": url, **health_between(previous, sample)}
    lake.put_bytes(key, orjson.dumps(record))
    lake.put_bytes(HEALTH_LATEST, orjson.dumps(sample.as_dict()))
    return record, key


def take_snapshot(
    lake: Lake, config: ClosedLoopConfig, now: datetime | None = None, scraper: Any = scrape
) -> Snapshot:
    now = now or datetime.now(UTC)
    policy = config.drop_policy()
    registry = ModelRegistry(lake)
    production = registry.alias(PRODUCTION)
    candidate = registry.alias(CANDIDATE)
    series, orphans = load_ctr_series(
        lake, now, lookback=policy.lookback, bucket_seconds=policy.bucket_seconds
    )
    prod_version = production.version if production else None
    verdict = drop_test(series, prod_version, now, policy)
    _, recent_start, end = policy.windows(now)
    versions = [v for v in (prod_version, candidate.version if candidate else None) if v]
    recent = {v: window_stats(series, v, recent_start, end).as_dict() for v in versions}
    day, stamp = _stamp(now)
    series_key = dated_key(CTR_AREA, day, f"{stamp}.parquet")
    write_parquet(lake, series_key, series)
    health, health_key = (None, None)
    if config.service_metrics_url:
        health, health_key = record_health(lake, config.service_metrics_url, now, scraper)
    return Snapshot(
        at=now,
        series=series,
        orphan_clicks=orphans,
        production_version=prod_version,
        candidate_version=candidate.version if candidate else None,
        candidate_share=candidate.share if candidate else None,
        verdict=verdict,
        recent=recent,
        health=health,
        series_key=series_key,
        health_key=health_key,
    )


def read_series_history(lake: Lake, since: datetime) -> pl.DataFrame:
    """All snapshots since ``since`` merged: the newest snapshot wins for a bucket."""
    frames = []
    for obj in lake.list(f"{CTR_AREA}/"):
        if not obj.key.endswith(".parquet"):
            continue
        stamp = obj.key.rsplit("/", 1)[-1].removesuffix(".parquet")
        taken = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
        if taken < since - timedelta(days=1):
            continue
        path = lake.local_path(obj.key)
        df = pl.read_parquet(path) if path else pl.read_parquet(lake.get_bytes(obj.key))
        frames.append(df.with_columns(pl.lit(taken).alias("taken_at")))
    if not frames:
        return pl.DataFrame()
    merged = pl.concat(frames, how="vertical_relaxed").sort("taken_at")
    return (
        merged.unique(["bucket_start", "model_version"], keep="last")
        .filter(pl.col("bucket_start") >= since)
        .drop("taken_at")
        .sort("bucket_start", "model_version")
    )
