"""Helpers for the closed-loop tests: synthetic feedback in the lake, tiny registered
bundles, and the resources the monitoring sensors need."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from recsys_assets.alerts.notifier import NotifierResource
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.resources import LakeResource
from recsys_assets.tracking.resource import MlflowResource
from recsys_serving.lake import Lake, LocalLake, read_parquet, write_parquet
from recsys_serving.layout import weblogs_key
from recsys_serving.model.bundle import BundleWriter
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings

SCHEMA = {
    "event_id": pl.String,
    "event_type": pl.String,
    "user_id": pl.String,
    "item_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "request_id": pl.String,
    "position": pl.Int32,
    "model_version": pl.String,
}


def write_feedback(
    lake: Lake,
    version: str,
    start: datetime,
    minutes: int,
    ctr: float | list[float],
    rng: np.random.Generator,
    per_minute: int = 200,
    slate: int = 10,
) -> int:
    """Impressions (``per_minute`` a minute, slates of ``slate``) and their clicks, as
    processed weblogs partitions; returns the number of clicks written."""
    rates = ctr if isinstance(ctr, list) else [ctr] * minutes
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    clicks = 0
    tag = f"{version}-{start.timestamp():.0f}"
    for minute in range(minutes):
        for req in range(per_minute // slate):
            at = start + timedelta(minutes=minute, seconds=req * 60 * slate / per_minute)
            rid = f"r-{tag}-{minute}-{req}"
            for pos in range(slate):
                item = f"i{(req * 7 + pos) % 97}"
                base = {"user_id": f"u{req % 40}", "item_id": item, "request_id": rid}
                base |= {"position": pos, "model_version": version}
                day = at.date().isoformat()
                shown = {"event_id": f"{rid}-{pos}", "event_type": "impression", "ts": at}
                rows[day].append(base | shown)
                if rng.random() < rates[minute]:
                    clicks += 1
                    click_at = at + timedelta(seconds=3)
                    rows[day].append(
                        base | {"event_id": f"{rid}-{pos}-c", "event_type": "click", "ts": click_at}
                    )
    for day, day_rows in rows.items():
        frame = pl.DataFrame(day_rows, schema=SCHEMA)
        key = weblogs_key(day)
        if lake.exists(key):
            frame = pl.concat([read_parquet(lake, key), frame])
        write_parquet(lake, key, frame)
    return clicks


def register_model(registry: ModelRegistry, root: Path, tag: str) -> str:
    """A tiny valid bundle (the sensors never load the model itself)."""
    target = root / f"bundle-{tag}"
    with BundleWriter(target) as writer:
        (writer.path / "ranker.txt").write_text(f"model {tag}\n")
        writer.manifest.update(metrics={"ndcg@10": 0.1}, params={"tag": tag})
    return registry.register(target).version


def closed_loop_config(**overrides: Any) -> ClosedLoopConfig:
    values: dict[str, Any] = {
        "ctr_bucket_seconds": 60,
        "ctr_recent_minutes": 10,
        "ctr_baseline_minutes": 30,
        "ctr_min_impressions": 500,
        "ctr_alpha": 0.01,
        "ctr_min_relative_drop": 0.1,
        "ctr_click_delay_seconds": 0,
        "retrain_cooldown_minutes": 30,
        "landing_segment_max_age_seconds": 0,
        "canary_ramp": [0.1, 0.5, 1.0],
        "canary_min_impressions": 800,
        "canary_alpha": 0.05,
        "canary_margin": 0.05,
        "canary_max_minutes": 60,
    }
    return ClosedLoopConfig.from_settings(Settings(home="/nonexistent", **(values | overrides)))


def resources(lake: LocalLake, webhook_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    return {
        "lake": LakeResource(uri=str(lake.root)),
        "closed_loop": closed_loop_config(**overrides),
        "notifier": NotifierResource(webhook_url=webhook_url),
        "mlflow": MlflowResource(tracking_uri="off"),
    }


@dg.op
def _boom() -> None:
    raise RuntimeError("training window is empty")


@dg.job(name="retrain_job", tags={"recsys/pipeline": "retrain", "recsys/trigger": "ctr_drop"})
def failing_retrain() -> None:
    """A retraining that fails the way a real one can, under the real job's name and tags."""
    _boom()


def run_failure_request(
    sensor: dg.RunFailureSensorDefinition,
    instance: dg.DagsterInstance,
    failed: dg.ExecuteInProcessResult,
    resources: Mapping[str, Any],
) -> dg.RunRequest | dg.SkipReason | None:
    """What the run-failure sensor asks for about ``failed``, evaluated as the daemon does.

    The context is entered and left like the daemon's: one built with resources that is
    never exited leaves Dagster's state storage of this (soon gone) instance current for
    every later test in the process.
    """
    with dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=failed.dagster_run,
        dagster_event=failed.get_run_failure_event(),
        resources=dict(resources),
    ).for_run_failure() as context:
        return sensor(context)
