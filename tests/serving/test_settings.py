"""One declaration per setting: flat RECSYS_* names, nested groups, no second default."""

from __future__ import annotations

import dataclasses
import inspect
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from recsys_assets.definitions import build_resources
from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.resources import SETTING
from recsys_assets.training.resources import TrainingConfig
from recsys_serving.policies import CanaryPolicy, DropPolicy, PromotionRule
from recsys_serving.settings import Settings, setting_fields
from recsys_serving.training_params import TrainingParams

# Resource fields with a literal default that is not a setting (a constant of the code).
NOT_SETTINGS = {("NotifierResource", "timeout_seconds")}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("RECSYS_"):
            monkeypatch.delenv(key)


def test_flat_environment_names_reach_the_nested_groups(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", "/srv/recsys")
    monkeypatch.setenv("RECSYS_SEED", "7")
    monkeypatch.setenv("RECSYS_CTR_ALPHA", "0.2")
    monkeypatch.setenv("recsys_canary_ramp", "[0.2, 1.0]")  # case-insensitive, JSON
    monkeypatch.setenv("RECSYS_PROMOTION_GUARDRAILS", '{"recall@10": 0.1}')
    monkeypatch.setenv("RECSYS_TRAIN_PARAMS", '{"als_factors": 96, "threads": 3}')
    monkeypatch.setenv("RECSYS_THREADS", "2")
    monkeypatch.setenv("RECSYS_API_KEYS", '{"k": ["recommend"]}')
    settings = Settings(label_days=0.5)
    assert settings.lake.home == Path("/srv/recsys")
    assert settings.closed_loop.drop.alpha == 0.2
    assert settings.closed_loop.canary.ramp == (0.2, 1.0)
    assert settings.promotion.guardrails == {"recall@10": 0.1}
    assert settings.serving.api_keys == {"k": ["recommend"]}
    training = settings.training
    assert (training.seed, training.label_days, training.als_factors) == (7, 0.5, 96)
    assert training.threads == 3  # RECSYS_TRAIN_PARAMS wins, as it always did
    assert settings.replace(seed=8, mongo_db="x").training.seed == 8
    assert settings.replace(seed=8, mongo_db="x").stores.mongo_db == "x"


def test_typos_and_invalid_values_are_refused(clean_env: None) -> None:
    with pytest.raises(ValueError, match="als_factorz"):
        Settings(train_params={"als_factorz": 1})
    with pytest.raises(ValueError, match="increase strictly"):
        Settings(canary_ramp=[0.5, 0.2])
    with pytest.raises(ValueError, match="holdout_days"):
        Settings(holdout_days=0)
    with pytest.raises(ValueError, match="typo"):
        Settings(stores={"typo": 1})


def test_every_variable_is_declared_once_with_a_description() -> None:
    fields = setting_fields()
    assert len({f.name for f in fields}) == len(fields)
    assert all(f.description for f in fields)
    names = {f.env for f in fields}
    # The documented names of the typed policies' knobs.
    assert {"RECSYS_SEED", "RECSYS_CTR_ALPHA", "RECSYS_CANARY_RAMP"} <= names
    assert {"RECSYS_PROMOTION_FIRST_MODEL_GATE", "RECSYS_TRAIN_PARAMS"} <= names


def test_the_policies_hold_the_defaults_the_settings_and_resources_use(
    clean_env: None, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path)
    assert settings.training == TrainingParams()
    assert settings.promotion == PromotionRule()
    assert settings.closed_loop.drop == DropPolicy()
    assert settings.closed_loop.canary == CanaryPolicy()
    for loop in (ClosedLoopConfig(), ClosedLoopConfig.from_settings(settings)):
        assert loop.drop_policy() == DropPolicy()
        assert loop.canary_policy() == CanaryPolicy()
        assert loop.cooldown.total_seconds() == 60 * settings.closed_loop.retrain_cooldown_minutes
        assert loop.landing_segment_max_age_seconds == (
            settings.collector.landing_segment_max_age_seconds
        )
    for training in (
        TrainingConfig(cache_dir=str(tmp_path)),
        TrainingConfig.from_settings(settings),
    ):
        assert training.params() == TrainingParams()
        assert training.rule() == PromotionRule()
        assert training.publisher() is None


def test_resources_declare_no_knob_of_their_own(tmp_path: Path) -> None:
    """A second default fails here: a resource field either has no default, defaults to
    unset, or is ``declared()`` from the setting it shows (and then equals its default).
    The wrapping resources declare no field that copies a policy's or a setting's."""
    declared_defaults = {
        f"{type(group).__name__}.{name}": getattr(group, name)
        for group in _groups(Settings.model_construct())
        for name in type(group).model_fields
    }
    for resource in build_resources(Settings(home=tmp_path)).values():
        cls = type(resource)
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if SETTING in extra:
                assert info.default == declared_defaults[str(extra[SETTING])], (cls, name)
            elif info.default not in (None, PydanticUndefined):
                assert (cls.__name__, name) in NOT_SETTINGS, (
                    f"{cls.__name__}.{name} copies a default"
                )
    knob_names = {f.name for f in setting_fields()} | {
        f.name
        for policy in (DropPolicy, CanaryPolicy, PromotionRule, TrainingParams)
        for f in dataclasses.fields(policy)
    }
    for wrapper in (ClosedLoopConfig, TrainingConfig):
        own = {
            name
            for name, info in wrapper.model_fields.items()
            if not (isinstance(info.json_schema_extra, dict) and SETTING in info.json_schema_extra)
        }
        assert not own & knob_names, wrapper


def _groups(model: BaseModel) -> list[BaseModel]:
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            out += [value, *_groups(value)]
    return out


def test_code_defaults_refer_to_the_declarations(clean_env: None, tmp_path: Path) -> None:
    """Defaults needed without a Settings (limits, rules, fallbacks) equal the settings'."""
    from recsys_assets.weblogs.processing import Rules
    from recsys_serving.events.schema import Limits
    from recsys_serving.landing import SegmentWriter
    from recsys_serving.model.candidates import DEFAULT_POOL

    settings = Settings(home=tmp_path)
    assert Limits(now=1.0) == Limits.from_settings(settings, now=1.0)
    rules = Rules(catalog_epoch=settings.events.catalog_epoch, now=datetime.now(UTC))
    assert rules.future_tolerance_seconds == settings.events.future_tolerance_seconds
    assert rules.bot_max_events_per_minute == settings.events.bot_max_events_per_minute
    assert rules.session_gap_minutes == settings.events.session_gap_minutes
    writer = inspect.signature(SegmentWriter).parameters
    assert writer["max_bytes"].default == settings.collector.landing_segment_max_bytes
    assert writer["max_age_seconds"].default == settings.collector.landing_segment_max_age_seconds
    assert settings.training.candidate_pool == DEFAULT_POOL
