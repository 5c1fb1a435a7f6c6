"""The sensors that close the loop.

* ``ctr_drop_sensor``: runs the drop test on the production model every tick; on a
  significant drop it launches ``retrain_job`` with a run key and tags naming the
  evidence. It holds while a retraining runs or a canary is being judged (the loop is
  already repairing) and for ``retrain_cooldown_minutes`` after a trigger, so one drop
  launches one retraining. Its cursor (JSON) holds the last trigger, and Dagster
  persists cursors in the instance, so a daemon restart does not reset the cool-down.
* ``promotion_sensor``: turns each new ``registered_model`` materialization whose
  evaluation said ``promote`` into a canary (the ``candidate`` alias at the first ramp
  share) and judges the running canary every tick (ramp, promote, roll back). Its
  cursor is the last ``registered_model`` record it acted on; the canary's state is the
  registry itself, so a restart resumes at the next tick. A failed retraining or
  evaluation produces no ``registered_model`` materialization and therefore never
  moves an alias. It also requests one ``publish_job`` run per move of the
  ``production`` alias, whoever made it (itself, the CLI, the admin API), and mirrors
  every alias move into MLflow (``recsys_assets.tracking``; never failing the tick).
* ``retrain_failure_sensor``: tells a person when a retraining run fails.

Each decision is reported as a ``production_model`` materialization (or an
``online_ctr`` observation for a drop) with its evidence, appended to
``monitoring/decisions/`` in the lake, and sent through the notifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import orjson

from recsys_assets.alerts.notifier import Alert, NotifierResource, delivery_metadata
from recsys_assets.monitoring.assets import ONLINE_CTR, PRODUCTION_MODEL
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.ctr import DropVerdict, drop_test, load_ctr_series
from recsys_assets.monitoring.promotion import (
    Decision,
    EvaluationOutcome,
    record_decision,
    start_canary,
    step_canary,
)
from recsys_assets.resources import LakeResource
from recsys_assets.tracking.mirror import mirror_if_moved
from recsys_assets.tracking.resource import MlflowResource
from recsys_serving.lake import Lake
from recsys_serving.registry import CANDIDATE, PRODUCTION, ModelRegistry

RETRAIN_JOB = "retrain_job"
WEBLOGS_JOB = "weblogs_job"
PIPELINE_TAG = "recsys/pipeline"
RETRAIN_PIPELINE = "retrain"
TRIGGER_TAG = "recsys/trigger"
EVALUATION = dg.AssetKey("model_evaluation")
REGISTERED = dg.AssetKey("registered_model")
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


def _alert(notifier: NotifierResource, decision: Decision, key: str) -> dict[str, str]:
    results = notifier.get().send(
        Alert(
            key=key,
            status="firing",
            severity=decision.severity,
            title=decision.title,
            summary=decision.reason,
            details={k: v for k, v in decision.as_dict().items() if k != "evidence"}
            | {"evidence": decision.evidence},
            at=decision.at,
        )
    )
    return delivery_metadata(results)


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


def build_ctr_drop_sensor(tick_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="ctr_drop_sensor",
        job_name=RETRAIN_JOB,
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Launches retrain_job when the production model's recent online CTR is "
            "significantly below its baseline (one-sided two-proportion z-test, minimum "
            "impressions, minimum relative drop); one retraining per drop (cool-down)."
        ),
    )
    def ctr_drop_sensor(
        context: dg.SensorEvaluationContext,
        lake: LakeResource,
        closed_loop: ClosedLoopConfig,
        notifier: NotifierResource,
    ) -> dg.SensorResult:
        now = _now()
        cursor = DropCursor.parse(context.cursor)
        store = lake.get()
        tick = evaluate_drop(
            store,
            closed_loop,
            cursor,
            now,
            running_retrain=retrain_in_progress(context.instance),
            weblogs_processed_since=weblogs_processed_since(context.instance),
        )
        if tick.run_key is None:
            return dg.SensorResult(skip_reason=tick.skip_reason, cursor=cursor.dump())
        evidence = tick.evidence
        version = evidence.get("model_version")
        summary = tick.summary or ""
        context.log.warning(f"CTR drop, launching {RETRAIN_JOB}: {summary}")
        decision = Decision(
            "drop_detected",
            version,
            summary,
            now,
            production_version=version,
            previous_production=version,
            evidence={**evidence, "run_key": tick.run_key},
        )
        record_decision(store, decision)
        delivery = _alert(notifier, decision, f"recsys-ctr-drop-{version}")
        observation = dg.AssetObservation(
            asset_key=ONLINE_CTR,
            metadata={
                "event": "ctr_drop",
                "model_version": version or "",
                "recent_ctr": float((evidence.get("recent") or {}).get("ctr") or 0.0),
                "baseline_ctr": float((evidence.get("baseline") or {}).get("ctr") or 0.0),
                "p_value": float(evidence.get("p_value") or 0.0),
                "run_key": tick.run_key,
                "evidence": dg.MetadataValue.json(evidence),
                **delivery,
            },
        )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=tick.run_key, tags=tick.tags, run_config=IN_PROCESS_RUN_CONFIG
                )
            ],
            cursor=cursor.dump(),
            asset_events=[observation],
        )

    return ctr_drop_sensor


# ------------------------------------------------------------------- promotion / canary
@dataclass
class PromotionCursor:
    registered_after: int | None = None
    published_key: str | None = None  # run key of the last publish_job run requested
    mlflow: dict[str, Any] = field(default_factory=dict)  # tracking.mirror_if_moved's state

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


def publish_request(registry: ModelRegistry, cursor: PromotionCursor) -> dg.RunRequest | None:
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
        run_key=key,
        tags={TRIGGER_TAG: "production_changed", "recsys/model_version": production.version},
    )


def _value(metadata: dict[str, Any], key: str) -> Any:
    raw = metadata.get(key)
    return getattr(raw, "value", raw)


def evaluation_for(
    instance: dg.DagsterInstance, version: str, registered: dict[str, Any]
) -> EvaluationOutcome | None:
    """What ``model_evaluation`` said about ``version`` (newest evaluation that names it)."""
    if _value(registered, "decision"):
        return _outcome(version, registered, None)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=EVALUATION), limit=50
    ).records
    for record in records:
        mat = record.asset_materialization
        if mat is None:
            continue
        if _value(mat.metadata, "challenger_version") == version:
            return _outcome(version, mat.metadata, record.run_id)
    return None


def _outcome(version: str, meta: dict[str, Any], run_id: str | None) -> EvaluationOutcome:
    metrics = _value(meta, "metrics")
    if isinstance(metrics, str):
        try:
            metrics = orjson.loads(metrics)
        except orjson.JSONDecodeError:
            metrics = {"raw": metrics}
    return EvaluationOutcome(
        version=version,
        decision=str(_value(meta, "decision") or ""),
        reason=str(_value(meta, "decision_reason") or ""),
        production_version=_value(meta, "production_version") or None,
        metrics=metrics if isinstance(metrics, dict) else {},
        run_id=run_id,
    )


def _materialization(decision: Decision, delivery: dict[str, str]) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(
        asset_key=PRODUCTION_MODEL,
        description=decision.title,
        metadata={
            **decision.metadata(),
            "evidence": dg.MetadataValue.json(decision.evidence),
            **delivery,
        },
    )


def build_promotion_sensor(
    tick_seconds: int, publish_job: str | None = None
) -> dg.SensorDefinition:
    """``publish_job``: the job to run whenever the production model changes (the OCI
    artifact), if any."""

    @dg.sensor(
        name="promotion_sensor",
        job_name=publish_job,
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Phases a newly registered challenger in as the canary when model_evaluation "
            "said promote, then judges candidate vs production online CTR each tick: ramp "
            "through the configured shares, promote at 100%, or roll back. Runs publish_job "
            "whenever the production model changes, whoever moved it."
        ),
    )
    def promotion_sensor(
        context: dg.SensorEvaluationContext,
        lake: LakeResource,
        closed_loop: ClosedLoopConfig,
        notifier: NotifierResource,
        mlflow: MlflowResource,
    ) -> dg.SensorResult:
        now = _now()
        store = lake.get()
        registry = ModelRegistry(store)
        cursor = PromotionCursor.parse(context.cursor)
        canary = closed_loop.canary_policy()
        decisions: list[Decision] = []
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=REGISTERED, after_storage_id=cursor.registered_after),
            limit=20,
            ascending=True,
        ).records
        for record in records:
            mat = record.asset_materialization
            version = _value(mat.metadata, "version") if mat is not None else None
            if version and registry.exists(str(version)):
                outcome = evaluation_for(context.instance, str(version), dict(mat.metadata))
                if outcome is None:
                    context.log.warning(f"no model_evaluation names {version}; not promoting it")
                else:
                    decision = start_canary(registry, outcome, canary, now)
                    if decision is not None:
                        decisions.append(decision)
            cursor.registered_after = record.storage_id
        step = step_canary(registry, store, closed_loop.drop_policy(), canary, now)
        if step.decision is not None:
            decisions.append(step.decision)
        events = []
        for decision in decisions:
            context.log.info(f"{decision.action}: {decision.reason}")
            record_decision(store, decision)
            delivery = _alert(notifier, decision, f"recsys-promotion-{decision.version}")
            events.append(_materialization(decision, delivery))
        # MLflow mirrors every alias move, whoever made it; it never blocks the loop.
        mirrored = mirror_if_moved(mlflow.mirror(), registry, cursor.mlflow, now)
        if mirrored is not None and mirrored["mlflow"] == "failed":
            context.log.warning(f"MLflow not updated, retried later: {mirrored['error']}")
        publish = publish_request(registry, cursor) if publish_job is not None else None
        if not events and publish is None:
            reason = f"canary {step.verdict.describe()}" if step.verdict else "no canary running"
            return dg.SensorResult(skip_reason=reason, cursor=cursor.dump())
        return dg.SensorResult(
            asset_events=events,
            run_requests=[publish] if publish is not None else [],
            cursor=cursor.dump(),
        )

    return promotion_sensor


# ------------------------------------------------------------------ failed retrainings
def build_retrain_failure_sensor(tick_seconds: int) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name="retrain_failure_sensor",
        minimum_interval_seconds=tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts when a retraining run fails (production is left untouched).",
    )
    def retrain_failure_sensor(
        context: dg.RunFailureSensorContext, lake: LakeResource, notifier: NotifierResource
    ) -> None:
        run = context.dagster_run
        if run.tags.get(PIPELINE_TAG) != RETRAIN_PIPELINE:
            return
        store = lake.get()
        production = ModelRegistry(store).alias(PRODUCTION)
        error = context.failure_event.message or "run failed"
        decision = Decision(
            "retrain_failed",
            None,
            f"run {run.run_id[:8]} of {run.job_name} failed: {error}",
            _now(),
            production_version=production.version if production else None,
            previous_production=production.version if production else None,
            evidence={
                "run_id": run.run_id,
                "job": run.job_name,
                "trigger": run.tags.get(TRIGGER_TAG),
                "tags": {k: v for k, v in run.tags.items() if k.startswith("recsys/")},
            },
        )
        record_decision(store, decision)
        _alert(notifier, decision, f"recsys-retrain-failed-{run.run_id}")

    return retrain_failure_sensor
