"""The whole training run as one plain call: lake data in, a verified bundle out.

:func:`train_bundle` runs the same step functions the Dagster assets run
(:mod:`recsys_assets.training.steps`), in asset order, persisting what passes between
them in the lake exactly as a materialization does. Use it for tests, benchmarks
and scripts that want a model without an orchestrator::

    outcome = train_bundle(lake, settings.training, out_dir)
    model = Recommender.load(outcome.bundle_path)

Evaluation against production and registration (``model_evaluation``,
``registered_model``) are separate steps: see :func:`steps.run_model_evaluation` and
:func:`steps.run_registration`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_assets.training import artifacts as art
from recsys_assets.training import steps
from recsys_assets.training.params import TrainingParams
from recsys_serving.index.base import IndexPublisher
from recsys_serving.lake import Lake

Progress = Callable[[str], None]


@dataclass
class TrainOutcome:
    bundle_path: Path
    manifest: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.manifest["metrics"].items() if not isinstance(v, dict)}

    @property
    def popularity_metrics(self) -> dict[str, float]:
        return dict(self.manifest["metrics"]["popularity"])


def train_bundle(
    lake: Lake,
    params: TrainingParams,
    out_dir: Path,
    *,
    publisher: IndexPublisher | None = None,
    on_step: Progress | None = None,
    run: str | None = None,
) -> TrainOutcome:
    """Train from every weblogs partition in the lake; the bundle lands in ``out_dir``.

    With ``run``, the intermediate artifacts go to that run's own directory
    (``training/runs/<run>/``, as under Dagster), so concurrent calls cannot mix;
    without it, to the plain ``training/<asset>/`` keys.

    Raises :class:`~recsys_assets.training.data.TrainingDataError` when the window is
    empty or too small (before anything is written).
    """
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    run_id = run

    def run(name: str, fn: Callable[[], Any]) -> Any:
        if on_step is not None:
            on_step(name)
        started = time.perf_counter()
        with art.run_scope(lake, run_id, name) if run_id else nullcontext():
            value = fn()
        timings[name] = round(time.perf_counter() - started, 3)
        return value

    results[steps.INTERACTIONS] = run(
        steps.INTERACTIONS, lambda: steps.run_interactions(lake, params)
    )
    results[steps.ITEM_FEATURES] = run(
        steps.ITEM_FEATURES, lambda: steps.run_item_features(lake, params)
    )
    results[steps.USER_FEATURES] = run(
        steps.USER_FEATURES, lambda: steps.run_user_features(lake, params)
    )
    results[steps.RETRIEVAL] = run(steps.RETRIEVAL, lambda: steps.run_retrieval(lake, params))
    results[steps.CANDIDATE_INDEX] = run(
        steps.CANDIDATE_INDEX, lambda: steps.run_candidate_index(lake, publisher)
    )
    results[steps.RANKING_DATASET] = run(
        steps.RANKING_DATASET, lambda: steps.run_ranking_dataset(lake, params)
    )
    results[steps.RANKING_MODEL] = run(
        steps.RANKING_MODEL, lambda: steps.run_ranking_model(lake, params)
    )
    bundle, manifest = run(
        steps.RECOMMENDER, lambda: steps.run_recommender_model(lake, params, out_dir)
    )
    return TrainOutcome(bundle, manifest, results, timings)


__all__ = ["TrainOutcome", "train_bundle"]
