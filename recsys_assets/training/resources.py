"""The training configuration as a Dagster resource, built from ``Settings``.

Every run records the parameters it used (the resource's config is visible in the
UI and the bundle manifest repeats them), and tests swap windows or sizes by
building the resource from their own ``Settings``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.training.params import TrainingParams
from recsys_serving.index.base import IndexPublisher
from recsys_serving.registry import PromotionRule
from recsys_serving.settings import Settings


class TrainingConfig(dg.ConfigurableResource):
    """Training window, seed, threads, parameter overrides, promotion rule, index target."""

    train_window_days: float | None = None
    holdout_days: float = 1.0
    label_days: float = 1.0
    seed: int = 42
    threads: int = 0
    interaction_half_life_days: float | None = None
    candidate_pool: int = 200
    eval_k: int = 10
    train_params_json: str = "{}"
    promotion_metric: str = "ndcg@10"
    promotion_min_lift: float = 0.01
    promotion_guardrails_json: str = "{}"
    es_url: str | None = None
    es_index_prefix: str = "recsys-items"
    cache_dir: str = ".recsys/cache/training"

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingConfig:
        return cls(
            train_window_days=settings.train_window_days,
            holdout_days=settings.holdout_days,
            label_days=settings.label_days,
            seed=settings.seed,
            threads=settings.threads,
            interaction_half_life_days=settings.interaction_half_life_days,
            candidate_pool=settings.candidate_pool,
            eval_k=settings.eval_k,
            train_params_json=json.dumps(settings.train_params, sort_keys=True),
            promotion_metric=settings.promotion_metric,
            promotion_min_lift=settings.promotion_min_lift,
            promotion_guardrails_json=json.dumps(settings.promotion_guardrails, sort_keys=True),
            es_url=settings.es_url,
            es_index_prefix=settings.es_index_prefix,
            cache_dir=str(settings.resolved_home / "cache" / "training"),
        )

    def settings(self) -> Settings:
        """A ``Settings`` carrying this resource's values (the rest from the environment)."""
        return Settings().model_copy(
            update={
                "train_window_days": self.train_window_days,
                "holdout_days": self.holdout_days,
                "label_days": self.label_days,
                "seed": self.seed,
                "threads": self.threads,
                "interaction_half_life_days": self.interaction_half_life_days,
                "candidate_pool": self.candidate_pool,
                "eval_k": self.eval_k,
                "train_params": json.loads(self.train_params_json),
                "promotion_metric": self.promotion_metric,
                "promotion_min_lift": self.promotion_min_lift,
                "promotion_guardrails": json.loads(self.promotion_guardrails_json),
                "es_url": self.es_url,
                "es_index_prefix": self.es_index_prefix,
            }
        )

    def params(self) -> TrainingParams:
        return TrainingParams.from_settings(self.settings())

    def rule(self) -> PromotionRule:
        return PromotionRule.from_settings(self.settings())

    def publisher(self) -> IndexPublisher | None:
        from recsys_serving.index import open_publisher

        return open_publisher(self.settings())

    def cache(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def describe(self) -> dict[str, Any]:
        return self.params().as_dict()
