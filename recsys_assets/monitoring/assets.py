"""The closed loop's assets: ``online_ctr`` (what users do with the recommendations)
and ``production_model`` (which model serves, and every decision that changed it).

Both are computed by runs that the sensors request, so every closed-loop decision is
a run in the Dagster UI with its logs, retried and re-executable like any other:

* ``production_model`` (``canary_job``): one step of the promotion, as its run config
  says: ``start`` acts on a registered challenger's offline evaluation (canary, first
  model, or rejection); ``judge`` judges the running canary on the window the sensor
  saw and ramps, promotes or rolls it back. It materializes every time, with the
  decision (``action``, ``wait`` or ``none``) and its evidence as metadata, so the
  asset's history is the decision log (the notes' "promotion asset always
  materializes" pattern).
* ``online_ctr`` (``monitoring_job``): a snapshot of online CTR and service health;
  when ``ctr_drop_sensor`` launches a retraining it also requests this run with the
  drop's evidence, which records the drop as a decision.

Decisions are also appended to ``monitoring/decisions/`` in the lake (the demo report
reads them) and sent through the notifier.
"""

from datetime import UTC, datetime
from typing import Any, Literal

import dagster as dg
import orjson
from pydantic import Field

from recsys_assets.alerts.notifier import Alert, NotifierResource, delivery_metadata
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.ctr import series_rows
from recsys_assets.monitoring.promotion import (
    Decision,
    EvaluationOutcome,
    record_decision,
    start_canary,
    step_canary,
)
from recsys_assets.monitoring.snapshot import take_snapshot
from recsys_assets.resources import LakeResource
from recsys_serving.registry import ModelRegistry

GROUP = "closed_loop"
ONLINE_CTR = dg.AssetKey("online_ctr")
PRODUCTION_MODEL = dg.AssetKey("production_model")
EVALUATION = dg.AssetKey("model_evaluation")
REGISTERED = dg.AssetKey("registered_model")


# ------------------------------------------------------------------ shared by the runs
def alert_decision(notifier: NotifierResource, decision: Decision, key: str) -> dict[str, str]:
    """Send a decision to the people on duty; returns per-channel delivery metadata."""
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


def metadata_value(metadata: Any, key: str) -> Any:
    """A materialization's metadata entry as a plain value (or None)."""
    raw = metadata.get(key)
    return getattr(raw, "value", raw)


def evaluation_for(
    instance: dg.DagsterInstance, version: str, registered: dict[str, Any]
) -> EvaluationOutcome | None:
    """What ``model_evaluation`` said about ``version`` (newest evaluation that names it)."""
    if metadata_value(registered, "decision"):
        return _outcome(version, registered, None)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=EVALUATION), limit=50
    ).records
    for record in records:
        mat = record.asset_materialization
        if mat is None:
            continue
        if metadata_value(mat.metadata, "challenger_version") == version:
            return _outcome(version, mat.metadata, record.run_id)
    return None


def registration_of(instance: dg.DagsterInstance, version: str) -> dict[str, Any] | None:
    """The metadata of ``version``'s ``registered_model`` materialization, if any."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=REGISTERED), limit=50
    ).records
    for record in records:
        mat = record.asset_materialization
        if mat is not None and metadata_value(mat.metadata, "version") == version:
            return dict(mat.metadata)
    return None


def _outcome(version: str, meta: Any, run_id: str | None) -> EvaluationOutcome:
    metrics = metadata_value(meta, "metrics")
    if isinstance(metrics, str):
        try:
            metrics = orjson.loads(metrics)
        except orjson.JSONDecodeError:
            metrics = {"raw": metrics}
    return EvaluationOutcome(
        version=version,
        decision=str(metadata_value(meta, "decision") or ""),
        reason=str(metadata_value(meta, "decision_reason") or ""),
        production_version=metadata_value(meta, "production_version") or None,
        metrics=metrics if isinstance(metrics, dict) else {},
        run_id=run_id,
    )


def _parse_time(value: str) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ------------------------------------------------------------------- production_model
class PromotionStep(dg.Config):
    """Which promotion step a ``canary_job`` run takes (set by ``promotion_sensor``)."""

    step: Literal["start", "judge"] = Field(
        default="judge",
        description="start: act on VERSION's offline evaluation; judge: judge the canary.",
    )
    version: str = Field(default="", description="The challenger (start) or the canary.")
    judged_at: str = Field(
        default="",
        description="ISO time the sensor judged at; the run judges the same window (empty: now).",
    )


@dg.asset(
    key=PRODUCTION_MODEL,
    deps=[REGISTERED],
    group_name=GROUP,
    kinds={"registry"},
    description=(
        "Which model serves: each `canary_job` run takes one promotion step (act on a "
        "registered challenger's offline evaluation: canary, first model or rejection; "
        "or judge the running canary on online CTR: ramp, promote, roll back, wait) and "
        "records the decision and its evidence as metadata. Aliases live in the registry "
        "(`registry/aliases/`), their audit trail in `registry/history/`."
    ),
)
def production_model(
    context: dg.AssetExecutionContext,
    config: PromotionStep,
    lake: LakeResource,
    closed_loop: ClosedLoopConfig,
    notifier: NotifierResource,
) -> dg.MaterializeResult:
    now = _parse_time(config.judged_at) or datetime.now(UTC)
    store = lake.get()
    registry = ModelRegistry(store)
    decision: Decision | None = None
    idle: dict[str, Any] = {}
    if config.step == "start":
        registered = registration_of(context.instance, config.version) or {}
        outcome = evaluation_for(context.instance, config.version, registered)
        if outcome is None:
            idle = {"action": "none", "reason": f"no model_evaluation names {config.version}"}
        else:
            decision = start_canary(registry, outcome, closed_loop.canary_policy(), now)
            if decision is None:
                idle = {"action": "none", "reason": f"{config.version} was already acted on"}
    else:
        step = step_canary(
            registry, store, closed_loop.drop_policy(), closed_loop.canary_policy(), now
        )
        decision = step.decision
        if decision is None:
            verdict = step.verdict
            idle = {
                "action": "wait" if verdict is not None else "none",
                "reason": verdict.describe() if verdict is not None else "no canary to judge",
            }
            if verdict is not None:
                idle["evidence"] = dg.MetadataValue.json(verdict.evidence())
    if decision is None:
        context.log.info(f"{idle['action']}: {idle['reason']}")
        return dg.MaterializeResult(metadata={"model_version": config.version, **idle})
    context.log.info(f"{decision.action}: {decision.reason}")
    record_decision(store, decision)
    delivery = alert_decision(notifier, decision, f"recsys-promotion-{decision.version}")
    return dg.MaterializeResult(
        metadata={
            **decision.metadata(),
            "evidence": dg.MetadataValue.json(decision.evidence),
            **delivery,
        }
    )


canary_job = dg.define_asset_job(
    "canary_job",
    selection=dg.AssetSelection.assets(PRODUCTION_MODEL),
    tags={"recsys/pipeline": "canary"},
    # One short step: a process per step would cost more than the step itself.
    executor_def=dg.in_process_executor,
    description=(
        "One promotion step (production_model): start a canary from an offline 'promote', "
        "or judge the running canary and ramp, promote or roll it back."
    ),
)


# ------------------------------------------------------------------------- online_ctr
class OnlineCtrConfig(dg.Config):
    """Set by ``ctr_drop_sensor`` when it launches a retraining: the drop to record."""

    drop_evidence: str = Field(default="", description="The drop test's evidence (JSON).")
    drop_summary: str = ""
    detected_at: str = ""
    retrain_run_key: str = ""


def _record_drop(
    context: dg.AssetExecutionContext,
    config: OnlineCtrConfig,
    lake: LakeResource,
    notifier: NotifierResource,
) -> dict[str, Any]:
    evidence: dict[str, Any] = orjson.loads(config.drop_evidence)
    version = evidence.get("model_version")
    decision = Decision(
        "drop_detected",
        version,
        config.drop_summary or "online CTR dropped",
        _parse_time(config.detected_at) or datetime.now(UTC),
        production_version=version,
        previous_production=version,
        evidence={**evidence, "run_key": config.retrain_run_key},
    )
    context.log.warning(f"CTR drop, retraining launched: {decision.reason}")
    record_decision(lake.get(), decision)
    delivery = alert_decision(notifier, decision, f"recsys-ctr-drop-{version}")
    return {
        "event": "ctr_drop",
        "model_version": version or "",
        "recent_ctr": float((evidence.get("recent") or {}).get("ctr") or 0.0),
        "baseline_ctr": float((evidence.get("baseline") or {}).get("ctr") or 0.0),
        "p_value": float(evidence.get("p_value") or 0.0),
        "run_key": config.retrain_run_key,
        "evidence": dg.MetadataValue.json(decision.evidence),
        **delivery,
    }


@dg.asset(
    key=ONLINE_CTR,
    deps=["weblogs"],
    group_name=GROUP,
    kinds={"polars", "parquet"},
    description=(
        "Attributed online CTR (clicks joined to impressions on request_id) per model "
        "version and time bucket, the drop test on the production model, and service "
        "health scraped from the server's /metrics (calls, error rate, latency quantiles, "
        "fallback share). Snapshots go to `monitoring/online_ctr/` and `monitoring/health/`. "
        "A run requested by `ctr_drop_sensor` also records the drop and its evidence."
    ),
)
def online_ctr(
    context: dg.AssetExecutionContext,
    config: OnlineCtrConfig,
    lake: LakeResource,
    closed_loop: ClosedLoopConfig,
    notifier: NotifierResource,
) -> dg.MaterializeResult:
    # The drop is recorded first: a snapshot that fails must not lose the decision.
    drop = _record_drop(context, config, lake, notifier) if config.drop_evidence else {}
    snap = take_snapshot(lake.get(), closed_loop, datetime.now(UTC))
    context.log.info(f"drop test: {snap.verdict.describe()}")
    rows = series_rows(snap.series.tail(40))
    table = "\n".join(
        f"| {r['bucket_start']} | {r['model_version']} | {r['impressions']} | {r['clicks']} "
        f"| {r['ctr']:.2%} |"
        for r in rows
    )
    metadata: dict[str, object] = {
        **drop,
        "dagster/row_count": snap.series.height,
        "production_version": snap.production_version or "",
        "candidate_version": snap.candidate_version or "",
        "candidate_share": snap.candidate_share or 0.0,
        "drop_test": snap.verdict.outcome,
        "drop_evidence": dg.MetadataValue.json(snap.verdict.evidence()),
        "orphan_clicks": snap.orphan_clicks,
        "recent_window": dg.MetadataValue.json(snap.recent),
        "series": dg.MetadataValue.md(
            "| bucket | model | impressions | clicks | CTR |\n|---|---|---|---|---|\n" + table
        ),
        "series_path": dg.MetadataValue.path(lake.get().uri_for(snap.series_key)),
    }
    if snap.production_version and snap.recent.get(snap.production_version, {}).get("ctr"):
        metadata["production_ctr"] = float(snap.recent[snap.production_version]["ctr"])
    if snap.candidate_version and snap.recent.get(snap.candidate_version, {}).get("ctr"):
        metadata["candidate_ctr"] = float(snap.recent[snap.candidate_version]["ctr"])
    if snap.health is not None:
        metadata["service_health"] = dg.MetadataValue.json(snap.health)
        for key in ("error_rate", "latency_p95_ms", "fallback_share", "rps"):
            if snap.health.get(key) is not None:
                metadata[key] = float(snap.health[key])
    return dg.MaterializeResult(metadata=metadata)


monitoring_job = dg.define_asset_job(
    "monitoring_job",
    selection=dg.AssetSelection.assets(ONLINE_CTR),
    tags={"recsys/pipeline": "monitoring"},
    description="Record a snapshot of online CTR and service health (and a CTR drop).",
)
