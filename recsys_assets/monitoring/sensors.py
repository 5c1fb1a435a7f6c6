"""The sensors that close the loop. They only decide *that* something should run: each
tick makes cheap reads (the registry's aliases, the instance's records, the CTR series
the tests need) and returns ``RunRequest``s whose run keys and tags name the evidence.
The work (moving aliases, recording decisions, alerting) happens in those runs, so each
decision has a run with its logs in the UI, Dagster's retries, and a re-execute button.

* ``ctr_drop_sensor``: runs the drop test on the production model every tick; on a
  significant drop it requests ``retrain_job`` with a run key and tags naming the
  evidence, and a ``monitoring_job`` run that records the drop (decision log, alert,
  ``online_ctr`` metadata). It holds while a retraining runs or a canary is being
  judged (the loop is already repairing) and for ``retrain_cooldown_minutes`` after a
  trigger, so one drop launches one retraining. Its cursor (JSON) holds the last
  trigger, and Dagster persists cursors in the instance, so a daemon restart does not
  reset the cool-down.
* ``promotion_sensor``: requests a ``canary_job`` run (``production_model``, step
  ``start``) for each new ``registered_model`` materialization, and a ``judge`` run
  whenever the running canary's verdict, judged read-only in the tick, is not "wait"
  (ramp, promote, roll back). Its cursor is the last ``registered_model`` record it
  acted on; the canary's state is the registry itself, so a restart resumes at the
  next tick. A failed retraining or evaluation produces no ``registered_model``
  materialization and therefore never moves an alias. It also requests one
  ``publish_job`` run per move of the ``production`` alias, whoever made it (a
  ``canary_job`` run, the CLI, the admin API), and an ``mlflow_sync_job`` run whenever
  the aliases moved since the last sync it requested (again every
  ``RETRY_AFTER_SECONDS`` while MLflow cannot be reached): the mirror's work and
  failures are in that run.
* ``retrain_failure_sensor``: requests an ``alert_job`` run when a retraining run fails
  (run key: the failed run's id); that run records the decision and alerts a person, and
  the failed run holds the logs of the failure itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import orjson

from recsys_assets.monitoring.assets import (
    REGISTERED,
    canary_job,
    evaluation_for,
    metadata_value,
    monitoring_job,
)
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.ctr import DropVerdict, drop_test, load_ctr_series
from recsys_assets.monitoring.operations import ALERT_PIPELINE, alert_job
from recsys_assets.monitoring.promotion import (
    CanaryAssessment,
    EvaluationOutcome,
    assess_canary,
)
from recsys_assets.resources import LakeResource
from recsys_assets.tracking.mirror import (
    OFF,
    RETRY_AFTER_SECONDS,
    alias_fingerprint,
    mirror_status,
)
from recsys_assets.tracking.resource import MlflowResource
from recsys_serving.lake import Lake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.registry import ModelRegistry

# A job a sensor targets: an op job or ``define_asset_job``'s result (which dagster
# does not export as a type).
Target = Any

RETRAIN_JOB = "retrain_job"
WEBLOGS_JOB = "weblogs_job"
PIPELINE_TAG = "recsys/pipeline"
RETRAIN_PIPELINE = "retrain"
TRIGGER_TAG = "recsys/trigger"
CANARY_PIPELINE = "canary"
# A retraining is a chain of steps that mostly wait for each other: one process per step
# costs seconds of start-up each (more on a busy machine) and buys little parallelism.
IN_PROCESS_RUN_CONFIG: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _now() -> datetime:
    """The sensors' clock: one function, so tests hold time still instead of racing it."""
    return datetime.now(UTC)


def weblogs_processed_since(instance: dg.DagsterInstance) -> Callable[[datetime], bool]:
    """Whether a weblogs run that began after ``t`` has succeeded (it read every landing
    file sealed before it began, so its partitions hold everything up to ``t``)."""

    def check(since: datetime) -> bool:
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                job_name=WEBLOGS_JOB,
                statuses=[dg.DagsterRunStatus.SUCCESS],
                created_after=since,
            ),
            limit=1,
        )
        return bool(records)

    return check


def retrain_in_progress(instance: dg.DagsterInstance) -> str | None:
    """The id of a queued or running retraining, if any."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={PIPELINE_TAG: RETRAIN_PIPELINE}, statuses=IN_PROGRESS),
        limit=1,
    )
    return runs[0].run_id if runs else None


def canary_in_progress(instance: dg.DagsterInstance) -> str | None:
    """The id of a queued or running ``canary_job`` run, if any (its step is not applied
    yet, so judging again now would judge a state about to change)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={PIPELINE_TAG: CANARY_PIPELINE}, statuses=IN_PROGRESS),
        limit=1,
    )
    return runs[0].run_id if runs else None


def _in_process(config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**IN_PROCESS_RUN_CONFIG, **(config or {})}


# ------------------------------------------------------------------ CTR drop -> retrain
@dataclass
class DropCursor:
    last_trigger_at: str | None = None
    last_run_key: str | None = None
    last_version: str | None = None
    last_outcome: str | None = None
    triggers: int = 0
    # A confirmed drop waiting for the weblogs that show it to be processed, with the
    # evidence it was confirmed on (later windows may both lie after the drop, where
    # the test no longer sees a difference although CTR has not come back).
    pending_since: str | None = None
    pending_version: str | None = None
    pending_summary: str | None = None
    pending_evidence: dict[str, Any] | None = None

    def clear_pending(self) -> None:
        self.pending_since = self.pending_version = self.pending_summary = None
        self.pending_evidence = None

    @classmethod
    def parse(cls, raw: str | None) -> DropCursor:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})

    def dump(self) -> str:
        return orjson.dumps(self.__dict__).decode()

    def cooling_until(self, cooldown: timedelta) -> datetime | None:
        if not self.last_trigger_at:
            return None
        return datetime.fromisoformat(self.last_trigger_at) + cooldown


@dataclass
class DropTick:
    skip_reason: str | None
    verdict: DropVerdict | None = None
    run_key: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # The confirmed drop a launch acts on (it may be older than ``verdict``).
    summary: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


def evaluate_drop(
    lake: Lake,
    config: ClosedLoopConfig,
    cursor: DropCursor,
    now: datetime,
    *,
    running_retrain: str | None,
    weblogs_processed_since: Callable[[datetime], bool] | None = None,
) -> DropTick:
    """One tick of the drop sensor's logic; updates ``cursor`` when it triggers.

    A confirmed drop launches the retraining only once processed weblogs cover it
    (``weblogs_processed_since(t)``: a successful weblogs run began after ``t``, the end
    of the drop's window plus the landing segments' age), or after
    ``retrain_data_wait_minutes``: the retraining reads processed partitions, and one
    that starts before the drift has been processed learns the world that no longer is.
    """
    registry = ModelRegistry(lake)
    if cursor.last_version and not registry.exists(cursor.last_version):
        # The cursor speaks of a model this lake never had (a fresh lake, or a new
        # deployment on an old Dagster instance): its cool-down is not ours.
        cursor.last_trigger_at = cursor.last_run_key = cursor.last_version = None
    until = cursor.cooling_until(config.cooldown)
    if until is not None and now < until:
        return DropTick(f"cool-down after {cursor.last_run_key} until {until:%Y-%m-%d %H:%M:%S}Z")
    if running_retrain:
        return DropTick(f"retraining run {running_retrain[:8]} is in progress")
    candidate = registry.alias(CANDIDATE)
    if candidate is not None:
        return DropTick(f"canary of {candidate.version} is being judged")
    production = registry.alias(PRODUCTION)
    policy = config.drop_policy()
    series, _orphans = load_ctr_series(
        lake, now, lookback=policy.lookback, bucket_seconds=policy.bucket_seconds
    )
    verdict = drop_test(series, production.version if production else None, now, policy)
    cursor.last_outcome = verdict.outcome
    if cursor.pending_version is not None and cursor.pending_version != verdict.model_version:
        cursor.clear_pending()  # another model serves now: that drop is not its fault
    if verdict.dropped:
        if cursor.pending_since is None:
            assert verdict.recent is not None
            settle = timedelta(seconds=config.landing_segment_max_age_seconds)
            cursor.pending_since = (verdict.recent.end + settle).isoformat()
            cursor.pending_version = verdict.model_version
            cursor.pending_summary = verdict.describe()
            cursor.pending_evidence = verdict.evidence()
    elif cursor.pending_since is None:
        return DropTick(verdict.describe(), verdict)
    elif _recovered(verdict, cursor.pending_evidence or {}):
        cursor.clear_pending()
        return DropTick(
            f"{verdict.describe()}; CTR is back, the pending retraining is cancelled", verdict
        )
    needed = datetime.fromisoformat(cursor.pending_since)
    waited_enough = now >= needed + timedelta(minutes=config.retrain_data_wait_minutes)
    if (
        weblogs_processed_since is not None
        and not waited_enough
        and not weblogs_processed_since(needed)
    ):
        return DropTick(
            f"{cursor.pending_summary}; waiting for weblogs processed after "
            f"{needed:%H:%M:%S}Z before retraining",
            verdict,
        )
    evidence = cursor.pending_evidence or verdict.evidence()
    run_key = _drop_run_key(evidence)
    tick = DropTick(None, verdict, run_key, _drop_tags(evidence), cursor.pending_summary, evidence)
    cursor.last_trigger_at = now.isoformat()
    cursor.last_run_key = run_key
    cursor.last_version = cursor.pending_version
    cursor.triggers += 1
    cursor.clear_pending()
    return tick


def _recovered(verdict: DropVerdict, confirmed: dict[str, Any]) -> bool:
    """Is CTR back near the baseline the pending drop was measured against?

    Only a recent window with enough impressions counts; thin evidence keeps waiting.
    """
    recent = verdict.recent
    baseline_ctr = (confirmed.get("baseline") or {}).get("ctr")
    if recent is None or recent.ctr is None or baseline_ctr is None:
        return False
    if recent.impressions < verdict.policy.min_impressions:
        return False
    return recent.ctr >= baseline_ctr * (1.0 - verdict.policy.min_relative_drop)


def _drop_run_key(evidence: dict[str, Any]) -> str:
    start = datetime.fromisoformat(evidence["recent"]["start"])
    return f"ctr-drop-{evidence['model_version']}-{start:%Y%m%dT%H%M%SZ}"


def _drop_tags(evidence: dict[str, Any]) -> dict[str, str]:
    """The run tags that name a drop's evidence (visible on the run in the UI)."""
    recent, baseline = evidence["recent"], evidence["baseline"]

    def window(w: dict[str, Any]) -> str:
        return f"{_hm(datetime.fromisoformat(w['start']))}..{_hm(datetime.fromisoformat(w['end']))}"

    return {
        PIPELINE_TAG: RETRAIN_PIPELINE,
        TRIGGER_TAG: "ctr_drop",
        "recsys/drop/model_version": str(evidence["model_version"]),
        "recsys/drop/recent_window": window(recent),
        "recsys/drop/baseline_window": window(baseline),
        "recsys/drop/recent_ctr": f"{recent['ctr']:.4f}",
        "recsys/drop/baseline_ctr": f"{baseline['ctr']:.4f}",
        "recsys/drop/impressions": f"{recent['impressions']}/{baseline['impressions']}",
        "recsys/drop/relative_drop": f"{evidence['relative_drop']:.3f}",
        "recsys/drop/p_value": f"{evidence['p_value']:.3g}",
        "recsys/drop/z": f"{evidence['z']:.2f}",
    }


def _hm(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def drop_record_request(tick: DropTick, now: datetime, job: Target) -> dg.RunRequest:
    """The ``monitoring_job`` run that records a drop the sensor acted on.

    Tagged like the retraining's evidence but not as a retraining (no ``recsys/trigger``
    or retrain pipeline tag): the run queue's one-retraining limit and the loop's
    "retraining in progress" check must not count it.
    """
    assert tick.run_key is not None
    tags = {k: v for k, v in tick.tags.items() if k.startswith("recsys/drop/")}
    config = {
        "drop_evidence": orjson.dumps(tick.evidence).decode(),
        "drop_summary": tick.summary or "",
        "detected_at": now.isoformat(),
        "retrain_run_key": tick.run_key,
    }
    return dg.RunRequest(
        job_name=job.name,
        run_key=f"{tick.run_key}-recorded",
        tags={
            **tags,
            PIPELINE_TAG: "monitoring",
            "recsys/event": "ctr_drop",
            "recsys/retrain_run_key": tick.run_key,
        },
        run_config=_in_process({"ops": {"online_ctr": {"config": config}}}),
    )


def build_ctr_drop_sensor(
    tick_seconds: int, *, retrain_job: Target, record_job: Target = monitoring_job
) -> dg.SensorDefinition:
    """``retrain_job`` repairs a drop; ``record_job`` (``online_ctr``) records it."""

    @dg.sensor(
        name="ctr_drop_sensor",
        jobs=[retrain_job, record_job],
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Launches retrain_job when the production model's recent online CTR is "
            "significantly below its baseline (one-sided two-proportion z-test, minimum "
            "impressions, minimum relative drop); one retraining per drop (cool-down). "
            "A monitoring_job run records the drop with its evidence."
        ),
    )
    def ctr_drop_sensor(
        context: dg.SensorEvaluationContext,
        lake: LakeResource,
        closed_loop: ClosedLoopConfig,
    ) -> dg.SensorResult:
        now = _now()
        cursor = DropCursor.parse(context.cursor)
        tick = evaluate_drop(
            lake.get(),
            closed_loop,
            cursor,
            now,
            running_retrain=retrain_in_progress(context.instance),
            weblogs_processed_since=weblogs_processed_since(context.instance),
        )
        if tick.run_key is None:
            return dg.SensorResult(skip_reason=tick.skip_reason, cursor=cursor.dump())
        context.log.warning(f"CTR drop, requesting {retrain_job.name}: {tick.summary}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    job_name=retrain_job.name,
                    run_key=tick.run_key,
                    tags=tick.tags,
                    run_config=IN_PROCESS_RUN_CONFIG,
                ),
                drop_record_request(tick, now, record_job),
            ],
            cursor=cursor.dump(),
        )

    return ctr_drop_sensor


# ------------------------------------------------------------------- promotion / canary
@dataclass
class PromotionCursor:
    registered_after: int | None = None
    published_key: str | None = None  # run key of the last publish_job run requested
    mlflow: dict[str, Any] = field(default_factory=dict)  # mlflow_sync_request's memory

    @classmethod
    def parse(cls, raw: str | None) -> PromotionCursor:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(
            data.get("registered_after"), data.get("published_key"), data.get("mlflow") or {}
        )

    def dump(self) -> str:
        return orjson.dumps(
            {
                "registered_after": self.registered_after,
                "published_key": self.published_key,
                "mlflow": self.mlflow,
            }
        ).decode()


def publish_request(
    registry: ModelRegistry, cursor: PromotionCursor, job_name: str = "publish_job"
) -> dg.RunRequest | None:
    """A publish_job run for a production model that has moved since the last request.

    Keyed by the move (version and when the alias was set), not by who made it: the
    canary judge, ``recsys models promote|rollback`` and the admin API all move the same
    alias, and each move gets exactly one run, so the registry artifact always matches
    production. The cursor keeps ticks quiet; a lost cursor asks again with the same
    key, which Dagster does not launch twice.
    """
    production = registry.alias(PRODUCTION)
    if production is None:
        return None
    key = f"publish-{production.version}-{production.updated_at.astimezone(UTC):%Y%m%dT%H%M%S%fZ}"
    if key == cursor.published_key:
        return None
    cursor.published_key = key
    return dg.RunRequest(
        job_name=job_name,
        run_key=key,
        tags={TRIGGER_TAG: "production_changed", "recsys/model_version": production.version},
    )


def mlflow_sync_request(
    registry: ModelRegistry, lake: Lake, cursor: PromotionCursor, now: datetime, job_name: str
) -> dg.RunRequest | None:
    """An ``mlflow_sync_job`` run when the aliases moved since the last one requested,
    or when the last sync failed (``tracking/mlflow.json``) and ``RETRY_AFTER_SECONDS``
    have passed: an unreachable MLflow is asked again every few minutes, not every tick.
    The first tick after a start catches up with whatever happened before."""
    fingerprint = alias_fingerprint(registry)
    state = cursor.mlflow
    requested_at = state.get("requested_at")
    if fingerprint == state.get("requested"):
        due = requested_at is None or (
            now.timestamp() - datetime.fromisoformat(requested_at).timestamp()
            >= RETRY_AFTER_SECONDS
        )
        if not due or mirror_status(lake) is None:
            return None
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    state.update(requested=fingerprint, requested_at=now.isoformat())
    return dg.RunRequest(
        job_name=job_name,
        run_key=f"mlflow-sync-{digest}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}",
        tags={TRIGGER_TAG: "aliases_moved", "recsys/aliases": fingerprint[:250]},
    )


def _step_config(step: str, version: str, judged_at: datetime | None = None) -> dict[str, Any]:
    config = {
        "step": step,
        "version": version,
        "judged_at": judged_at.isoformat() if judged_at else "",
    }
    # canary_job's executor is in-process already (no executor config to give).
    return {"ops": {"production_model": {"config": config}}}


def start_request(outcome: EvaluationOutcome, job_name: str) -> dg.RunRequest:
    """A ``canary_job`` run acting on a registered challenger's offline evaluation."""
    return dg.RunRequest(
        job_name=job_name,
        run_key=f"canary-start-{outcome.version}",
        tags={
            PIPELINE_TAG: CANARY_PIPELINE,
            TRIGGER_TAG: "registered",
            "recsys/model_version": outcome.version,
            "recsys/evaluation/decision": outcome.decision,
            "recsys/evaluation/reason": outcome.reason[:200],
            "recsys/evaluation/production_version": outcome.production_version or "",
            "recsys/evaluation/run_id": outcome.run_id or "",
        },
        run_config=_step_config("start", outcome.version),
    )


def judge_request(assessment: CanaryAssessment, now: datetime, job_name: str) -> dg.RunRequest:
    """A ``canary_job`` run applying a verdict the tick reached (never for "wait").

    The run judges again at the same ``now``, on the same window, so it reaches the same
    verdict unless late data changed it (then it records what it found instead). The
    key names the canary step and the tick: a "wait" found by the run lets a later
    tick ask again.
    """
    candidate = assessment.candidate
    version = candidate.version
    tags = {
        PIPELINE_TAG: CANARY_PIPELINE,
        TRIGGER_TAG: "canary_judge",
        "recsys/model_version": version,
        "recsys/canary/action": assessment.action,
        "recsys/canary/share": f"{candidate.share:.2f}",
    }
    verdict = assessment.verdict
    if verdict is not None:
        tags["recsys/canary/reason"] = verdict.reason
        tags["recsys/canary/impressions"] = (
            f"{verdict.candidate.impressions}/{verdict.production.impressions}"
        )
        for arm, stats in (("candidate", verdict.candidate), ("production", verdict.production)):
            if stats.ctr is not None:
                tags[f"recsys/canary/{arm}_ctr"] = f"{stats.ctr:.4f}"
        for name, value in (("p_worse", verdict.p_worse), ("p_not_worse", verdict.p_not_worse)):
            if value is not None:
                tags[f"recsys/canary/{name}"] = f"{value:.3g}"
    step = candidate.updated_at.astimezone(UTC)
    return dg.RunRequest(
        job_name=job_name,
        run_key=(
            f"canary-{version}-{step:%Y%m%dT%H%M%SZ}-{assessment.action}-"
            f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"
        ),
        tags=tags,
        run_config=_step_config("judge", version, now),
    )


def build_promotion_sensor(
    tick_seconds: int,
    *,
    canary: Target = canary_job,
    publish_job: Target | None = None,
    mlflow_sync: Target | None = None,
) -> dg.SensorDefinition:
    """``canary``: the job that takes one promotion step (``production_model``);
    ``publish_job``: the job to run whenever the production model changes (the OCI
    artifact), if any; ``mlflow_sync``: the job that mirrors alias moves into MLflow."""
    targets = [t for t in (canary, publish_job, mlflow_sync) if t is not None]

    @dg.sensor(
        name="promotion_sensor",
        jobs=targets,
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Requests a canary_job run to phase a newly registered challenger in when "
            "model_evaluation said promote, and one to apply each canary verdict (ramp, "
            "promote at 100%, roll back) on candidate vs production online CTR. Runs "
            "publish_job whenever the production model changes, whoever moved it."
        ),
    )
    def promotion_sensor(
        context: dg.SensorEvaluationContext,
        lake: LakeResource,
        closed_loop: ClosedLoopConfig,
        mlflow: MlflowResource,
    ) -> dg.SensorResult:
        now = _now()
        store = lake.get()
        registry = ModelRegistry(store)
        cursor = PromotionCursor.parse(context.cursor)
        production = registry.alias(PRODUCTION)
        candidate = registry.alias(CANDIDATE)
        acted_on = {a.version for a in (production, candidate) if a is not None}
        requests: list[dg.RunRequest] = []
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=REGISTERED, after_storage_id=cursor.registered_after),
            limit=20,
            ascending=True,
        ).records
        for record in records:
            mat = record.asset_materialization
            version = metadata_value(mat.metadata, "version") if mat is not None else None
            if version and str(version) not in acted_on and registry.exists(str(version)):
                assert mat is not None
                outcome = evaluation_for(context.instance, str(version), dict(mat.metadata))
                if outcome is None:
                    context.log.warning(f"no model_evaluation names {version}; not promoting it")
                else:
                    requests.append(start_request(outcome, canary.name))
            cursor.registered_after = record.storage_id
        reason = "no canary running"
        in_flight = canary_in_progress(context.instance)
        if in_flight is not None:
            reason = f"canary_job run {in_flight[:8]} is in progress"
        elif not requests:
            assessment = assess_canary(
                registry, store, closed_loop.drop_policy(), closed_loop.canary_policy(), now
            )
            if assessment is not None and assessment.action != "wait":
                requests.append(judge_request(assessment, now, canary.name))
            elif assessment is not None and assessment.verdict is not None:
                reason = f"canary {assessment.verdict.describe()}"
        for request in requests:
            context.log.info(f"requesting {request.run_key} ({dict(request.tags)})")
        if publish_job is not None:
            publish = publish_request(registry, cursor, publish_job.name)
            if publish is not None:
                requests.append(publish)
        if mlflow_sync is not None and mlflow.tracking_uri != OFF:
            sync = mlflow_sync_request(registry, store, cursor, now, mlflow_sync.name)
            if sync is not None:
                requests.append(sync)
        if not requests:
            return dg.SensorResult(skip_reason=reason, cursor=cursor.dump())
        return dg.SensorResult(run_requests=requests, cursor=cursor.dump())

    return promotion_sensor


# ------------------------------------------------------------------ failed retrainings
def failure_alert_request(
    run: dg.DagsterRun, error: str | None, now: datetime
) -> dg.RunRequest | None:
    """The ``alert_job`` run that reports a failed retraining (None for other runs).

    Keyed by the failed run's id: a sensor tick evaluated twice (a daemon restart)
    asks again with the same key, which Dagster does not launch twice.
    """
    if run.tags.get(PIPELINE_TAG) != RETRAIN_PIPELINE:
        return None
    recsys_tags = {k: v for k, v in run.tags.items() if k.startswith("recsys/")}
    config = {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "error": error or "run failed",
        "trigger": run.tags.get(TRIGGER_TAG, ""),
        "tags": recsys_tags,
        "detected_at": now.isoformat(),
    }
    return dg.RunRequest(
        run_key=run.run_id,
        tags={
            PIPELINE_TAG: ALERT_PIPELINE,
            "recsys/event": "retrain_failed",
            "recsys/failed_run_id": run.run_id,
            "recsys/failed_job": run.job_name,
        },
        run_config={"ops": {"alert_retrain_failure": {"config": config}}},
    )


def _root_cause(error: Any) -> str:
    """A step failure's innermost error on one line (Dagster wraps user errors)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    message = " ".join(str(getattr(error, "message", "") or "").split())
    return message[:300]


def build_retrain_failure_sensor(
    tick_seconds: int, *, alert: Target = alert_job
) -> dg.SensorDefinition:
    """``alert``: the job that records the failure and alerts (``alert_job``)."""

    @dg.run_failure_sensor(
        name="retrain_failure_sensor",
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        request_job=alert,
        description=(
            "Requests an alert_job run when a retraining run fails (production is left "
            "untouched): the alert and its delivery are in that run."
        ),
    )
    def retrain_failure_sensor(
        context: dg.RunFailureSensorContext,
    ) -> dg.RunRequest | dg.SkipReason:
        run = context.dagster_run
        error = context.failure_event.message or "run failed"
        causes = [_root_cause(e.step_failure_data.error) for e in context.get_step_failure_events()]
        if causes:
            error = f"{error} {'; '.join(c for c in causes if c)}"
        request = failure_alert_request(run, error, _now())
        if request is None:
            return dg.SkipReason(f"run {run.run_id[:8]} of {run.job_name} is not a retraining")
        context.log.warning(f"retraining run {run.run_id[:8]} failed, requesting {alert.name}")
        return request

    return retrain_failure_sensor
