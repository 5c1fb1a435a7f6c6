"""Issue 11's model parts: EASE as a graph, leave-last-out queries, the blend tie-break
and the ranker gate, on the tiny world's real training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training import artifacts as art
from recsys_assets.training import steps
from recsys_assets.training.ease import _graph, ease_graph, ease_matrix, ease_weights
from recsys_assets.training.lastout import leave_last_out
from recsys_assets.training.pipeline import TrainOutcome, train_bundle
from recsys_assets.training.ranking import RankerFit, RankingDataset, gate_ranker, grouped_ndcg
from recsys_serving.model.bundle import BundleError
from recsys_serving.model.context import graph_scores, user_context
from recsys_serving.model.features import FEATURE_NAMES, assemble_features
from recsys_serving.model.ranker import DEFAULT_BLEND, Blend, BlendRanker, ranked_order
from recsys_serving.model.recommender import Recommender

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture(scope="module")
def prepared(tiny_world: TinyWorld, tiny_outcome: TrainOutcome) -> steps.Prepared:
    return steps.load_prepared(tiny_world.lake)


def known_users(model: Recommender) -> list[str]:
    return [u for u in model.state.user_ids.tolist() if model.knows_user(u)]


# ------------------------------------------------------------------------ EASE
def test_ease_weights_are_the_closed_form() -> None:
    rng = np.random.default_rng(3)
    x = (rng.random((40, 7)) < 0.4).astype(np.float64)
    gram = x.T @ x
    b = ease_weights(gram, 2.0)
    # The EASE optimum: B = argmin |X - XB|^2 + lambda |B|^2 with diag(B) = 0, whose
    # stationarity condition is (G + lambda I) B - G = -diag(mu) off the diagonal.
    residual = (gram + 2.0 * np.eye(7)) @ b - gram
    off = ~np.eye(7, dtype=bool)
    assert np.allclose(residual[off], 0.0, atol=1e-9)
    assert np.allclose(np.diag(b), 0.0)


def test_graph_scores_are_the_history_times_the_kept_weights() -> None:
    rng = np.random.default_rng(5)
    x = (rng.random((60, 12)) < 0.3).astype(np.float64)
    b = ease_weights(x.T @ x, 1.0)
    warm = np.arange(12, dtype=np.int64)
    graph = _graph(b, warm, 12, top=11)  # every positive weight
    seen = np.asarray([1, 4, 7], dtype=np.int64)
    weights = np.asarray([1.0, 0.5, 2.0], dtype=np.float32)
    got = graph_scores(graph, 12, seen, weights, cap=200)
    expected = (weights[:, None].astype(np.float64) * np.maximum(b[seen], 0)).sum(axis=0)
    np.testing.assert_allclose(got.dense, expected, rtol=1e-6)
    # Sparsified to the top 3 per item: each row keeps its 3 largest positives.
    top3 = _graph(b, warm, 12, top=3)
    for row in range(12):
        items, vals = top3.row(row)
        assert items.size <= 3 and np.all(vals > 0) and np.all(np.diff(vals) <= 0)
        assert set(items.tolist()) <= set(np.argsort(-b[row])[:3].tolist())


def test_the_served_state_carries_ease_and_it_feeds_features(model: Recommender) -> None:
    state = model.state
    assert state.ease.indices.size > 0
    assert state.params["ease"]["lambda_factor"] > 0
    user = known_users(model)[0]
    ctx = user_context(state, user)
    assert ctx.ease.items.size > 0
    items = ctx.ease.ranked[:5]
    feats = assemble_features(state, ctx, items)
    ease = feats[:, FEATURE_NAMES.index("ease_score")]
    assert np.all(ease > 0) and np.all(np.diff(ease) <= 0)
    assert feats[0, FEATURE_NAMES.index("ease_rel")] == pytest.approx(1.0)


def test_ease_above_the_size_guard_is_skipped_and_says_so(prepared: steps.Prepared) -> None:
    params = tiny_params(ease_max_items=3)
    graph, stats = ease_graph(prepared.enc, prepared.vocab, prepared.window.end, params, 2.0)
    assert graph.indices.size == 0 and graph.n_rows == prepared.vocab.item_ids.size
    assert "ease_max_items=3" in stats["skipped"]
    matrix = ease_matrix(prepared.enc, prepared.vocab, prepared.window.end, params)
    assert stats["items"] == int((np.diff(matrix.tocsc().indptr) > 0).sum())


# -------------------------------------------------------------- leave-last-out
def test_leave_last_out_holds_out_each_users_own_last_events(prepared: steps.Prepared) -> None:
    enc, window = prepared.enc, prepared.window
    params = tiny_params(lastout_users=50, lastout_share=0.25, lastout_rounds=2)
    rounds = leave_last_out(enc, window, params)
    assert len(rounds) == 2
    assert not set(rounds[0].users.tolist()) & set(rounds[1].users.tolist())  # disjoint
    eligible = int((np.bincount(enc.user[enc.ts < window.holdout_start]) >= 5).sum())
    lastout = rounds[0]
    assert 0 < lastout.users.size <= min(25, eligible * params.lastout_max_users_share)
    assert not (lastout.mask & (enc.ts >= window.holdout_start)).any()  # never the holdout
    assert set(np.unique(enc.user[lastout.mask]).tolist()) == set(lastout.users.tolist())
    for u in lastout.users[:10].tolist():
        mine = (enc.user == u) & (enc.ts < window.holdout_start)
        held, kept = enc.ts[mine & lastout.mask], enc.ts[mine & ~lastout.mask]
        assert held.size == max(int(np.floor(mine.sum() * 0.25)), 1)
        assert kept.size and held.min() >= kept.max()  # the user's own latest events
    kept = lastout.kept(enc)
    assert kept.ts.size == enc.ts.size - int(lastout.mask.sum())
    # Their impressions from the first held-out event on are gone, others stay.
    assert enc.imp_ts.size > kept.imp_ts.size > 0
    for u in lastout.users[:10].tolist():
        first = enc.ts[(enc.user == u) & lastout.mask].min()
        assert not (kept.imp_ts[kept.imp_user == u] >= first).any()
    others = ~np.isin(enc.imp_user, lastout.users)
    assert int(others.sum()) == int((~np.isin(kept.imp_user, lastout.users)).sum())
    # Labels are held-out items the user had not interacted with before.
    for u, grades in list(lastout.labels(enc).items())[:10]:
        before = set(kept.item[(kept.user == u) & (kept.ts < window.holdout_start)].tolist())
        assert grades and not set(grades) & before


def test_the_ranking_dataset_holds_the_leave_last_out_queries(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, prepared: steps.Prepared
) -> None:
    stats = art.get_json(tiny_world.lake, art.key(steps.RANKING_DATASET, "stats.json"))
    assert stats["lastout"]["users"] > 0
    assert prepared.lastouts
    lastout = prepared.lastouts[0]
    state = steps.load_state(tiny_world.lake, prepared, "lastout0", tiny_params())
    assert state.as_of == prepared.window.holdout_start
    # Leak-free: the lastout state never saw a held-out event of its users.
    enc = prepared.enc
    for u in lastout.users[:20].tolist():
        held = set(enc.item[(enc.user == u) & lastout.mask].tolist())
        row = state.user_row(str(state.user_ids[u]))
        seen = set(state.seen.row(row)[0].tolist()) if row is not None else set()
        kept = set(enc.item[(enc.user == u) & ~lastout.mask & (enc.ts < state.as_of)])
        assert seen == kept and not (held - kept) & seen


# --------------------------------------------------------------- order and gate
class _Flat:
    """A ranker that cannot tell items apart (the one-tree ranker of issue 11)."""

    kind = "flat"

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.full(features.shape[0], 0.25)


def test_equal_ranker_scores_come_back_in_blend_order_never_by_id(model: Recommender) -> None:
    flat = Recommender(model.state, _Flat(), model.manifest, blend=model.blend)
    checked = 0
    for user in known_users(model)[:30]:
        recs = flat.recommend(user, 20)
        rows = np.asarray([model.state.item_index[r.item_id] for r in recs])
        ctx = user_context(model.state, user)
        blend = model.blend.score(assemble_features(model.state, ctx, rows))
        assert np.all(np.diff(blend) <= 0), "equal scores must follow the blend"
        ids = [r.item_id for r in recs]
        # No two adjacent items ordered by id alone: equal in score and blend.
        for a in range(len(ids) - 1):
            assert blend[a] != blend[a + 1] or recs[a].score != recs[a + 1].score
            checked += 1
        assert ids != sorted(ids)
    assert checked > 100


def test_ranked_order_uses_the_blend_for_ties_and_near_ties() -> None:
    scores = np.asarray([1.0, 1.0 + 1e-9, 0.5, 1.0])
    tie = np.asarray([0.1, 0.3, 0.9, 0.2])
    items = np.asarray([0, 1, 2, 3])
    assert ranked_order(scores, tie, items).tolist() == [1, 3, 0, 2]


def _dataset(rng: np.random.Generator, n_groups: int) -> RankingDataset:
    """Groups of 20 rows whose positives tend to have a higher ease_rel (a good but
    imperfect blend)."""
    rows = n_groups * 20
    feats = rng.random((rows, len(FEATURE_NAMES))).astype(np.float32)
    labels = (rng.random(rows) < 0.1).astype(np.int8)
    labels[::20] = 1
    feats[:, FEATURE_NAMES.index("ease_rel")] = labels + 1.2 * rng.random(rows)
    return RankingDataset(
        features=feats,
        labels=labels,
        groups=np.full(n_groups, 20, dtype=np.int64),
        users=np.arange(n_groups, dtype=np.int64),
        items=np.arange(rows, dtype=np.int64),
    )


class _Booster:
    def __init__(self, column: int) -> None:
        self.column = column

    def predict(self, features: np.ndarray, num_iteration: int | None = None) -> np.ndarray:
        return features[:, self.column].astype(np.float64)


def _fit(column: int, trees: int, valid: np.ndarray) -> RankerFit:
    return RankerFit(_Booster(column), trees, 0.0, 0.0, 0.0, {}, valid)


def test_the_gate_keeps_only_a_ranker_that_beats_the_blend_with_enough_trees() -> None:
    rng = np.random.default_rng(1)
    data = _dataset(rng, 60)
    valid = np.zeros(60, dtype=bool)
    valid[::3] = True
    params = tiny_params(ranker_gate=True, ranker_min_trees=5)
    noise = FEATURE_NAMES.index("item_ctr")
    lost = gate_ranker(data, _fit(noise, 50, valid), params)
    assert lost["mode"] == "blend" and "does not beat the blend" in lost["reason"]
    assert "ease_rel" in lost["blend"]["features"]
    assert lost["blend_valid_ndcg"] > lost["ranker_valid_ndcg"]
    few = gate_ranker(data, _fit(FEATURE_NAMES.index("ease_rel"), 1, valid), params)
    assert few["mode"] == "blend" and "1 trees" in few["reason"]
    # A ranker that knows the labels exactly beats any blend of retrieval scores.
    exact = data.features.copy()
    exact[:, noise] = data.labels * 10.0
    won = gate_ranker(
        RankingDataset(exact, data.labels, data.groups, data.users, data.items),
        _fit(noise, 50, valid),
        params,
    )
    assert won["mode"] == "ranker" and won["ranker_valid_ndcg"] > won["blend_valid_ndcg"]


def test_grouped_ndcg_by_hand() -> None:
    labels = np.asarray([0, 1, 0, 2], dtype=np.int8)
    groups = np.asarray([2, 2])
    scores = np.asarray([1.0, 0.0, 1.0, 1.0])  # group 2 tied: the tie-break decides
    tie = np.asarray([0.0, 0.0, 0.0, 1.0])
    # group 1: positive at rank 2 -> 1/log2(3); group 2: tie broken toward the positive.
    expected = (1.0 / np.log2(3) + 1.0) / 2
    assert grouped_ndcg(scores, labels, groups, 10, tie) == pytest.approx(expected)


def test_a_ranker_that_loses_the_gate_is_not_served(tiny_world: TinyWorld, tmp_path: Path) -> None:
    """Training with an unreachable tree minimum: the bundle ranks by the blend and
    says so in its manifest and in the ranking_model metadata."""
    params = tiny_params(0, tiny_world.settings, ranker_gate=True, ranker_min_trees=10_000)
    lake_copy = tmp_path / "lake"
    shutil.copytree(tiny_world.lake.root, lake_copy)
    from recsys_serving.lake import LocalLake

    lake = LocalLake(lake_copy)
    outcome = train_bundle(lake, params, tmp_path / "bundles")
    ranking = outcome.manifest["ranking"]
    assert ranking["mode"] == "blend" and "trees" in ranking["reason"]
    assert outcome.steps[steps.RANKING_MODEL].ranking["mode"] == "blend"
    model = Recommender.load(outcome.bundle_path)
    assert isinstance(model.ranker, BlendRanker)
    assert model.blend == Blend.from_dict(ranking["blend"])
    assert model.compile_ranker(tmp_path / "cache") is model.ranker  # nothing to compile
    user = known_users(model)[0]
    recs = model.recommend(user, 10)
    rows = np.asarray([model.state.item_index[r.item_id] for r in recs])
    blend = model.blend.score(assemble_features(model.state, user_context(model.state, user), rows))
    np.testing.assert_allclose([r.score for r in recs], blend)
    assert np.all(np.diff(blend) <= 0)


def test_a_model_without_a_validated_blend_breaks_ties_with_the_default(
    model: Recommender,
) -> None:
    bare = Recommender(model.state, model.ranker)
    assert bare.blend == DEFAULT_BLEND
    with pytest.raises(ValueError, match="bad blend"):
        Blend(("no_such_feature",), (1.0,))


def test_a_bundle_of_an_older_state_format_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    meta = old / "state" / "state.json"
    value = json.loads(meta.read_text())
    value["format"] = 2
    meta.write_text(json.dumps(value))
    manifest = json.loads((old / "manifest.json").read_text())
    import hashlib

    data = meta.read_bytes()
    manifest["files"]["state/state.json"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="state format"):
        Recommender.load(old)


# ------------------------------------------------- leave-last-out queries: when
def _queries(
    rng: np.random.Generator, n_groups: int, signal: str, first_user: int
) -> RankingDataset:
    """Groups of 20 rows whose labels the ``signal`` column tells exactly; every other
    column is noise."""
    rows = n_groups * 20
    feats = rng.random((rows, len(FEATURE_NAMES))).astype(np.float32)
    labels = (rng.random(rows) < 0.15).astype(np.int8)
    labels[::20] = 1
    feats[:, FEATURE_NAMES.index(signal)] = labels + 0.5 * rng.random(rows)
    return RankingDataset(
        features=feats,
        labels=labels,
        groups=np.full(n_groups, 20, dtype=np.int64),
        users=np.arange(first_user, first_user + n_groups, dtype=np.int64),
        items=np.arange(rows, dtype=np.int64),
    )


_COLUMNS = ("features", "labels", "groups", "users", "items")


def _world(
    cutoff_signal: str, lastout_signal: str = "knn_rel"
) -> tuple[RankingDataset, np.ndarray]:
    """Cut-off queries taught by ``cutoff_signal``; leave-last-out queries (other users)
    by ``lastout_signal`` (a retrieval score by default)."""
    rng = np.random.default_rng(7)
    cut = _queries(rng, 120, cutoff_signal, 0)
    lastout = _queries(rng, 120, lastout_signal, 1_000)
    data = RankingDataset(
        *(np.concatenate([getattr(cut, f), getattr(lastout, f)]) for f in _COLUMNS)
    )
    flags = np.r_[np.zeros(120, dtype=bool), np.ones(120, dtype=bool)]
    return data, flags


def test_leave_last_out_queries_are_added_only_when_the_cutoff_ranker_loses() -> None:
    """Cut-off queries the ranker learns (a non-retrieval column tells the labels): it
    beats the blend alone and serves without the leave-last-out queries. Cut-off
    queries a retrieval score already orders perfectly: no ranker beats that blend, so
    the leave-last-out queries are added (today's behaviour), and the choice and both
    attempts' validation figures are recorded."""
    params = tiny_params(ranker_gate=True, ranker_min_trees=1)
    learnable, flags = _world("item_ctr")
    fit, ranking, used = steps.fit_ranking(learnable, flags, params)
    choice = ranking["lastout_choice"]
    assert choice["queries"] == "cutoffs", choice
    assert used.groups.size == 120 and not np.isin(used.users, np.arange(1_000, 1_120)).any()
    assert ranking["mode"] == "ranker" and fit.best_iteration == ranking["ranker_trees"]
    cut = choice["cutoffs_only"]
    assert cut["ranker_valid_ndcg"] > cut["blend_valid_ndcg"] and "with_lastout" not in choice
    # Without the lever every query is used.
    _, all_ranking, all_used = steps.fit_ranking(
        learnable, flags, tiny_params(ranker_gate=True, ranker_min_trees=1, lastout_select=False)
    )
    assert all_ranking["lastout_choice"]["queries"] == "cutoffs+lastout"
    assert all_used.groups.size == 240

    ordered, flags = _world("ease_rel")
    _, ranking, used = steps.fit_ranking(ordered, flags, params)
    choice = ranking["lastout_choice"]
    assert choice["queries"] == "cutoffs+lastout", choice
    assert used.groups.size == 240
    cut = choice["cutoffs_only"]
    assert not cut["ranker_valid_ndcg"] > cut["blend_valid_ndcg"]
    assert "does not beat the blend" in choice["reason"]
    assert choice["with_lastout"]["ranker_valid_ndcg"] == ranking["ranker_valid_ndcg"]


def test_the_candidate_better_on_both_kinds_of_validation_queries_serves() -> None:
    """Cut-off queries taught by a non-retrieval column (item_ctr), leave-last-out
    queries (other users) by another (item_age_at_user): the ranker trained on the
    cut-off queries alone cannot learn the second, the one trained on all queries learns
    both, gains on both kinds of validation queries and serves; the four figures and
    the choice are recorded. With ``lastout_select`` off every query is used."""
    params = tiny_params(ranker_gate=True, ranker_min_trees=1, lastout_rule="both_kinds")
    data, flags = _world("item_ctr", "item_age_at_user")
    _, ranking, used = steps.fit_ranking(data, flags, params)
    choice = ranking["lastout_choice"]
    assert choice["queries"] == "cutoffs+lastout", choice
    assert used.groups.size == 240 and ranking["mode"] == "ranker"
    cut, both = choice["cutoffs_only"], choice["with_lastout"]
    for figures in (cut, both):
        assert {"cutoff_ndcg", "cutoff_gain", "lastout_ndcg", "lastout_gain", "score"} <= set(
            figures
        )
    assert both["lastout_gain"] > cut["lastout_gain"] + 0.1
    assert both["score"] > cut["score"]
    assert choice["valid_groups"]["cutoff"] > 0 and choice["valid_groups"]["lastout"] > 0
    _, all_ranking, all_used = steps.fit_ranking(
        data, flags, tiny_params(ranker_gate=True, ranker_min_trees=1, lastout_select=False)
    )
    assert all_ranking["lastout_choice"]["queries"] == "cutoffs+lastout"
    assert all_used.groups.size == 240


def _choose(cut_column: str, all_column: str) -> dict[str, Any]:
    """The rule on fixed candidates: the cut-off-only "ranker" scores by ``cut_column``,
    the all-queries one by ``all_column`` (both served as rankers)."""
    params = tiny_params(ranker_gate=False, lastout_rule="both_kinds")
    data, flags = _world("item_ctr", "item_age_at_user")
    valid = np.zeros(data.groups.size, dtype=bool)
    valid[::2] = True
    cut = steps.subset_groups(data, ~flags)
    candidates = {
        "cutoffs_only": (
            fit := _fit(FEATURE_NAMES.index(cut_column), 50, valid[~flags]),
            steps.gate_ranker(cut, fit, params),
        ),
        "with_lastout": (
            fit_all := _fit(FEATURE_NAMES.index(all_column), 50, valid),
            steps.gate_ranker(data, fit_all, params),
        ),
    }
    return steps._choose_queries(data, flags, valid, candidates, params)


def test_the_rule_weighs_each_kind_of_query_by_its_relative_gain_over_the_blend() -> None:
    # The cut-off candidate knows the cut-off labels, the other knows neither kind:
    # the cut-off queries alone serve.
    choice = _choose("item_ctr", "item_mean_rating")
    assert choice["queries"] == "cutoffs", choice
    assert choice["cutoffs_only"]["cutoff_gain"] > 0.1
    # The other way round: the all-queries candidate knows the leave-last-out labels
    # and the cut-off one nothing.
    choice = _choose("item_mean_rating", "item_age_at_user")
    assert choice["queries"] == "cutoffs+lastout", choice
    # Each candidate's score is the mean of its two relative gains over the blend.
    for name in ("cutoffs_only", "with_lastout"):
        figures = choice[name]
        assert figures["score"] == pytest.approx(
            (figures["cutoff_gain"] + figures["lastout_gain"]) / 2, abs=1e-5
        )
        for kind in ("cutoff", "lastout"):
            blend = choice["reference_blend_ndcg"][kind]
            assert figures[f"{kind}_gain"] == pytest.approx(
                figures[f"{kind}_ndcg"] / blend - 1.0, abs=1e-4
            )


def test_the_manifest_says_which_queries_trained_the_ranker(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome
) -> None:
    choice = tiny_outcome.manifest["ranking"]["lastout_choice"]
    assert choice["queries"] in ("cutoffs", "cutoffs+lastout")
    assert choice["rule"] == "cutoff_gate" and "ranker_valid_ndcg" in choice["cutoffs_only"]
    stats = art.get_json(tiny_world.lake, art.key(steps.RANKING_MODEL, "ranker.json"))
    assert stats["ranking"]["lastout_choice"] == choice
