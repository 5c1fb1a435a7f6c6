"""The candidate index built by training: what the bundle carries and what is published."""

from __future__ import annotations

import json

import numpy as np
from model_support import TinyWorld, tiny_params, tiny_world

from recsys_assets.training.pipeline import train_bundle
from recsys_serving.index import EmbeddedIndex
from recsys_serving.index.base import CandidateQuery, IndexArtifact
from recsys_serving.model.recommender import INDEX_DIR, Recommender

__all__ = ["tiny_world"]  # fixture


class RecordingPublisher:
    """Stands in for Elasticsearch: keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.published: list[IndexArtifact] = []

    def publish(self, artifact: IndexArtifact) -> str:
        self.published.append(artifact)
        return f"recsys-items-{artifact.version}"

    def prune(self, keep: int = 3) -> list[str]:
        return []


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
    index_result = outcome.steps["candidate_index"]
    assert index_result["published"] == f"recsys-items-{published.version}"
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
