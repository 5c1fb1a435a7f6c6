"""The training configuration as a Dagster resource, wrapping ``Settings``' groups.

Every run records the parameters it used (the resource's config is visible in the
UI and the bundle manifest repeats them), and tests swap windows or sizes by
building the resource from their own ``Settings``. The resource declares no knob of
its own: ``parameters`` is ``settings.training`` (every ``TrainingParams`` field, after
``RECSYS_TRAIN_PARAMS``), ``promotion`` is ``settings.promotion``, both validated back
into their typed objects, whose declarations hold every default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, TypeAdapter

from recsys_assets.resources import GroupConfig, declared
from recsys_assets.training.params import TrainingParams
from recsys_serving.index.base import IndexPublisher
from recsys_serving.policies import PromotionRule
from recsys_serving.settings import Settings, StoreSettings

ES_API_KEY = "RECSYS_ES_API_KEY"


def _as_config(value: Any) -> dict[str, Any]:
    """A typed group as resource config (JSON types: tuples become lists)."""
    return TypeAdapter(type(value)).dump_python(value, mode="json")


class TrainingConfig(dg.ConfigurableResource):
    """Training parameters, promotion rule, candidate-index target, cache directory."""

    parameters: GroupConfig = Field(
        default_factory=lambda: _as_config(TrainingParams()),
        description="TrainingParams (RECSYS_SEED, RECSYS_TRAIN_WINDOW_DAYS, ..., "
        "RECSYS_TRAIN_PARAMS); fields left out take their declared defaults.",
    )
    promotion: GroupConfig = Field(
        default_factory=lambda: _as_config(PromotionRule()),
        description="PromotionRule (RECSYS_PROMOTION_*); fields left out take their defaults.",
    )
    index: GroupConfig = Field(
        default_factory=dict,
        description="Where the candidate index is published (RECSYS_ES_URL, "
        "RECSYS_ES_INDEX_PREFIX); unset: the index travels in the bundle.",
    )
    # Referenced as an EnvVar when it comes from the environment (see from_settings),
    # so the UI shows the variable's name, not the key.
    es_api_key: str | None = declared(StoreSettings, "es_api_key")
    cache_dir: str = Field(description="Scratch space of training runs (<home>/cache/training).")

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingConfig:
        key: Any = settings.stores.es_api_key
        if key and os.environ.get(ES_API_KEY) == key:
            key = dg.EnvVar(ES_API_KEY)
        return cls(
            parameters=_as_config(settings.training),
            promotion=_as_config(settings.promotion),
            index={
                "es_url": settings.stores.es_url,
                "es_index_prefix": settings.stores.es_index_prefix,
            },
            es_api_key=key,
            cache_dir=str(settings.resolved_home / "cache" / "training"),
        )

    def params(self) -> TrainingParams:
        return TrainingParams.create(**self.parameters)

    def rule(self) -> PromotionRule:
        return TypeAdapter(PromotionRule).validate_python(self.promotion)

    def publisher(self) -> IndexPublisher | None:
        from recsys_serving.index import open_publisher

        key = self.es_api_key
        if isinstance(key, dg.EnvVar):
            # Only Dagster resolves an EnvVar; a resource used directly (CLI) must too.
            key = key.get_value()
        return open_publisher(StoreSettings.model_validate({**self.index, "es_api_key": key}))

    def cache(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def describe(self) -> dict[str, Any]:
        return self.params().as_dict()
