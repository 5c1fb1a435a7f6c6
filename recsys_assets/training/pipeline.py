"""The whole training run as one plain call: lake data in, a verified bundle out.

:func:`train_bundle` runs the steps of the training table
(:data:`recsys_assets.training.graph.STEPS`) that the bundle needs, in the table's
order, in this process: the same step functions the Dagster assets run, each handed
the records of the steps it reads, persisting its artifacts in the lake exactly as a
materialization does. Use it for tests, benchmarks and scripts that want a model
without an orchestrator::

    outcome = train_bundle(lake, settings.training, out_dir)
    model = Recommender.load(outcome.bundle_path)

Evaluation against production and registration (``model_evaluation``,
``registered_model``) come after the bundle: see :func:`steps.run_model_evaluation`
(handed ``outcome.bundle.version``) and :func:`steps.run_registration`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_assets.training import artifacts as art
from recsys_assets.training import graph
from recsys_assets.training.names import RECOMMENDER
from recsys_assets.training.outputs import Bundle, Record
from recsys_assets.training.params import TrainingParams
from recsys_serving.index.base import IndexPublisher
from recsys_serving.lake import Lake

Progress = Callable[[str], None]


@dataclass
class TrainOutcome:
    bundle: Bundle
    steps: dict[str, Record] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bundle_path(self) -> Path:
        return self.bundle.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.bundle.manifest

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
    env = graph.StepEnv(lake=lake, params=params, staging=out_dir, publisher=lambda: publisher)
    records: dict[str, Record] = {}
    timings: dict[str, float] = {}
    for step in graph.until(RECOMMENDER):
        if on_step is not None:
            on_step(step.name)
        started = time.perf_counter()
        with art.run_scope(lake, run, step.name) if run else nullcontext():
            records[step.name] = graph.execute(step, env, records)
        timings[step.name] = round(time.perf_counter() - started, 3)
    bundle = records[RECOMMENDER]
    if not isinstance(bundle, Bundle):
        raise TypeError(f"{RECOMMENDER} returned {type(bundle).__name__}, not a Bundle")
    return TrainOutcome(bundle, records, timings)


__all__ = ["TrainOutcome", "train_bundle"]
