"""model_evaluation and registration as plain steps: production as served, odd productions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from model_support import build_tiny_world, tiny_params

from recsys_assets.training import handover, steps
from recsys_assets.training.pipeline import train_bundle
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.model.bundle import MANIFEST, BundleWriter, read_manifest
from recsys_serving.registry import ModelRegistry, PromotionRule


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    world = build_tiny_world(tmp_path_factory.mktemp("eval-world"))
    params = tiny_params(0, world.settings)
    outcome = train_bundle(world.lake, params, world.root / "bundles")
    return world, params, outcome


def _foreign_copy(bundle: Path, target: Path) -> Path:
    """The same model files under a new version whose manifest names other features
    (what a bundle trained by an older recsys looks like to this code)."""
    manifest = read_manifest(bundle)
    with BundleWriter(target / "foreign") as writer:
        for name in manifest["files"]:
            dest = writer.path / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / name, dest)
        writer.manifest.update(
            {k: v for k, v in manifest.items() if k not in ("files", "version", "format")}
        )
        writer.manifest["feature_names"] = ["an_old_feature"]
    return target / "foreign"


def test_first_model_then_comparison_with_production_as_served(trained, tmp_path: Path) -> None:
    world, params, outcome = trained
    rule = PromotionRule(metric="ndcg@10", min_lift=0.0, guardrails={})
    first = steps.run_model_evaluation(
        world.lake, params, rule, tmp_path / "cache", outcome.bundle.version
    )
    assert first.decision == "first_model"
    assert first.production_version is None
    assert first.metrics["production"] is None
    assert first.metrics["challenger"]["ndcg@10"] == outcome.metrics["ndcg@10"]
    registered = steps.run_registration(world.lake, tmp_path / "cache", first)
    assert registered.registered_as == PRODUCTION
    registry = ModelRegistry(world.lake)
    assert registry.alias(PRODUCTION).version == outcome.manifest["version"]

    # The same bundle evaluated again: production is itself, so nothing to compare.
    again = steps.run_model_evaluation(
        world.lake, params, rule, tmp_path / "cache", outcome.bundle.version
    )
    assert again.production_version == outcome.manifest["version"]
    assert again.metrics["production"] is None

    # A second model: production is scored as served on the same holdout users.
    second = train_bundle(world.lake, params, world.root / "bundles")
    result = steps.run_model_evaluation(
        world.lake, params, rule, tmp_path / "cache", second.bundle.version
    )
    assert result.challenger_version == second.manifest["version"]
    assert result.production_version == outcome.manifest["version"]
    production = result.metrics["production"]
    assert production["users"] == result.metrics["challenger"]["users"]
    assert result.decision in {"promote", "reject"}
    assert "ndcg@10" in result.decision_reason
    assert "| production |" in result.table
    done = steps.run_registration(world.lake, tmp_path / "cache", result)
    assert done.registered_as == "registered"
    assert registry.alias(PRODUCTION).version == outcome.manifest["version"]


def test_an_unloadable_production_is_no_bar_to_clear(trained, tmp_path: Path) -> None:
    world, params, outcome = trained
    registry = ModelRegistry(world.lake)
    foreign = _foreign_copy(outcome.bundle_path, tmp_path)
    registered = registry.register(foreign)
    assert registered.version == read_manifest(foreign)["version"]
    registry.promote(registered.version, reason="test: an old model in production")
    newest = train_bundle(world.lake, params, world.root / "bundles")
    rule = PromotionRule(metric="ndcg@10", min_lift=0.01, guardrails={})
    result = steps.run_model_evaluation(
        world.lake, params, rule, tmp_path / "cache", newest.bundle.version
    )
    assert result.production_version == registered.version
    assert result.decision == "promote"
    assert "cannot be evaluated" in result.decision_reason
    assert "features" in result.decision_reason
    assert (foreign / MANIFEST).exists()


def test_old_training_bundles_are_pruned(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    staging = tmp_path / "staging"
    versions = [f"v2024010100000{n}-0000000{n}" for n in range(5)]
    for version in versions:
        lake.put_bytes(f"training/recommender_model/bundles/{version}/manifest.json", b"{}")
        lake.put_bytes(f"training/recommender_model/bundles/{version}/state/a.npz", b"x")
        (staging / version).mkdir(parents=True)
    assert handover.prune_bundles(lake, staging, keep=3) == versions[:2]
    left = {o.key.split("/")[3] for o in lake.list("training/recommender_model/bundles/")}
    assert left == set(versions[2:])
    assert sorted(p.name for p in staging.iterdir()) == versions[2:]
    # A caller's own directory is left alone.
    assert handover.prune_bundles(lake, None, keep=1) == versions[2:4]
    assert sorted(p.name for p in staging.iterdir()) == versions[2:]
