"""The training assets: weblogs and the catalogue in, a registered model bundle out.

Each asset calls one step of :mod:`recsys_assets.training.steps` (plain, tested
functions that read their inputs from the lake and write their output there) and
turns the result into metadata, so the UI shows windows, sizes, fit times, feature
statistics, metrics and the promotion decision for every run.
"""

# No `from __future__ import annotations`: Dagster inspects the context annotation.
import base64
import functools
import math
from collections.abc import Callable
from typing import Any

import dagster as dg
import orjson

from recsys_assets.resources import LakeResource
from recsys_assets.tracking.mirror import OFF, record_retraining
from recsys_assets.tracking.resource import MlflowResource
from recsys_assets.training import artifacts as art
from recsys_assets.training import steps
from recsys_assets.training.checks import finite_check
from recsys_assets.training.data import TrainingDataError
from recsys_assets.training.evaluation import metrics_chart_png
from recsys_assets.training.resources import TrainingConfig
from recsys_serving.registry import ModelRegistry

GROUP = "training"


def _json(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(orjson.loads(orjson.dumps(value, default=str)))


def _in_run(fn: Callable[..., dg.MaterializeResult]) -> Callable[..., dg.MaterializeResult]:
    """The step reads and writes its run's directory (``artifacts.run_scope``), keyed by
    the root run so a re-execution from failure finds what its parent run wrote; the
    first step also prunes old run directories."""

    @functools.wraps(fn)
    def in_run(
        context: dg.AssetExecutionContext,
        lake: LakeResource,
        training: TrainingConfig,
        **resources: Any,
    ) -> dg.MaterializeResult:
        run = context.run.root_run_id or context.run_id
        store = lake.get()
        if fn.__name__ == steps.INTERACTIONS:
            removed = art.prune_runs(store, current=run)
            if removed:
                context.log.info(f"removed {len(removed)} old training run directories")
        with art.run_scope(store, run, fn.__name__):
            return fn(context, lake, training, **resources)

    return in_run


def _floats(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {
        f"{prefix}{name}": float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and math.isfinite(value) and name != "seconds"
    }


@dg.asset(
    group_name=GROUP,
    deps=["weblogs", "item_catalog", "user_profiles"],
    kinds={"polars", "numpy"},
    description=(
        "Weighted implicit feedback from the weblogs window (view < click < add_to_cart < "
        "purchase, ratings by value), impressions with their clicks, the training / label / "
        "holdout cut of the window and the item/user vocabulary (catalogue + logs)."
    ),
)
@_in_run
def interactions(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    try:
        result = steps.run_interactions(lake.get(), training.params())
    except TrainingDataError as exc:
        # Bad input, not a bug: one clear line in the UI and the CLI, no stack trace.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    data = result["data"]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": data["events"],
            "impressions": data["impressions"],
            "users": data["users"],
            "items": data["items"],
            "window": _json(result["window"]),
            "partitions": len(data["partitions"]),
            "content_hashes": _json(data["content_hashes"]),
            "event_types": _json(data["event_types"]),
            "vocabulary": _json(data["vocabulary"]),
            "users_missing_from_store": data["users_missing_from_store"],
            "logged_items_missing_from_catalog": data["vocabulary"][
                "logged_items_missing_from_catalog"
            ],
            "lake": dg.MetadataValue.path(
                lake.get().uri_for(art.key(steps.INTERACTIONS, "")).rstrip("/")
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[interactions],
    kinds={"numpy"},
    check_specs=[
        dg.AssetCheckSpec(
            "item_features_finite",
            asset="item_features",
            blocking=True,
            description="No NaN or inf in any item feature of any snapshot.",
        )
    ],
    description=(
        "Per-item features as of the ranking cut-off, the holdout start and the end: "
        "windowed and decayed popularity, trend, Bayesian-smoothed CTR from impressions, "
        "item age, first/last interaction recency, mean rating."
    ),
)
@_in_run
def item_features(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_item_features(lake.get(), training.params())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result["items"],
            "items_with_history": result["with_history"],
            "horizons_days": _json(result["horizons"]),
            "served_table": dg.MetadataValue.md(result["table"]),
        },
        check_results=[finite_check("item_features_finite", result["non_finite"])],
    )


@dg.asset(
    group_name=GROUP,
    deps=[interactions],
    kinds={"numpy"},
    check_specs=[
        dg.AssetCheckSpec(
            "user_features_finite",
            asset="user_features",
            blocking=True,
            description="No NaN or inf in any user feature or category affinity.",
        )
    ],
    description=(
        "Per-user features and history as of each cut-off: activity (whole window and "
        "recent window), recency, distinct items, smoothed CTR, category affinity (whole "
        "window and recent), seen items and the most recent items."
    ),
)
@_in_run
def user_features(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_user_features(lake.get(), training.params())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result["users"],
            "users_with_history": result["users_with_history"],
            "served_table": dg.MetadataValue.md(result["table"]),
        },
        check_results=[finite_check("user_features_finite", result["non_finite"])],
    )


@dg.asset(
    group_name=GROUP,
    deps=[interactions],
    kinds={"implicit", "numpy"},
    description=(
        "Implicit ALS fitted before each cut-off (ranking, holdout, end) with user vectors "
        "recomputed from each snapshot's history, content vectors for cold items, and "
        "item-item co-visitation within sessions."
    ),
)
@_in_run
def retrieval_model(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_retrieval(lake.get(), training.params())
    return dg.MaterializeResult(
        metadata={
            "als_fit_seconds": _json({k: v["seconds"] for k, v in result["als"].items()}),
            "als": _json(result["als"]),
            "als_selected": _json(result["als_selection"]["selected"]),
            "als_selection": _json(result["als_selection"]),
            "covisitation": _json(result["covisit"]),
            # EASE per snapshot ("skipped" and why above the size guard) and its
            # regularisation chosen on the leave-last-out split.
            "ease": _json(result["ease"]),
            "ease_selection": _json(result["ease_selection"]),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[retrieval_model, item_features],
    kinds={"numpy", "elasticsearch"},
    description=(
        "The served candidate index: item vectors, categories, publication dates and "
        "popularity. Travels in the bundle (embedded index); also published to "
        "Elasticsearch as a new versioned index when RECSYS_ES_URL is set."
    ),
)
@_in_run
def candidate_index(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_candidate_index(lake.get(), training.publisher())
    return dg.MaterializeResult(
        metadata={
            "index_version": result["index_version"],
            "dagster/row_count": result["items"],
            "dim": result["dim"],
            "published": str(result["published"]),
            **{
                key: dg.MetadataValue.json(result[key])
                for key in ("kept_indices", "pruned_indices")
                if key in result
            },
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[candidate_index, user_features, item_features],
    kinds={"polars", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(
            "ranking_features_finite",
            asset="ranking_dataset",
            blocking=True,
            description="No NaN or inf in the ranking features (checked before training).",
        )
    ],
    description=(
        "Candidates from the runtime's own generators for users active after the ranking "
        "cut-off, featurized by the runtime's feature function and labelled by what those "
        "users did next; logged impressions without a click are negatives."
    ),
)
@_in_run
def ranking_dataset(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_ranking_dataset(lake.get(), training.params())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result["rows"],
            "users": result["users"],
            "positive_rows": result["positive_rows"],
            "cold_users": result["cold_users"],
            "candidate_recall": float(result["candidate_recall"]),
            "seconds": float(result["seconds"]),
        },
        check_results=[finite_check("ranking_features_finite", {"all": result["non_finite"]})],
    )


@dg.asset(
    group_name=GROUP,
    deps=[ranking_dataset],
    kinds={"lightgbm"},
    description="LightGBM lambdarank, early-stopped on NDCG of a validation split by user.",
)
@_in_run
def ranking_model(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_ranking_model(lake.get(), training.params())
    importance = "\n".join(
        ["| feature | gain share |", "|---|---:|"]
        + [f"| {k} | {v:.3f} |" for k, v in list(result["feature_importance"].items())[:20]]
    )
    meta: dict[str, Any] = {
        "best_iteration": result["best_iteration"],
        "fit_seconds": float(result["seconds"]),
        "rows": result["rows"],
        "feature_importance": dg.MetadataValue.md(importance),
        # The ranker gate: "ranker" serves LightGBM (ties by the blend), "blend" ranks by
        # the validated blend because the ranker did not beat it on validation.
        "ranking_mode": result["ranking"]["mode"],
        "ranking_reason": result["ranking"]["reason"],
        "ranking": _json(result["ranking"]),
    }
    for name in ("valid_ndcg", "train_ndcg"):
        if isinstance(result[name], float) and math.isfinite(result[name]):
            meta[name] = result[name]
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    group_name=GROUP,
    deps=[ranking_model, candidate_index, user_features, item_features],
    kinds={"bundle"},
    description=(
        "The bundle the server loads: the state as of the end of the window, the ranker "
        "and the index artifact, with a manifest (code sha, data partitions and hashes, "
        "window, parameters, features, holdout metrics) and a checksum per file."
    ),
)
@_in_run
def recommender_model(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    staging = training.cache() / "bundles"
    bundle, manifest = steps.run_recommender_model(
        lake.get(), training.params(), staging, prune_staging=True
    )
    metrics = {k: v for k, v in manifest["metrics"].items() if not isinstance(v, dict)}
    return dg.MaterializeResult(
        metadata={
            "version": manifest["version"],
            "code_sha": manifest["code_sha"],
            "index_version": manifest["index_version"],
            "bundle": dg.MetadataValue.path(str(bundle)),
            "size_bytes": sum(int(f["size"]) for f in manifest["files"].values()),
            "window": _json(manifest["window"]),
            "params": _json(manifest["params"]),
            **_floats("holdout_", metrics),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[recommender_model],
    kinds={"python"},
    description=(
        "Time-based holdout: the challenger, the production model as served and a "
        "popularity baseline on the same users (NDCG/Recall/HitRate/MAP@K, coverage, "
        "replayed CTR); a per-user holdout (each sampled user's last 20% of events, "
        "state rebuilt without them): the challenger and popularity; the promotion "
        "rule's decision (or, with no production model that beat popularity, the "
        "first-model rule's) with its reason."
    ),
)
@_in_run
def model_evaluation(
    context: dg.AssetExecutionContext, lake: LakeResource, training: TrainingConfig
) -> dg.MaterializeResult:
    result = steps.run_model_evaluation(
        lake.get(), training.params(), training.rule(), training.cache()
    )
    context.log.info(f"{result['decision']}: {result['decision_reason']}")
    meta = evaluation_metadata(result)
    try:
        charted = dict(result["metrics"])
        for model, figures in ((result.get("per_user") or {}).get("metrics") or {}).items():
            charted[f"{model} (per-user)"] = figures
        png = metrics_chart_png(charted, result["k"])
        meta["chart"] = dg.MetadataValue.md(
            f"![metrics](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
    except Exception as exc:  # a chart is a nicety; the figures above are the record
        context.log.warning(f"metrics chart not rendered: {exc}")
    return dg.MaterializeResult(metadata=meta)


def evaluation_metadata(result: dict[str, Any]) -> dict[str, Any]:
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


@dg.asset(
    group_name=GROUP,
    deps=[model_evaluation],
    kinds={"registry"},
    description=(
        "Registers the bundle in the lake's model registry (always) and makes it "
        "production only when no production model exists yet (or production only answers "
        "with popularity); a model below popularity answers with popularity until one "
        "beats it (first-model rule); later promotions belong to the closed loop."
    ),
)
@_in_run
def registered_model(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    training: TrainingConfig,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    result = steps.run_registration(lake.get(), training.cache())
    evaluation = steps.art.get_json(lake.get(), steps.art.key(steps.EVALUATION, "evaluation.json"))
    tracked = record_retraining(
        mlflow.mirror(),
        ModelRegistry(lake.get()),
        result["version"],
        evaluation=evaluation,
        dagster_run_id=context.run_id,
        step_seconds=_step_seconds(context),
        registered_as=result["registered_as"],
    )
    if tracked["mlflow"] == "failed":
        context.log.warning(f"MLflow not updated (caught up at the next sync): {tracked['error']}")
    return dg.MaterializeResult(
        metadata={
            "version": result["version"],
            "registered_as": result["registered_as"],
            "registry_uri": dg.MetadataValue.path(result["uri"]),
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


TRAINING_ASSETS = [
    interactions,
    item_features,
    user_features,
    retrieval_model,
    candidate_index,
    ranking_dataset,
    ranking_model,
    recommender_model,
    model_evaluation,
    registered_model,
]
