"""The training graph under Dagster: lineage, metadata, checks, registration, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from model_support import TinyWorld, build_tiny_world

from recsys_assets.definitions import build_resources, make_definitions
from recsys_assets.training import steps
from recsys_assets.training.assets import TRAINING_ASSETS
from recsys_assets.training.jobs import RETRAIN_TAGS
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.model.recommender import Recommender
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings

SMALL = {
    "als_factors": 16,
    "als_iterations": 8,
    "lgb_rounds": 60,
    "lgb_min_data_in_leaf": 20,
    "eval_max_users": 300,
}


def graph_settings(home: Path, seed: int = 0) -> Settings:
    return Settings(
        home=home,
        holdout_days=0.5,
        label_days=0.75,
        seed=seed,
        threads=1,
        candidate_pool=100,
        train_params=SMALL,
    )


def materialize(settings: Settings, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        TRAINING_ASSETS,
        resources=build_resources(settings),
        instance=instance,
        tags=RETRAIN_TAGS,
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    mats = result.asset_materializations_for_node(asset)
    assert mats, f"{asset} was not materialized"
    return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("graph-world"))


@pytest.mark.slow
def test_retrain_graph_registers_a_first_then_a_second_model(world: TinyWorld) -> None:
    settings = graph_settings(world.settings.lake.home)
    registry = ModelRegistry(world.lake)
    with dg.instance_for_test() as instance:
        first = materialize(settings, instance)
        assert first.success
        expected = {a.key.to_user_string() for a in TRAINING_ASSETS}
        done = {
            e.asset_key.to_user_string()
            for e in first.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
        }
        assert done == expected
        checks = {
            e.event_specific_data.check_name: e.event_specific_data.passed
            for e in first.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        assert checks == {
            "item_features_finite": True,
            "user_features_finite": True,
            "ranking_features_finite": True,
        }
        evaluation = metadata(first, "model_evaluation")
        assert evaluation["decision"] == "first_model"
        assert evaluation["production_version"] is None
        metrics = json.loads(json.dumps(evaluation["metrics"]))
        assert set(metrics) == {"challenger", "production", "popularity"}
        assert metrics["production"] is None
        for model in ("challenger", "popularity"):
            for name in ("ndcg@10", "recall@10", "hit_rate@10", "map@10", "coverage@10"):
                assert 0.0 <= metrics[model][name] <= 1.0
        assert "| challenger |" in evaluation["comparison"]
        assert evaluation["chart"].startswith("![metrics](data:image/png;base64,")
        registered = metadata(first, "registered_model")
        assert registered["registered_as"] == PRODUCTION
        assert registered["decision"] == "first_model"
        version = registered["version"]
        assert evaluation["challenger_version"] == version
        assert registry.alias(PRODUCTION).version == version
        interactions = metadata(first, "interactions")
        assert interactions["dagster/row_count"] > 1000
        assert interactions["partitions"] == len(world.days)

        model = Recommender.load(registry.fetch(version, world.root / "fetched"))
        assert model.manifest["data"]["partitions"] == world.days
        user = next(u for u in model.state.user_ids.tolist() if model.knows_user(u))
        assert len(model.recommend(user, 10)) == 10

        second = materialize(settings, instance)
        assert second.success
        evaluation2 = metadata(second, "model_evaluation")
        assert evaluation2["production_version"] == version
        assert evaluation2["decision"] in {"promote", "reject"}
        metrics2 = json.loads(json.dumps(evaluation2["metrics"]))
        assert metrics2["production"]["users"] == metrics2["challenger"]["users"]
        registered2 = metadata(second, "registered_model")
        assert registered2["registered_as"] == "registered"
        assert registered2["version"] != version
        # Later promotions belong to the closed loop: production did not move.
        assert registry.alias(PRODUCTION).version == version
        assert set(registry.version_ids()) == {version, registered2["version"]}


@pytest.mark.slow
def test_nan_in_ranking_features_blocks_training(
    world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = graph_settings(world.settings.lake.home)
    real = steps.build_ranking_dataset

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        dataset = real(*args, **kwargs)
        dataset.features[3, 5] = np.nan
        return dataset

    monkeypatch.setattr(steps, "build_ranking_dataset", poisoned)
    before = set(ModelRegistry(world.lake).version_ids())
    with dg.instance_for_test() as instance:
        result = materialize(settings, instance)
    assert not result.success
    checks = {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["ranking_features_finite"].passed is False
    assert not result.asset_materializations_for_node("ranking_model")
    assert not result.asset_materializations_for_node("registered_model")
    assert set(ModelRegistry(world.lake).version_ids()) == before


def test_an_empty_lake_fails_clearly_and_registers_nothing(tmp_path: Path) -> None:
    settings = graph_settings(tmp_path / "home")
    lake = LocalLake(settings.resolved_lake_uri)
    with dg.instance_for_test() as instance:
        result = materialize(settings, instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "no interactions in the training window" in message
    assert "recsys ingest" in message
    assert ModelRegistry(lake).version_ids() == []
    assert ModelRegistry(lake).alias(PRODUCTION) is None


def test_retrain_job_is_defined_with_its_tag_and_without_weblogs(tmp_path: Path) -> None:
    defs = make_definitions(graph_settings(tmp_path / "home"))
    job = defs.resolve_job_def("retrain_job")
    assert job.tags["recsys/pipeline"] == "retrain"
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert "weblogs" not in keys
    assert {"item_catalog", "user_profiles", "interactions", "registered_model"} <= keys
    graph = defs.resolve_asset_graph()
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
        for k in graph.get_all_asset_keys()
    }
    assert {"weblogs", "item_catalog", "user_profiles"} <= parents["interactions"]
    assert parents["registered_model"] == {"model_evaluation"}
    assert parents["model_evaluation"] == {"recommender_model"}
