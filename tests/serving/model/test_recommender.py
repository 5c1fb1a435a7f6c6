"""The runtime Recommender on a real bundle trained from a tiny simulated world."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training.data import (
    build_interactions,
    build_vocabulary,
    encode,
    read_catalog,
    read_weblogs,
)
from recsys_assets.training.retrieval import fit_als
from recsys_assets.training.snapshot import build_state
from recsys_serving.index.base import Candidate, CandidateQuery
from recsys_serving.model.bundle import BundleError, verify_bundle
from recsys_serving.model.context import user_context
from recsys_serving.model.features import FEATURE_NAMES, assemble_features
from recsys_serving.model.recommender import Recommender, ScoredItem

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


def known_users(model: Recommender) -> list[str]:
    return [u for u in model.state.user_ids.tolist() if model.knows_user(u)]


def test_load_exposes_version_and_manifest(model: Recommender, tiny_bundle: Path) -> None:
    manifest = verify_bundle(tiny_bundle)
    assert model.version == manifest["version"] == tiny_bundle.name
    assert model.manifest["feature_names"] == list(FEATURE_NAMES)
    for key in ("created_at", "code_sha", "seed", "params", "data", "window", "metrics"):
        assert key in model.manifest, key
    index_meta = json.loads((tiny_bundle / "index" / "index.json").read_text())
    assert model.manifest["index_version"] == index_meta["version"]
    assert model.manifest["data"]["partitions"]
    # The holdout evaluation scored this model on real users: lists that never hit
    # (ids mismatched between the lists and the holdout, nobody evaluated) give 0.
    metrics = model.manifest["metrics"]
    assert metrics == manifest["metrics"]
    assert metrics["users"] == metrics["holdout"]["users_evaluated"] > 0
    assert 0 < metrics["ndcg@10"] <= metrics["hit_rate@10"] <= 1
    assert 0 < metrics["map@10"] <= metrics["hit_rate@10"]
    assert 0 < metrics["recall@10"] <= 1


def test_recommend_excludes_seen_items_and_explains_itself(model: Recommender) -> None:
    users = known_users(model)
    assert len(users) > 100
    for user in users[:50]:
        recs = model.recommend(user, 10)
        assert len(recs) == 10
        ids = [r.item_id for r in recs]
        assert len(set(ids)) == 10
        assert not set(ids) & model.seen(user)
        assert all(isinstance(r, ScoredItem) and r.reason for r in recs)
        scores = [r.score for r in recs]
        assert scores == sorted(scores, reverse=True)
    reasons = {r.reason.split(" with ")[0] for u in users[:50] for r in model.recommend(u, 10)}
    assert {"als", "co-visited"} <= reasons


def test_unknown_user_gets_a_category_diverse_cold_start_list(model: Recommender) -> None:
    assert not model.knows_user("never-seen-user")
    assert model.seen("never-seen-user") == frozenset()
    recs = model.recommend("never-seen-user", 10)
    assert len(recs) == 10
    state = model.state
    primaries = {int(state.item_categories.row(state.item_index[r.item_id])[0][0]) for r in recs}
    assert len(primaries) >= 3
    # Stated interests in a user document steer the cold-start list.
    cat = str(state.categories[0])
    doc_recs = model.recommend("never-seen-user", 10, user_doc={"interests": [cat]})
    in_cat = [
        r
        for r in doc_recs
        if cat in state.categories[state.item_categories.row(state.item_index[r.item_id])[0]]
    ]
    assert len(in_cat) >= 3


def test_category_and_exclude_filters(model: Recommender) -> None:
    user = known_users(model)[3]
    state = model.state
    cat = str(state.categories[1])
    recs = model.recommend(user, 10, categories=[cat])
    assert recs
    for r in recs:
        cats = state.categories[state.item_categories.row(state.item_index[r.item_id])[0]]
        assert cat in cats.tolist()
    first = model.recommend(user, 10)
    banned = frozenset(r.item_id for r in first[:5])
    again = model.recommend(user, 10, exclude=banned)
    assert not banned & {r.item_id for r in again}
    assert model.recommend(user, 10, categories=["no-such-category"]) == []


def test_new_items_without_interactions_can_be_recommended(model: Recommender) -> None:
    """A just-published item nobody has seen reaches the ranker through its content."""
    state = model.state
    untouched = (state.item_column("has_history") == 0) & (
        state.item_column("log_impressions") == 0
    )
    fresh = [int(r) for r in state.fresh.tolist() if untouched[r]]
    assert fresh, "the tiny world publishes items right before the end of its window"
    row = fresh[0]
    item = str(state.item_ids[row])
    assert np.any(state.item_factors[row]), "a cold item gets a content (category) vector"
    cats = state.categories[state.item_categories.row(row)[0]].tolist()
    fans = [
        u
        for u in known_users(model)
        if item not in model.seen(u)
        and user_context(state, u).top_categories(1).size
        and str(state.categories[user_context(state, u).top_categories(1)[0]]) in cats
    ]
    assert fans
    recs = model.recommend(fans[0], 100)
    assert item in {r.item_id for r in recs}
    assert next(r for r in recs if r.item_id == item).reason == "new item"
    # Narrowed to its category with the established items excluded, it is the answer.
    others = frozenset(
        str(state.item_ids[r]) for r in state.category_popular.row(state.category_index[cats[0]])[0]
    ) - {item}
    top = model.recommend("a-new-user", 1, categories=[cats[0]], exclude=others)
    assert [r.item_id for r in top] == [item]


def test_similar_and_popular(model: Recommender) -> None:
    item = str(model.state.item_ids[model.state.popular[0]])
    sims = model.similar(item, 5)
    assert len(sims) == 5 and item not in {s.item_id for s in sims}
    assert [s.score for s in sims] == sorted((s.score for s in sims), reverse=True)
    assert all(s.reason.endswith(item) for s in sims)
    assert len(model.similar(item, 50)) == 50  # neighbours, then the ALS fill-in
    with pytest.raises(KeyError):
        model.similar("no-such-item", 5)
    popular = model.popular(5)
    assert [p.item_id for p in popular] == [
        str(model.state.item_ids[r]) for r in model.state.popular[:5]
    ]
    skip = frozenset({popular[0].item_id})
    assert popular[0].item_id not in {p.item_id for p in model.popular(5, exclude=skip)}


def test_an_external_index_replaces_als_retrieval(model: Recommender) -> None:
    user = known_users(model)[7]
    calls: list[CandidateQuery] = []
    pick = [str(i) for i in model.state.item_ids[model.state.popular[-5:]].tolist()]

    class FakeIndex:
        version = "fake"

        def search(self, query: CandidateQuery) -> list[Candidate]:
            calls.append(query)
            return [Candidate(i, 1.0, "knn") for i in pick]

        def popular(self, query: CandidateQuery) -> list[Candidate]:
            return []

        def similar(self, item_id: str, k: int, exclude: frozenset[str] = frozenset()):
            return [Candidate("i00001", 0.5, "similar")]

        def ping(self) -> bool:
            return True

    recs = model.recommend(user, 100, index=FakeIndex())
    assert calls and calls[0].vector is not None
    assert model.seen(user) <= calls[0].exclude
    als = {r.item_id for r in recs if r.reason == "als"}
    assert als <= set(pick)
    sims = model.similar("i00003", 3, index=FakeIndex())
    assert sims == [ScoredItem("i00001", 0.5, "similar to i00003")]


def test_served_score_equals_offline_score(model: Recommender, tiny_world: TinyWorld) -> None:
    """Recompute the served state from the interactions with the training code (ALS
    refitted, features rebuilt) and score the served items offline: same numbers."""
    params = tiny_params(0, tiny_world.settings)
    # From the processed weblogs and the catalogue, in memory (other tests may train
    # on this lake with other settings; nothing here reads their artifacts).
    interactions = build_interactions(read_weblogs(tiny_world.lake), params)
    vocab = build_vocabulary(interactions, read_catalog(tiny_world.lake)[0])
    enc = encode(interactions, vocab)
    end = interactions.window.end
    assert end == model.state.as_of
    als = fit_als(enc, vocab, end, params)
    offline_state = build_state(
        enc,
        vocab,
        end,
        als.item_factors,
        params,
        publish_until=model.state.params["publish_until"],
        ease_lambda=model.state.params["ease"].get("lambda_factor"),
    )
    for user in known_users(model)[:20]:
        served = model.recommend(user, 10)
        rows = np.asarray([offline_state.item_index[r.item_id] for r in served])
        feats = assemble_features(offline_state, user_context(offline_state, user), rows)
        offline = model.ranker.score(feats)
        np.testing.assert_allclose(offline, [r.score for r in served], rtol=0, atol=1e-9)


def test_corrupt_or_foreign_bundles_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    ranker = broken / "ranker.txt"
    ranker.write_text(ranker.read_text().replace("tree", "tr3e", 1))
    with pytest.raises(BundleError, match=r"ranker\.txt"):
        Recommender.load(broken)
    missing = tmp_path / "missing"
    shutil.copytree(tiny_bundle, missing)
    (missing / "state" / "state.npz").unlink()
    with pytest.raises(BundleError, match=r"state\.npz"):
        Recommender.load(missing)
    with pytest.raises(BundleError):
        Recommender.load(tmp_path / "nothing-here")
