"""The candidate index built by training: what the bundle carries and what is published."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from model_support import TinyWorld, tiny_params, tiny_world
from monitoring_support import register_model

from recsys_assets.training.pipeline import train_bundle
from recsys_assets.training.retention import index_versions_to_keep
from recsys_serving.index import EmbeddedIndex
from recsys_serving.index.base import CandidateQuery, IndexArtifact
from recsys_serving.lake import LocalLake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.model.recommender import INDEX_DIR, Recommender
from recsys_serving.registry import ModelRegistry

__all__ = ["tiny_world"]  # fixture


class RecordingPublisher:
    """Stands in for Elasticsearch: keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.published: list[IndexArtifact] = []
        self.kept: list[list[str]] = []

    def publish(self, artifact: IndexArtifact) -> str:
        self.published.append(artifact)
        return f"recsys-items-{artifact.version}"

    def prune(self, keep_versions: Iterable[str]) -> list[str]:
        kept = list(keep_versions)
        self.kept.append(kept)
        return [f"recsys-items-{a.version}" for a in self.published if a.version not in kept]


def test_the_published_index_is_the_one_in_the_bundle(tiny_world: TinyWorld) -> None:
    publisher = RecordingPublisher()
    outcome = train_bundle(
        tiny_world.lake,
        tiny_params(0, tiny_world.settings),
        tiny_world.root / "indexed",
        publisher=publisher,
    )
    assert len(publisher.published) == 1
    published = publisher.published[0]
    # Retention runs after each publish and never drops the index just built.
    assert len(publisher.kept) == 1 and publisher.kept[0][0] == published.version
    index_result = outcome.steps["candidate_index"]
    assert index_result.published == f"recsys-items-{published.version}"
    assert outcome.manifest["index_version"] == published.version

    bundled = IndexArtifact.load(outcome.bundle_path / INDEX_DIR)
    assert bundled.version == published.version
    assert bundled.item_ids == published.item_ids
    np.testing.assert_array_equal(bundled.vectors, published.vectors)
    assert bundled.categories == published.categories
    meta = json.loads((outcome.bundle_path / INDEX_DIR / "index.json").read_text())
    assert meta["items"] == len(published.item_ids)

    # The artifact's vectors are the served model's item factors, so ALS retrieval
    # through the index agrees with the model's own embedded retrieval.
    model = Recommender.load(outcome.bundle_path)
    np.testing.assert_array_equal(model.state.item_factors, bundled.vectors)
    user = next(u for u in model.state.user_ids.tolist() if model.knows_user(u))
    row = model.state.user_row(user)
    vector = model.state.user_factors[row]
    index = EmbeddedIndex(bundled)
    hits = index.search(CandidateQuery(k=5, vector=vector, exclude=model.seen(user)))
    scores = model.state.item_factors @ vector
    for hit in hits:
        assert hit.score == np.float32(scores[model.state.item_index[hit.item_id]])
    # Every catalogue item is in the index, with its categories.
    assert set(bundled.item_ids) >= {f"i{n:05d}" for n in range(tiny_world.summary.n_items)}
    assert all(cats for cats in bundled.categories)


def test_retention_keeps_the_new_index_the_candidate_and_three_productions(
    tmp_path: Path,
) -> None:
    registry = ModelRegistry(LocalLake(tmp_path / "lake"))
    versions = [register_model(registry, tmp_path, f"v{n}") for n in range(1, 7)]
    for version in versions[:4]:  # v1 -> v2 -> v3 -> v4 in production, in turn
        registry.set_alias(PRODUCTION, version, reason="test")
    registry.set_alias(CANDIDATE, versions[4], share=0.1, reason="test canary")
    keep = index_versions_to_keep(registry, "v-new")
    assert keep == ["v-new", versions[4], versions[3], versions[2], versions[1]]
    assert versions[0] not in keep and versions[5] not in keep  # old, never served
