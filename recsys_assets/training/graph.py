"""The training graph, declared once.

:data:`STEPS` is the one table of the training steps: name (the asset key), the step
function, the assets it reads, the record it returns, its kinds, checks, description
and group. Everything else is generated from it:

* the Dagster assets (:mod:`recsys_assets.training.assets`: deps, kinds, checks,
  descriptions; only how each record becomes metadata is written there);
* :func:`recsys_assets.training.pipeline.train_bundle`, the same steps in-process;
* ``retrain_job``'s selection and the ``recsys retrain`` progress bar
  (:data:`RETRAIN_ASSETS`);
* ``bench/train.py``'s list of steps, one process each.

A step is handed the records of the steps it reads (:mod:`recsys_assets.training.outputs`):
in memory by ``train_bundle``, from its run's directory in the lake when the upstream step
ran in another process (:class:`LakeOutputs`). Large artifacts (arrays, tables, the
bundle's files) stay in the lake, keyed by step name (:mod:`recsys_assets.training.artifacts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from recsys_assets.training import artifacts as art
from recsys_assets.training import outputs, steps
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
from recsys_assets.training.params import TrainingParams
from recsys_serving.index.base import IndexPublisher
from recsys_serving.lake import Lake
from recsys_serving.registry import PromotionRule

GROUP = "training"
OUTPUT = "output.json"  # a step's record, beside its artifacts

# Assets outside the training group that the steps read. The weblogs partitions are
# kept fresh by the landing sensor; the catalogue snapshots are refreshed by every
# retraining (``retrain_job`` selects them before the training steps).
WEBLOGS = "weblogs"
ITEM_CATALOG = "item_catalog"
USER_PROFILES = "user_profiles"
REFRESHED_BY_RETRAIN = (ITEM_CATALOG, USER_PROFILES)


def _no_publisher() -> IndexPublisher | None:
    return None


@dataclass(frozen=True, slots=True)
class StepEnv:
    """What the steps are run with (the Dagster resources, or ``train_bundle``'s args)."""

    lake: Lake
    params: TrainingParams
    staging: Path  # where recommender_model writes its bundle
    cache_dir: Path | None = None  # where evaluation and registration fetch bundles
    rule: PromotionRule | None = None
    # Opened only by the step that publishes (an Elasticsearch client otherwise).
    publisher: Callable[[], IndexPublisher | None] = _no_publisher
    prune_staging: bool = False  # staging is the assets' own cache, not a caller's dir

    def need_cache(self) -> Path:
        if self.cache_dir is None:
            raise ValueError("this step needs a bundle cache directory (StepEnv.cache_dir)")
        return self.cache_dir

    def need_rule(self) -> PromotionRule:
        if self.rule is None:
            raise ValueError("this step needs the promotion rule (StepEnv.rule)")
        return self.rule


Upstream = Mapping[str, outputs.Record]
Run = Callable[[StepEnv, Upstream], outputs.Record]


@dataclass(frozen=True, slots=True)
class Check:
    """A blocking asset check on the step's output (its result comes with the record)."""

    name: str
    description: str


@dataclass(frozen=True, slots=True)
class Step:
    """One row of the table: ``run(env, upstream)`` returns a record of type ``output``;
    ``upstream`` holds the records of the steps among ``inputs``."""

    name: str
    run: Run
    inputs: tuple[str, ...]  # asset keys read: other steps, or the assets above
    output: type[outputs.Record]
    kinds: frozenset[str]
    description: str
    checks: tuple[Check, ...] = ()
    group: str = GROUP


R = TypeVar("R", bound=outputs.Record)


def handed(up: Upstream, name: str, kind: type[R]) -> R:
    """Step ``name``'s record as handed over, checked against the type the table says
    it returns (a record from the lake is rebuilt as that type)."""
    record = up[name]
    if not isinstance(record, kind):
        raise TypeError(f"{name} handed over {type(record).__name__}, not {kind.__name__}")
    return record


def _bundle(env: StepEnv, up: Upstream) -> outputs.Record:
    return steps.run_recommender_model(
        env.lake, env.params, env.staging, prune_staging=env.prune_staging
    )


def _evaluation(env: StepEnv, up: Upstream) -> outputs.Record:
    bundle = handed(up, RECOMMENDER, outputs.Bundle)
    return steps.run_model_evaluation(
        env.lake, env.params, env.need_rule(), env.need_cache(), bundle=bundle.version
    )


def _registration(env: StepEnv, up: Upstream) -> outputs.Record:
    evaluation = handed(up, EVALUATION, outputs.Evaluation)
    return steps.run_registration(env.lake, env.need_cache(), evaluation)


STEPS: tuple[Step, ...] = (
    Step(
        INTERACTIONS,
        lambda env, up: steps.run_interactions(env.lake, env.params),
        inputs=(WEBLOGS, ITEM_CATALOG, USER_PROFILES),
        output=outputs.Interactions,
        kinds=frozenset({"polars", "numpy"}),
        description=(
            "Weighted implicit feedback from the weblogs window (view < click < add_to_cart < "
            "purchase, ratings by value), impressions with their clicks, the training / label / "
            "holdout cut of the window and the item/user vocabulary (catalogue + logs)."
        ),
    ),
    Step(
        ITEM_FEATURES,
        lambda env, up: steps.run_item_features(env.lake, env.params),
        inputs=(INTERACTIONS,),
        output=outputs.ItemFeatures,
        kinds=frozenset({"numpy"}),
        checks=(
            Check("item_features_finite", "No NaN or inf in any item feature of any snapshot."),
        ),
        description=(
            "Per-item features as of the ranking cut-off, the holdout start and the end: "
            "windowed and decayed popularity, trend, Bayesian-smoothed CTR from impressions, "
            "item age, first/last interaction recency, mean rating."
        ),
    ),
    Step(
        USER_FEATURES,
        lambda env, up: steps.run_user_features(env.lake, env.params),
        inputs=(INTERACTIONS,),
        output=outputs.UserFeatures,
        kinds=frozenset({"numpy"}),
        checks=(
            Check(
                "user_features_finite",
                "No NaN or inf in any user feature or category affinity.",
            ),
        ),
        description=(
            "Per-user features and history as of each cut-off: activity (whole window and "
            "recent window), recency, distinct items, smoothed CTR, category affinity (whole "
            "window and recent), seen items and the most recent items."
        ),
    ),
    Step(
        RETRIEVAL,
        lambda env, up: steps.run_retrieval(env.lake, env.params),
        inputs=(INTERACTIONS,),
        output=outputs.Retrieval,
        kinds=frozenset({"implicit", "numpy"}),
        description=(
            "Implicit ALS fitted before each cut-off (ranking, holdout, end) with user vectors "
            "recomputed from each snapshot's history, content vectors for cold items, and "
            "item-item co-visitation within sessions."
        ),
    ),
    Step(
        CANDIDATE_INDEX,
        lambda env, up: steps.run_candidate_index(env.lake, env.publisher()),
        inputs=(RETRIEVAL, ITEM_FEATURES),
        output=outputs.CandidateIndex,
        kinds=frozenset({"numpy", "elasticsearch"}),
        description=(
            "The served candidate index: item vectors, categories, publication dates and "
            "popularity. Travels in the bundle (embedded index); also published to "
            "Elasticsearch as a new versioned index when RECSYS_ES_URL is set."
        ),
    ),
    Step(
        RANKING_DATASET,
        lambda env, up: steps.run_ranking_dataset(env.lake, env.params),
        inputs=(CANDIDATE_INDEX, USER_FEATURES, ITEM_FEATURES),
        output=outputs.RankingDatasetStats,
        kinds=frozenset({"polars", "parquet"}),
        checks=(
            Check(
                "ranking_features_finite",
                "No NaN or inf in the ranking features (checked before training).",
            ),
        ),
        description=(
            "Candidates from the runtime's own generators for users active after the ranking "
            "cut-off, featurized by the runtime's feature function and labelled by what those "
            "users did next; logged impressions without a click are negatives."
        ),
    ),
    Step(
        RANKING_MODEL,
        lambda env, up: steps.run_ranking_model(env.lake, env.params),
        inputs=(RANKING_DATASET,),
        output=outputs.RankingModel,
        kinds=frozenset({"lightgbm"}),
        description="LightGBM lambdarank, early-stopped on NDCG of a validation split by user.",
    ),
    Step(
        RECOMMENDER,
        _bundle,
        inputs=(RANKING_MODEL, CANDIDATE_INDEX, USER_FEATURES, ITEM_FEATURES),
        output=outputs.Bundle,
        kinds=frozenset({"bundle"}),
        description=(
            "The bundle the server loads: the state as of the end of the window, the ranker "
            "and the index artifact, with a manifest (code sha, data partitions and hashes, "
            "window, parameters, features, holdout metrics) and a checksum per file."
        ),
    ),
    Step(
        EVALUATION,
        _evaluation,
        inputs=(RECOMMENDER,),
        output=outputs.Evaluation,
        kinds=frozenset({"python"}),
        description=(
            "Time-based holdout: the challenger, the production model as served and a "
            "popularity baseline on the same users (NDCG/Recall/HitRate/MAP@K, coverage, "
            "replayed CTR); a per-user holdout (each sampled user's last 20% of events, "
            "state rebuilt without them): the challenger and popularity; the promotion "
            "rule's decision (or, with no production model that beat popularity, the "
            "first-model rule's) with its reason."
        ),
    ),
    Step(
        REGISTERED,
        _registration,
        inputs=(EVALUATION,),
        output=outputs.Registration,
        kinds=frozenset({"registry"}),
        description=(
            "Registers the bundle in the lake's model registry (always) and makes it "
            "production only when no production model exists yet (or production only answers "
            "with popularity); a model below popularity answers with popularity until one "
            "beats it (first-model rule); later promotions belong to the closed loop."
        ),
    ),
)

BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# What retrain_job materializes, in execution order (the CLI's progress bar counts it).
RETRAIN_ASSETS: tuple[str, ...] = (*REFRESHED_BY_RETRAIN, *NAMES)


def check_order(table: Sequence[Step]) -> None:
    """Refuse a table not listed in a topological order (every step after the steps it
    reads): table order is the order ``train_bundle`` and the benchmark run."""
    names = {s.name for s in table}
    seen: set[str] = set()
    for step in table:
        early = [i for i in step.inputs if i in names and i not in seen]
        if early:
            raise ValueError(f"training step {step.name} is listed before its inputs {early}")
        seen.add(step.name)


check_order(STEPS)


def upstream_steps(step: Step) -> tuple[str, ...]:
    """The steps ``step`` reads (its other inputs are assets outside the table)."""
    return tuple(i for i in step.inputs if i in BY_NAME)


def until(name: str) -> tuple[Step, ...]:
    """``name`` and every step it depends on, in table order (what ``train_bundle``
    runs to get a bundle)."""
    needed = {name}
    for step in reversed(STEPS):
        if step.name in needed:
            needed.update(upstream_steps(step))
    return tuple(s for s in STEPS if s.name in needed)


def save_output(lake: Lake, step: Step, output: outputs.Record) -> None:
    art.put_json(lake, art.key(step.name, OUTPUT), output.to_json())


def load_output(lake: Lake, name: str) -> outputs.Record:
    """``name``'s record as its run wrote it (the run scope decides which run)."""
    return BY_NAME[name].output.from_json(art.get_json(lake, art.key(name, OUTPUT)))


class LakeOutputs(Mapping[str, outputs.Record]):
    """Upstream records read from the lake on first use (a step in its own process)."""

    def __init__(self, lake: Lake) -> None:
        self._lake = lake
        self._loaded: dict[str, outputs.Record] = {}

    def __getitem__(self, name: str) -> outputs.Record:
        if name not in BY_NAME:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = load_output(self._lake, name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)


def execute(step: Step, env: StepEnv, upstream: Upstream) -> outputs.Record:
    """Run ``step`` and keep its record beside its artifacts for the steps after it."""
    output = step.run(env, upstream)
    if not isinstance(output, step.output):
        raise TypeError(f"{step.name} returned {type(output).__name__}, not {step.output}")
    save_output(env.lake, step, output)
    return output
