"""What each training step returns: frozen, typed records.

A step's large artifacts (arrays, tables, the bundle) go to the lake; its record says
what it made and carries the figures the UI shows. The record is also what the next
step is handed: ``train_bundle`` passes it in memory, and a step running in another
process (a Dagster step, ``bench/train.py``) reads it back from its run's directory
(:func:`recsys_assets.training.graph.load_output`), so versions travel explicitly
from the step that made them to the step that uses them.

Figures whose shape belongs to another module (the window, per-snapshot fit stats,
metric tables) stay plain JSON mappings inside the record.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np


def finite_json(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class Record:
    """JSON round trip shared by the step outputs (``Path`` fields travel as text)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> dict[str, Any]:
        return finite_json(
            {k: str(v) if isinstance(v, Path) else v for k, v in self.as_dict().items()}
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            if f.type in ("Path", Path) and value is not None:
                value = Path(value)
            elif value is None and f.type == "float":
                value = math.nan  # finite_json wrote NaN as null
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Interactions(Record):
    """The training window, its data statistics and the parameters it was cut with."""

    bounds: dict[str, Any]
    window: dict[str, Any]
    data: dict[str, Any]
    params: dict[str, Any]
    bytes: int


@dataclass(frozen=True, slots=True)
class ItemFeatures(Record):
    items: int
    with_history: int
    horizons: dict[str, Any]
    table: str  # the served snapshot's column statistics (markdown)
    non_finite: dict[str, dict[str, int]]  # per snapshot: column -> count


@dataclass(frozen=True, slots=True)
class UserFeatures(Record):
    users: int
    users_with_history: int
    table: str
    non_finite: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class Retrieval(Record):
    """Per snapshot: ALS fit, co-visitation and EASE statistics; the two selections."""

    als: dict[str, Any]
    covisit: dict[str, Any]
    ease: dict[str, Any]
    als_selection: dict[str, Any]
    ease_selection: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CandidateIndex(Record):
    index_version: str
    items: int
    dim: int
    published: str  # where the index lives: embedded in the bundle, or its ES index
    kept_indices: list[str] | None = None  # Elasticsearch retention, when published
    pruned_indices: list[str] | None = None


@dataclass(frozen=True, slots=True)
class RankingDatasetStats(Record):
    rows: int
    users: int
    users_in_label_window: int
    cold_users: int
    positive_rows: int
    positives_found: int
    positives_total: int
    candidate_recall: float
    seconds: float
    cutoffs: int
    lastout: dict[str, Any]
    non_finite: dict[str, int]


@dataclass(frozen=True, slots=True)
class RankingModel(Record):
    best_iteration: int
    valid_ndcg: float
    train_ndcg: float
    seconds: float
    rows: int
    groups: int
    feature_importance: dict[str, float]
    ranking: dict[str, Any]  # the ranker gate: mode ("ranker" or "blend"), blend, reason
    curves: dict[str, Any]  # NDCG@K per round (MLflow's learning curve)


@dataclass(frozen=True, slots=True)
class Bundle(Record):
    """The bundle ``recommender_model`` wrote: its version (what the evaluation and the
    registration are handed), where it was staged, and its manifest."""

    version: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Evaluation(Record):
    """The challenger (``challenger_version``) against production and popularity, and
    the verdict (:mod:`recsys_assets.training.verdict`)."""

    challenger_version: str
    production_version: str | None
    production_answers: str | None
    decision: str
    decision_reason: str
    evidence: dict[str, Any]
    first_model_rule: dict[str, Any]
    metrics: dict[str, Any]
    per_user: dict[str, Any] | None
    holdout: dict[str, Any]
    k: int
    table: str


@dataclass(frozen=True, slots=True)
class Registration(Record):
    version: str
    registered_as: str
    decision: str
    decision_reason: str
    uri: str
