"""Schedules of the closed loop: the nightly retraining and the online CTR snapshots.

The nightly retraining keeps models fresh when engagement drifts too slowly for the
drop test to fire. It skips a night when a retraining is already queued or running
(run key per scheduled time, plus the run coordinator's one-retraining limit), so it
never races the CTR-drop trigger on the same data.
"""

from __future__ import annotations

import dagster as dg

from recsys_assets.monitoring.assets import monitoring_job
from recsys_assets.monitoring.sensors import (
    IN_PROCESS_RUN_CONFIG,
    PIPELINE_TAG,
    RETRAIN_JOB,
    RETRAIN_PIPELINE,
    TRIGGER_TAG,
    retrain_in_progress,
)


def build_nightly_retrain_schedule(cron: str, enabled: bool) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="nightly_retrain_schedule",
        cron_schedule=cron,
        job_name=RETRAIN_JOB,
        execution_timezone="UTC",
        default_status=(
            dg.DefaultScheduleStatus.RUNNING if enabled else dg.DefaultScheduleStatus.STOPPED
        ),
        description="Retrains even without a CTR drop (RECSYS_NIGHTLY_RETRAIN_*).",
    )
    def nightly_retrain_schedule(
        context: dg.ScheduleEvaluationContext,
    ) -> dg.RunRequest | dg.SkipReason:
        running = retrain_in_progress(context.instance)
        if running:
            return dg.SkipReason(f"retraining run {running[:8]} is already in progress")
        scheduled = context.scheduled_execution_time
        return dg.RunRequest(
            run_key=f"nightly-{scheduled:%Y%m%dT%H%M}",
            tags={PIPELINE_TAG: RETRAIN_PIPELINE, TRIGGER_TAG: "nightly"},
            run_config=IN_PROCESS_RUN_CONFIG,
        )

    return nightly_retrain_schedule


def build_online_ctr_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="online_ctr_schedule",
        cron_schedule=cron,
        job=monitoring_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Records online CTR and service health (RECSYS_ONLINE_CTR_CRON).",
    )
