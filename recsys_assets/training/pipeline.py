"""The whole training run as plain functions: lake data in, a verified bundle out.

The Dagster assets call these same steps one by one (persisting what passes between
them in the lake); :func:`train_bundle` chains them in memory for tests, benchmarks
and scripts that want a model without an orchestrator::

    outcome = train_bundle(lake, TrainingParams.from_settings(settings), out_dir)
    model = Recommender.load(outcome.bundle_path)

Three states are built with one function: as of the ranking cut-off (ranking
dataset), as of the holdout start (evaluation) and as of the end (served). ALS is
fitted before the cut-off for the ranking dataset (so its scores carry no label
information), before the holdout for the evaluation, and on the whole window for
serving (``serve_refit``), with user vectors always recomputed from the state's
history.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_assets.training.data import (
    Encoded,
    Interactions,
    Vocabulary,
    build_interactions,
    build_vocabulary,
    encode,
    read_catalog,
    read_weblogs,
)
from recsys_assets.training.evaluation import (
    Holdout,
    build_holdout,
    evaluate,
    model_lists,
    popularity_lists,
)
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.ranking import (
    RankerFit,
    RankingDataset,
    build_ranking_dataset,
    save_ranker,
    train_ranker,
)
from recsys_assets.training.retrieval import AlsFit, fit_als
from recsys_assets.training.snapshot import build_state
from recsys_serving.index.base import IndexArtifact
from recsys_serving.lake import Lake
from recsys_serving.model.bundle import BundleWriter, new_version
from recsys_serving.model.features import FEATURE_NAMES
from recsys_serving.model.recommender import (
    INDEX_DIR,
    RANKER_FILE,
    STATE_DIR,
    Ranker,
    Recommender,
)
from recsys_serving.model.state import ModelState

Progress = Callable[[str], None]


@dataclass
class Prepared:
    interactions: Interactions
    vocab: Vocabulary
    enc: Encoded


@dataclass
class TrainOutcome:
    bundle_path: Path
    manifest: dict[str, Any]
    metrics: dict[str, float]
    popularity_metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def prepare(lake: Lake, params: TrainingParams) -> Prepared:
    weblogs = read_weblogs(lake)
    interactions = build_interactions(weblogs, params)
    items, _users = read_catalog(lake)
    vocab = build_vocabulary(interactions, items)
    return Prepared(interactions, vocab, encode(interactions, vocab))


def index_artifact(state: ModelState, version: str) -> IndexArtifact:
    """The candidate index of a served state: item vectors, categories, popularity."""
    cats = state.item_categories
    names = state.categories
    return IndexArtifact(
        version=version,
        item_ids=state.item_ids.tolist(),
        vectors=state.item_factors,
        categories=[
            [str(names[c]) for c in cats.indices[cats.indptr[r] : cats.indptr[r + 1]].tolist()]
            for r in range(state.n_items)
        ],
        published_at=state.published_at,
        popularity=state.item_column("log_pop_decayed").astype("float32"),
    )


def write_bundle(
    target: Path,
    state: ModelState,
    ranker: RankerFit,
    manifest: dict[str, Any],
    version: str | None = None,
) -> dict[str, Any]:
    """Write the served state, the ranker and the index artifact as one bundle."""
    version = version or new_version()
    with BundleWriter(target, version=version) as writer:
        state.save(writer.path / STATE_DIR)
        save_ranker(ranker, writer.path / RANKER_FILE)
        artifact = index_artifact(state, version)
        artifact.save(writer.path / INDEX_DIR)
        writer.manifest.update(manifest)
        writer.manifest.setdefault("index_version", version)
        writer.manifest["feature_names"] = list(FEATURE_NAMES)
    return writer.manifest


def train_bundle(
    lake: Lake,
    params: TrainingParams,
    out_dir: Path,
    *,
    on_step: Progress | None = None,
) -> TrainOutcome:
    """Train from every weblogs partition in the lake and write a bundle under ``out_dir``.

    Raises :class:`~recsys_assets.training.data.TrainingDataError` when the window is
    empty or too small; nothing is written then.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        if on_step is not None:
            on_step(name)

    prep = prepare(lake, params)
    step("interactions")
    window = prep.interactions.window
    als_rank = fit_als(prep.enc, prep.vocab, window.cutoff, params)
    als_eval = fit_als(prep.enc, prep.vocab, window.holdout_start, params)
    als_serve = fit_als(prep.enc, prep.vocab, window.end, params)
    step("retrieval_model")
    rank_state = build_state(prep.enc, prep.vocab, window.cutoff, als_rank.item_factors, params)
    dataset = build_ranking_dataset(rank_state, prep.enc, window.holdout_start, params)
    step("ranking_dataset")
    ranker = train_ranker(dataset, params)
    step("ranking_model")
    eval_state = build_state(
        prep.enc, prep.vocab, window.holdout_start, als_eval.item_factors, params
    )
    holdout = build_holdout(eval_state, prep.enc, window.end, params)
    challenger = Recommender(eval_state, Ranker(ranker.booster))
    metrics = evaluate(model_lists(challenger), holdout, params)
    popularity = evaluate(popularity_lists(eval_state), holdout, params)
    step("evaluation")
    serve_state = build_state(
        prep.enc,
        prep.vocab,
        window.end,
        als_serve.item_factors,
        params,
        publish_until=time.time(),
    )
    manifest = bundle_manifest(prep, params, (als_rank, als_eval, als_serve), dataset, ranker)
    manifest["metrics"] = {**metrics, "popularity": popularity, "holdout": holdout.stats}
    out_dir.mkdir(parents=True, exist_ok=True)
    version = new_version()
    written = write_bundle(out_dir / version, serve_state, ranker, manifest, version)
    step("recommender_model")
    return TrainOutcome(out_dir / version, written, metrics, popularity, timings)


def bundle_manifest(
    prep: Prepared,
    params: TrainingParams,
    fits: tuple[AlsFit, ...],
    dataset: RankingDataset,
    ranker: RankerFit,
) -> dict[str, Any]:
    """Provenance of a training run: data version, window, parameters, component stats."""
    data = prep.interactions.data
    return {
        "seed": params.seed,
        "params": params.as_dict(),
        "window": prep.interactions.window.as_dict(),
        "data": {
            "partitions": data["partitions"],
            "rows": data["rows"],
            "content_hashes": data["content_hashes"],
            "events": data["events"],
            "impressions": data["impressions"],
            "vocabulary": prep.vocab.stats,
        },
        "components": {
            "als": {name: f.stats for name, f in zip(("rank", "eval", "serve"), fits, strict=True)},
            "ranking_dataset": dataset.stats,
            "ranker": {
                "best_iteration": ranker.best_iteration,
                "valid_ndcg": ranker.valid_ndcg,
                "train_ndcg": ranker.train_ndcg,
                "seconds": round(ranker.seconds, 3),
                "feature_importance": ranker.feature_importance,
            },
        },
    }


__all__ = [
    "Holdout",
    "Prepared",
    "TrainOutcome",
    "index_artifact",
    "prepare",
    "train_bundle",
    "write_bundle",
]
