"""The closed loop's decisions that are not a step of an asset, as op jobs.

* ``alert_job``: tells the people on duty that a retraining failed. The
  ``retrain_failure_sensor`` only decides that an alert is due and requests this run
  (run key: the failed run's id, config and tags: its evidence); the alert, its
  delivery outcome and the decision record are in this run's logs and metadata, and a
  notifier that was down can be retried from the UI.
* ``model_alias_job``: an operator's ``recsys models promote|rollback``. The CLI submits
  it and follows it (:func:`recsys_assets.runs.execute_run`), so a hand-made move of the
  production or candidate alias is a run like the canary's steps: the same
  compare-and-set registry calls, the same audit trail, and a ``production_model``
  materialization that keeps the asset's history the full list of decisions that
  changed which model serves.

A refused move (unknown version, damaged bundle, nothing to roll back) fails its run
with a :class:`dagster.Failure` whose description is the one line the CLI prints.
"""

from datetime import UTC, datetime
from typing import Literal

import dagster as dg
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from recsys_assets.alerts.notifier import (
    Alert,
    NotifierResource,
    delivery_metadata,
    was_delivered,
)
from recsys_assets.monitoring.assets import PRODUCTION_MODEL, alert_decision
from recsys_assets.monitoring.promotion import Decision, record_decision
from recsys_assets.resources import LakeResource
from recsys_serving.model.bundle import BundleError
from recsys_serving.registry import (
    CANDIDATE,
    PRODUCTION,
    AliasEvent,
    ModelRegistry,
    RegistryError,
)

PIPELINE_TAG = "recsys/pipeline"
ALERT_PIPELINE = "alert"
MANUAL_PIPELINE = "manual"
# Errors that are the operator's request or the registry's state: one line, no trace.
REFUSALS: tuple[type[BaseException], ...] = (
    RegistryError,
    BundleError,
    OSError,
    BotoCoreError,
    ClientError,
)


def _parse_time(value: str) -> datetime:
    if not value:
        return datetime.now(UTC)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ------------------------------------------------------------------ failed retraining
class FailedRun(dg.Config):
    """The failed run an ``alert_job`` run reports (set by ``retrain_failure_sensor``)."""

    run_id: str = Field(description="The failed run (it holds the logs and stack trace).")
    job_name: str
    error: str = Field(default="run failed", description="The run failure's message.")
    trigger: str = Field(default="", description="What launched it (its recsys/trigger tag).")
    tags: dict[str, str] = Field(default_factory=dict, description="Its recsys/* tags.")
    detected_at: str = Field(default="", description="ISO time the sensor saw the failure.")


@dg.op(
    description=(
        "Records a failed retraining as a 'retrain_failed' decision (production is left "
        "untouched) and alerts the people on duty through the notifier."
    ),
)
def alert_retrain_failure(
    context: dg.OpExecutionContext,
    config: FailedRun,
    lake: LakeResource,
    notifier: NotifierResource,
) -> dg.Output[None]:
    store = lake.get()
    production = ModelRegistry(store).alias(PRODUCTION)
    current = production.version if production else None
    decision = Decision(
        "retrain_failed",
        None,
        f"run {config.run_id[:8]} of {config.job_name} failed: {config.error}",
        _parse_time(config.detected_at),
        production_version=current,
        previous_production=current,
        evidence={
            "run_id": config.run_id,
            "job": config.job_name,
            "trigger": config.trigger or None,
            "tags": dict(config.tags),
        },
    )
    context.log.warning(decision.reason)
    key = record_decision(store, decision)
    delivery = alert_decision(notifier, decision, f"recsys-retrain-failed-{config.run_id}")
    context.log.info(f"alert delivery: {delivery}")
    return dg.Output(
        None,
        metadata={
            **decision.metadata(),
            "failed_run_id": config.run_id,
            "decision_key": key,
            "evidence": dg.MetadataValue.json(decision.evidence),
            **delivery,
        },
    )


@dg.job(
    name="alert_job",
    tags={PIPELINE_TAG: ALERT_PIPELINE},
    # One short step: a process of its own would cost more than the step.
    executor_def=dg.in_process_executor,
    description="Alert the people on duty that a retraining failed (retrain_failure_sensor).",
)
def alert_job() -> None:
    alert_retrain_failure()


# ------------------------------------------------------------------ moves by hand
class AliasMove(dg.Config):
    """An operator's alias move (set by ``recsys models promote|rollback``)."""

    action: Literal["promote", "candidate", "rollback"] = Field(
        description="promote: production <- version; candidate: phase version in at "
        "share; rollback: undo the last step of alias (default: the candidate if set)."
    )
    version: str = ""
    share: float | None = None
    alias: str = Field(default="", description="rollback only: production or candidate.")
    reason: str = Field(description="Recorded in the audit trail (starts with 'manual:').")
    evidence: dict[str, str] = Field(
        default_factory=dict, description="Who asked (user, host, tool)."
    )


def apply_move(registry: ModelRegistry, move: AliasMove) -> tuple[AliasEvent, str]:
    """The compare-and-set registry call the move asks for, and its alert title."""
    evidence = dict(move.evidence)
    if move.action == "rollback":
        event = registry.rollback(reason=move.reason, alias=move.alias or None, evidence=evidence)
        if event.action == "clear":
            return event, f"Candidate {event.previous} rolled back by hand"
        return event, f"Production rolled back to {event.version} by hand"
    if move.action == "candidate":
        production = registry.alias(PRODUCTION)
        if production is not None and production.version == move.version:
            raise RegistryError(
                f"{move.version} is already the production model; nothing to phase in"
            )
        event = registry.set_alias(
            CANDIDATE, move.version, reason=move.reason, share=move.share, evidence=evidence
        )
        return event, f"Model {move.version} phased in as candidate by hand"
    event = registry.promote(move.version, reason=move.reason, evidence=evidence)
    return event, f"Model {move.version} promoted to production by hand"


def alias_alert(event: AliasEvent, title: str) -> Alert:
    return Alert(
        key=f"model-alias-{event.alias}",
        status="firing",
        severity="info",
        title=title,
        summary=(
            f"{event.alias}: {event.previous or 'nothing'} -> {event.version or 'cleared'} "
            f"({event.reason})"
        ),
        details={
            "alias": event.alias,
            "version": event.version,
            "previous": event.previous,
            "share": event.share,
            "reason": event.reason,
            **event.evidence,
        },
        at=event.at,
    )


@dg.op(
    description=(
        "Moves the production or candidate alias as an operator asked (compare-and-set, "
        "audit trail), alerts the people on duty, and records the move as a "
        "production_model materialization."
    ),
)
def move_model_alias(
    context: dg.OpExecutionContext,
    config: AliasMove,
    lake: LakeResource,
    notifier: NotifierResource,
) -> None:
    registry = ModelRegistry(lake.get())
    try:
        event, title = apply_move(registry, config)
    except REFUSALS as exc:
        # The operator's request or the registry's state: nothing moved, nothing to retry.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    context.log.info(f"{title}: {event.previous or 'none'} -> {event.version or 'none'}")
    # A channel that failed is reported, never an undone move.
    results = notifier.get().send(alias_alert(event, title))
    delivery = delivery_metadata(results)
    undelivered = (
        [] if was_delivered(results) else [f"{r.channel}: {r.error}" for r in results if not r.ok]
    )
    if undelivered:
        context.log.warning(f"alert not delivered ({', '.join(undelivered)})")
    context.log_event(
        dg.AssetMaterialization(
            asset_key=PRODUCTION_MODEL,
            description=title,
            metadata={
                "action": f"manual_{config.action}",
                "alias": event.alias,
                "alias_action": event.action,
                "model_version": event.version or "",
                "previous": event.previous or "",
                "share": event.share if event.share is not None else 1.0,
                "reason": event.reason,
                "evidence": dg.MetadataValue.json(event.evidence),
                "undelivered": "; ".join(undelivered),
                **delivery,
            },
        )
    )


@dg.job(
    name="model_alias_job",
    tags={PIPELINE_TAG: MANUAL_PIPELINE},
    executor_def=dg.in_process_executor,
    description="An operator's promotion or rollback (recsys models promote|rollback).",
)
def model_alias_job() -> None:
    move_model_alias()
