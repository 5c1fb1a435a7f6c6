"""Everything the closed loop adds to the code location, built for one ``Settings``.

Sensor intervals and the schedules' crons are definition-time values, so they are
built here from the settings (the demo and the end-to-end test shorten them through
``RECSYS_*`` variables) rather than at import.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from recsys_assets.monitoring.assets import canary_job, monitoring_job, online_ctr, production_model
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.operations import alert_job, model_alias_job
from recsys_assets.monitoring.schedules import (
    build_nightly_retrain_schedule,
    build_online_ctr_schedule,
)
from recsys_assets.monitoring.sensors import (
    build_ctr_drop_sensor,
    build_promotion_sensor,
    build_retrain_failure_sensor,
)
from recsys_assets.packaging.assets import publish_job
from recsys_assets.tracking.jobs import mlflow_sync_job
from recsys_assets.training.jobs import retrain_job
from recsys_serving.settings import Settings


@dataclass(frozen=True)
class ClosedLoopDefs:
    assets: list[dg.AssetsDefinition]
    jobs: list[dg.UnresolvedAssetJobDefinition | dg.JobDefinition]
    sensors: list[dg.SensorDefinition]
    schedules: list[dg.ScheduleDefinition]
    resources: dict[str, dg.ConfigurableResource]


def closed_loop(settings: Settings) -> ClosedLoopDefs:
    tick = settings.closed_loop.closed_loop_tick_seconds
    return ClosedLoopDefs(
        assets=[online_ctr, production_model],
        jobs=[monitoring_job, canary_job, mlflow_sync_job, alert_job, model_alias_job],
        sensors=[
            build_ctr_drop_sensor(tick, retrain_job=retrain_job, record_job=monitoring_job),
            build_promotion_sensor(
                tick,
                canary=canary_job,
                publish_job=publish_job if settings.packaging.publish_on_promotion else None,
                mlflow_sync=mlflow_sync_job,
            ),
            build_retrain_failure_sensor(tick, alert=alert_job),
        ],
        schedules=[
            build_nightly_retrain_schedule(
                settings.closed_loop.nightly_retrain_cron,
                settings.closed_loop.nightly_retrain_enabled,
            ),
            build_online_ctr_schedule(settings.closed_loop.online_ctr_cron),
        ],
        resources={"closed_loop": ClosedLoopConfig.from_settings(settings)},
    )
