"""The training assets, generated from the step table.

Each asset of :data:`recsys_assets.training.graph.STEPS` gets its key, deps, kinds,
description, group and blocking checks from the table and runs its step function
(plain, tested code in :mod:`recsys_assets.training.steps`) inside its run's directory.
What is written here is only how each step's record becomes metadata, so the UI shows
windows, sizes, fit times, feature statistics, metrics and the promotion decision for
every run.
"""

# No `from __future__ import annotations`: Dagster inspects the context annotation.
import base64
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import orjson

from recsys_assets.resources import LakeResource
from recsys_assets.tracking.mirror import OFF, record_retraining
from recsys_assets.tracking.resource import MlflowResource
from recsys_assets.training import artifacts as art
from recsys_assets.training import graph, outputs
from recsys_assets.training.checks import finite_check
from recsys_assets.training.data import TrainingDataError
from recsys_assets.training.evaluation import metrics_chart_png
from recsys_assets.training.names import (
    CANDIDATE_INDEX,
    EVALUATION,
    INTERACTIONS,
    ITEM_FEATURES,
    RANKING_DATASET,
    RANKING_MODEL,
    RECOMMENDER,
    REGISTERED,
    RETRIEVAL,
    USER_FEATURES,
)
from recsys_assets.training.resources import TrainingConfig
from recsys_serving.registry import ModelRegistry

GROUP = graph.GROUP


def _json(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(orjson.loads(orjson.dumps(value, default=str)))


def _in_run(fn: Callable[..., dg.MaterializeResult]) -> Callable[..., dg.MaterializeResult]:
    """The step reads and writes its run's directory (``artifacts.run_scope``), keyed by
    the root run so a re-execution from failure finds what its parent run wrote; the
    first step (one that reads no other step) also prunes old run directories."""

    @functools.wraps(fn)
    def in_run(
        context: dg.AssetExecutionContext,
        lake: LakeResource,
        training: TrainingConfig,
        **resources: Any,
    ) -> dg.MaterializeResult:
        run = context.run.root_run_id or context.run_id
        store = lake.get()
        step = graph.BY_NAME.get(fn.__name__)
        if step is not None and not graph.upstream_steps(step):
            removed = art.prune_runs(store, current=run)
            if removed:
                context.log.info(f"removed {len(removed)} old training run directories")
        with art.run_scope(store, run, fn.__name__):
            return fn(context, lake, training, **resources)

    return in_run


def _floats(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"{prefix}{name}": float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and math.isfinite(value) and name != "seconds"
    }


# ------------------------------------------------------------ records -> metadata
Report = Callable[..., dg.MaterializeResult]


def _interactions(
    context: dg.AssetExecutionContext, out: outputs.Interactions, env: graph.StepEnv
) -> dg.MaterializeResult:
    data = out.data
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": data["events"],
            "impressions": data["impressions"],
            "users": data["users"],
            "items": data["items"],
            "window": _json(out.window),
            "partitions": len(data["partitions"]),
            "content_hashes": _json(data["content_hashes"]),
            "event_types": _json(data["event_types"]),
            "vocabulary": _json(data["vocabulary"]),
            "users_missing_from_store": data["users_missing_from_store"],
            "logged_items_missing_from_catalog": data["vocabulary"][
                "logged_items_missing_from_catalog"
            ],
            "lake": dg.MetadataValue.path(env.lake.uri_for(art.key(INTERACTIONS, "")).rstrip("/")),
        }
    )


def _item_features(
    context: dg.AssetExecutionContext, out: outputs.ItemFeatures, env: graph.StepEnv
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.items,
            "items_with_history": out.with_history,
            "horizons_days": _json(out.horizons),
            "served_table": dg.MetadataValue.md(out.table),
        },
        check_results=[finite_check("item_features_finite", out.non_finite)],
    )


def _user_features(
    context: dg.AssetExecutionContext, out: outputs.UserFeatures, env: graph.StepEnv
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.users,
            "users_with_history": out.users_with_history,
            "served_table": dg.MetadataValue.md(out.table),
        },
        check_results=[finite_check("user_features_finite", out.non_finite)],
    )


def _retrieval(
    context: dg.AssetExecutionContext, out: outputs.Retrieval, env: graph.StepEnv
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "als_fit_seconds": _json({k: v["seconds"] for k, v in out.als.items()}),
            "als": _json(out.als),
            "als_selected": _json(out.als_selection["selected"]),
            "als_selection": _json(out.als_selection),
            "covisitation": _json(out.covisit),
            # EASE per snapshot ("skipped" and why above the size guard) and its
            # regularisation chosen on the leave-last-out split.
            "ease": _json(out.ease),
            "ease_selection": _json(out.ease_selection),
        }
    )


def _candidate_index(
    context: dg.AssetExecutionContext, out: outputs.CandidateIndex, env: graph.StepEnv
) -> dg.MaterializeResult:
    retention = {"kept_indices": out.kept_indices, "pruned_indices": out.pruned_indices}
    return dg.MaterializeResult(
        metadata={
            "index_version": out.index_version,
            "dagster/row_count": out.items,
            "dim": out.dim,
            "published": out.published,
            **{
                key: dg.MetadataValue.json(value)
                for key, value in retention.items()
                if value is not None
            },
        }
    )


def _ranking_dataset(
    context: dg.AssetExecutionContext, out: outputs.RankingDatasetStats, env: graph.StepEnv
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.rows,
            "users": out.users,
            "positive_rows": out.positive_rows,
            "cold_users": out.cold_users,
            "candidate_recall": float(out.candidate_recall),
            "seconds": float(out.seconds),
        },
        check_results=[finite_check("ranking_features_finite", {"all": out.non_finite})],
    )


def _ranking_model(
    context: dg.AssetExecutionContext, out: outputs.RankingModel, env: graph.StepEnv
) -> dg.MaterializeResult:
    importance = "\n".join(
        ["| feature | gain share |", "|---|---:|"]
        + [f"| {k} | {v:.3f} |" for k, v in list(out.feature_importance.items())[:20]]
    )
    meta: dict[str, Any] = {
        "best_iteration": out.best_iteration,
        "fit_seconds": float(out.seconds),
        "rows": out.rows,
        "feature_importance": dg.MetadataValue.md(importance),
        # The ranker gate: "ranker" serves LightGBM (ties by the blend), "blend" ranks by
        # the validated blend because the ranker did not beat it on validation.
        "ranking_mode": out.ranking["mode"],
        "ranking_reason": out.ranking["reason"],
        # Which queries trained it: the global cut-offs alone, or with the leave-last-out
        # queries (added only when the cut-off ranker loses to the blend).
        "ranking_queries": str(out.ranking.get("lastout_choice", {}).get("queries", "")),
        "ranking": _json(out.ranking),
    }
    for name, value in (("valid_ndcg", out.valid_ndcg), ("train_ndcg", out.train_ndcg)):
        if isinstance(value, float) and math.isfinite(value):
            meta[name] = value
    return dg.MaterializeResult(metadata=meta)


def _recommender_model(
    context: dg.AssetExecutionContext, out: outputs.Bundle, env: graph.StepEnv
) -> dg.MaterializeResult:
    manifest = out.manifest
    metrics = {k: v for k, v in manifest["metrics"].items() if not isinstance(v, dict)}
    return dg.MaterializeResult(
        metadata={
            "version": out.version,
            "code_sha": manifest["code_sha"],
            "index_version": manifest["index_version"],
            "bundle": dg.MetadataValue.path(str(out.path)),
            "size_bytes": sum(int(f["size"]) for f in manifest["files"].values()),
            "window": _json(manifest["window"]),
            "params": _json(manifest["params"]),
            **_floats("holdout_", metrics),
        }
    )


def _model_evaluation(
    context: dg.AssetExecutionContext, out: outputs.Evaluation, env: graph.StepEnv
) -> dg.MaterializeResult:
    context.log.info(f"{out.decision}: {out.decision_reason}")
    meta = evaluation_metadata(out.as_dict())
    try:
        charted = dict(out.metrics)
        for model, figures in ((out.per_user or {}).get("metrics") or {}).items():
            charted[f"{model} (per-user)"] = figures
        png = metrics_chart_png(charted, out.k)
        meta["chart"] = dg.MetadataValue.md(
            f"![metrics](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
    except Exception as exc:  # a chart is a nicety; the figures above are the record
        context.log.warning(f"metrics chart not rendered: {exc}")
    return dg.MaterializeResult(metadata=meta)


def evaluation_metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's figures as metadata (``result``: its JSON record)."""
    k = result["k"]
    metrics = result["metrics"]
    meta: dict[str, Any] = {
        "challenger_version": result["challenger_version"],
        "production_version": result["production_version"] or dg.MetadataValue.null(),
        "decision": result["decision"],
        "decision_reason": result["decision_reason"],
        "metrics": _json(metrics),
        "comparison": dg.MetadataValue.md(result["table"]),
        "holdout": _json(result["holdout"]),
        "evidence": _json(result["evidence"]),
    }
    for model in ("challenger", "production", "popularity"):
        value = (metrics.get(model) or {}).get(f"ndcg@{k}")
        if isinstance(value, int | float):
            meta[f"{model}_ndcg@{k}"] = float(value)
    per_user = result.get("per_user")
    if per_user:
        meta["per_user_holdout"] = _json(per_user["holdout"])
        meta["per_user_comparison"] = _json(per_user["comparison"])
        for model, figures in per_user["metrics"].items():
            value = figures.get(f"ndcg@{k}")
            if isinstance(value, int | float):
                meta[f"per_user_{model}_ndcg@{k}"] = float(value)
    rule = result.get("first_model_rule")
    if rule:
        meta["first_model_rule"] = _json(rule)
        if rule.get("applies"):
            meta["answers"] = "model" if rule.get("serve") else "popularity"
        if rule.get("warning"):
            meta["warning"] = rule["warning"]
    if result.get("production_answers"):
        meta["production_answers"] = result["production_answers"]
    return meta


def _registered_model(
    context: dg.AssetExecutionContext,
    out: outputs.Registration,
    env: graph.StepEnv,
    upstream: graph.Upstream,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    # As recorded (NaN figures as null), as the MLflow run and the metadata show it.
    evaluation = graph.handed(upstream, EVALUATION, outputs.Evaluation).to_json()
    tracked = record_retraining(
        mlflow.mirror(),
        ModelRegistry(env.lake),
        out.version,
        evaluation=evaluation,
        dagster_run_id=context.run_id,
        step_seconds=_step_seconds(context),
        registered_as=out.registered_as,
    )
    if tracked["mlflow"] == "failed":
        context.log.warning(f"MLflow not updated (caught up at the next sync): {tracked['error']}")
    return dg.MaterializeResult(
        metadata={
            "version": out.version,
            "registered_as": out.registered_as,
            "registry_uri": dg.MetadataValue.path(out.uri),
            **_mlflow_metadata(tracked, mlflow.tracking_uri),
            **{
                key: value
                for key, value in evaluation_metadata(evaluation).items()
                if key
                in (
                    "decision",
                    "decision_reason",
                    "production_version",
                    "metrics",
                    "answers",
                    "warning",
                    "per_user_challenger_ndcg@10",
                    "per_user_popularity_ndcg@10",
                )
            },
        }
    )


def _step_seconds(context: dg.AssetExecutionContext) -> dict[str, float]:
    """Seconds each finished step of this run took (Dagster's own step statistics)."""
    try:
        stats = context.instance.get_run_step_stats(context.run_id)
    except Exception:  # statistics are a nicety of the MLflow run, never a reason to fail
        return {}
    return {
        s.step_key: round(s.end_time - s.start_time, 3)
        for s in stats
        if s.start_time is not None and s.end_time is not None
    }


def _mlflow_metadata(tracked: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Where the MLflow run is, or why there is none (the retraining succeeds either way)."""
    meta: dict[str, Any] = {"mlflow": tracked["mlflow"]}
    if tracked["mlflow"] == OFF:
        return meta
    meta["mlflow_tracking_uri"] = tracking_uri
    if tracked.get("run_id"):
        meta["mlflow_run_id"] = tracked["run_id"]
    if tracked.get("error"):
        meta["mlflow_error"] = tracked["error"]
    return meta


# ------------------------------------------------------------ the generated assets
@dataclass(frozen=True)
class _Reporter:
    """How a step's record becomes its materialization: ``report(context, record, env)``,
    or with ``with_mlflow`` ``report(context, record, env, upstream, mlflow)``."""

    report: Report
    with_mlflow: bool = False


REPORTERS: dict[str, _Reporter] = {
    INTERACTIONS: _Reporter(_interactions),
    ITEM_FEATURES: _Reporter(_item_features),
    USER_FEATURES: _Reporter(_user_features),
    RETRIEVAL: _Reporter(_retrieval),
    CANDIDATE_INDEX: _Reporter(_candidate_index),
    RANKING_DATASET: _Reporter(_ranking_dataset),
    RANKING_MODEL: _Reporter(_ranking_model),
    RECOMMENDER: _Reporter(_recommender_model),
    EVALUATION: _Reporter(_model_evaluation),
    REGISTERED: _Reporter(_registered_model, with_mlflow=True),
}
if set(REPORTERS) != set(graph.NAMES):  # a new row of the table needs its metadata here
    raise ValueError(f"training steps without a reporter: {set(graph.NAMES) ^ set(REPORTERS)}")


def step_env(lake: LakeResource, training: TrainingConfig) -> graph.StepEnv:
    """The steps' environment under Dagster: the resources' values, the assets' own
    bundle cache (pruned as it goes)."""
    cache = training.cache()
    return graph.StepEnv(
        lake=lake.get(),
        params=training.params(),
        staging=cache / "bundles",
        cache_dir=cache,
        rule=training.rule(),
        publisher=training.publisher,
        prune_staging=True,
    )


def _execute(
    step: graph.Step,
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    training: TrainingConfig,
    **resources: Any,
) -> dg.MaterializeResult:
    env = step_env(lake, training)
    upstream = graph.LakeOutputs(env.lake)  # what the steps it reads recorded in this run
    try:
        out = graph.execute(step, env, upstream)
    except TrainingDataError as exc:
        # Bad input, not a bug: one clear line in the UI and the CLI, no stack trace.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    reporter = REPORTERS[step.name]
    if reporter.with_mlflow:
        return reporter.report(context, out, env, upstream, **resources)
    return reporter.report(context, out, env)


def _body(step: graph.Step) -> Callable[..., dg.MaterializeResult]:
    """The asset's compute function, with the resources its reporter needs."""
    if REPORTERS[step.name].with_mlflow:

        def with_mlflow(
            context: dg.AssetExecutionContext,
            lake: LakeResource,
            training: TrainingConfig,
            mlflow: MlflowResource,
        ) -> dg.MaterializeResult:
            return _execute(step, context, lake, training, mlflow=mlflow)

        fn: Callable[..., dg.MaterializeResult] = with_mlflow
    else:

        def plain(
            context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
        ) -> dg.MaterializeResult:
            return _execute(step, context, lake, training)

        fn = plain
    fn.__name__ = fn.__qualname__ = step.name
    return fn


def training_asset(step: graph.Step) -> dg.AssetsDefinition:
    """The Dagster asset of one row of the step table."""
    return dg.asset(
        name=step.name,
        group_name=step.group,
        deps=list(step.inputs),
        kinds=set(step.kinds),
        description=step.description,
        check_specs=[
            dg.AssetCheckSpec(c.name, asset=step.name, blocking=True, description=c.description)
            for c in step.checks
        ],
    )(_in_run(_body(step)))


TRAINING_ASSETS: list[dg.AssetsDefinition] = [training_asset(step) for step in graph.STEPS]
