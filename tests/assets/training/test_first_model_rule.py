"""The first-model rule: a model that loses to popularity does not serve its own answers.

The rule itself (``decide_first_model``) is checked on figures; the whole path (the
``model_evaluation`` step on a real bursty ratings log, registration, then the service)
is checked with the challenger's answers replaced by a recommender of known quality, so
the tests prove the rule and its wiring whatever the model's own quality is today:
item-kNN on the state's history clearly beats popularity on this log; the least popular
items clearly lose to it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from bursty_support import BurstyWorld, build_bursty_world, bursty_params

from recsys_assets.training import steps
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.pipeline import train_bundle
from recsys_serving.api.metrics import parse_metrics
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.model.recommender import Recommender
from recsys_serving.model.state import ModelState
from recsys_serving.registry import (
    ANSWERS,
    POPULARITY_ANSWERS,
    ModelRegistry,
    PromotionRule,
    decide_first_model,
    serves_popularity,
)
from serving_support import new_key, service_settings, serving_client, wait_for

RULE = PromotionRule(metric="ndcg@10", min_lift=0.0, guardrails={})


def comparison(users: int, challenger: float, popularity: float, stderr: float) -> dict[str, Any]:
    return {
        "users": float(users),
        "challenger": challenger,
        "popularity": popularity,
        "difference": challenger - popularity,
        "stderr": stderr,
    }


# ------------------------------------------------------------------------ the rule
def test_a_model_clearly_below_popularity_on_a_large_holdout_does_not_serve() -> None:
    decision = decide_first_model(
        {
            "holdout": comparison(23, 0.40, 0.35, 0.05),
            "per_user": comparison(400, 0.21, 0.25, 0.01),
        },
        RULE,
    )
    assert not decision.serve
    assert decision.warning is not None and "popularity answers" in decision.warning
    assert decision.evidence["judged"]["per_user"]["clearly_below"] is True
    assert "holdout" in decision.evidence["skipped"]  # 23 users: too few to judge


def test_a_tiny_holdout_cannot_block_a_model_that_beats_popularity_elsewhere() -> None:
    # The figures (0.295 vs 0.347 on 23 users) lose on the time holdout, but
    # 23 users do not judge; the per-user holdout (300 users) says the model is better.
    decision = decide_first_model(
        {
            "holdout": comparison(23, 0.295, 0.347, 0.06),
            "per_user": comparison(300, 0.33, 0.25, 0.01),
        },
        RULE,
    )
    assert decision.serve and decision.warning is None
    assert "per_user NDCG@10 0.3300 vs popularity 0.2500" in decision.reason


def test_when_holdouts_disagree_clearly_the_mean_over_their_users_decides() -> None:
    # The bursty world's figures: the time holdout (37 users) clearly below, the per-user
    # one (948 users) clearly above; neither vetoes, their users' mean difference decides.
    serve = decide_first_model(
        {
            "holdout": comparison(37, 0.2885, 0.3781, 0.03),
            "per_user": comparison(948, 0.3350, 0.1652, 0.008),
        },
        RULE,
    )
    assert serve.serve
    assert serve.warning is not None and "holdouts disagree" in serve.warning
    assert serve.evidence["judged"]["holdout"]["clearly_below"]
    assert serve.evidence["judged"]["per_user"]["clearly_above"]
    assert serve.evidence["pooled"]["difference"] == pytest.approx(
        (37 * (0.2885 - 0.3781) + 948 * (0.3350 - 0.1652)) / 985
    )
    # The same disagreement with the larger side below: popularity answers.
    keep = decide_first_model(
        {
            "holdout": comparison(900, 0.30, 0.36, 0.01),
            "per_user": comparison(100, 0.35, 0.30, 0.01),
        },
        RULE,
    )
    assert not keep.serve and keep.reason.startswith("holdouts disagree")
    assert "popularity answers" in (keep.warning or "")


def test_below_within_noise_and_above_nowhere_does_not_serve() -> None:
    decision = decide_first_model({"per_user": comparison(100, 0.30, 0.31, 0.02)}, RULE)
    assert not decision.serve
    assert decision.reason.startswith("not above popularity")


def test_with_no_holdout_large_enough_the_model_serves_with_a_warning() -> None:
    decision = decide_first_model(
        {"holdout": comparison(12, 0.1, 0.3, 0.1), "per_user": None}, RULE
    )
    assert decision.serve
    assert decision.warning is not None and "no holdout has enough users" in decision.warning


def test_logs_with_impressions_skip_the_rule_unless_it_is_switched_on() -> None:
    figures = {"per_user": comparison(400, 0.21, 0.25, 0.01)}
    skipped = decide_first_model(figures, RULE, impressions=1_000)
    assert skipped.serve and "impressions" in skipped.evidence["skipped_rule"]
    forced = PromotionRule(metric="ndcg@10", min_lift=0.0, first_model_gate=True)
    assert not decide_first_model(figures, forced, impressions=1_000).serve
    off = PromotionRule(metric="ndcg@10", min_lift=0.0, first_model_gate=False)
    assert decide_first_model(figures, off).serve


# ------------------------------------------------------------------ the whole path
@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[BurstyWorld, TrainingParams, str]:
    """A bursty ratings log (no impressions), landed and trained once: the world, the
    parameters and the bundle's version."""
    world = build_bursty_world(tmp_path_factory.mktemp("first-model-rule"))
    params = bursty_params(world.settings)
    outcome = train_bundle(world.lake, params, world.root / "bundles")
    return world, params, outcome.bundle.version


def fresh_lake(world: BurstyWorld, tmp_path: Path) -> LocalLake:
    """A copy of the trained lake: each test starts with an empty registry."""
    target = tmp_path / "lake"
    shutil.copytree(world.lake.root, target)
    return LocalLake(target)


def knn_lists(state: ModelState) -> Callable[[str, int], list[str]]:
    """Item-kNN (cosine) on the state's history: clearly better than popularity here."""
    seen = state.seen
    x = sp.csr_matrix(
        (np.ones(seen.indices.size), seen.indices, seen.indptr), shape=(seen.n_rows, state.n_items)
    )
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel()) + 1e-9
    sim = (x.T @ x).toarray() / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)

    def lists_for(user_id: str, k: int) -> list[str]:
        row = state.user_row(user_id)
        if row is None:
            return []
        history = seen.row(row)[0]
        scores = sim[history].sum(axis=0)
        scores[history] = -np.inf
        scores[~state.available] = -np.inf
        return [str(state.item_ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]

    return lists_for


def least_popular_lists(state: ModelState) -> Callable[[str, int], list[str]]:
    def lists_for(user_id: str, k: int) -> list[str]:
        row = state.user_row(user_id)
        seen = set(state.seen.row(row)[0].tolist()) if row is not None else set()
        tail = [i for i in state.popular.tolist()[::-1] if i not in seen and state.available[i]]
        return [str(state.item_ids[i]) for i in tail[:k]]

    return lists_for


def challenger_answers(monkeypatch: pytest.MonkeyPatch, make: Callable[[ModelState], Any]) -> None:
    """The challenger's answers in model_evaluation come from ``make(its state)``."""
    monkeypatch.setattr(steps, "model_lists", lambda model: make(model.state))


def recommend(lake: LocalLake, tmp_path: Path, user: str) -> tuple[dict[str, Any], str]:
    settings = service_settings(tmp_path / "home", lake_uri=str(lake.root))
    key = {"X-API-Key": new_key(settings, "recommend")}
    version = ModelRegistry(lake).alias(PRODUCTION).version  # type: ignore[union-attr]
    with serving_client(settings) as client:
        wait_for(
            lambda: client.app.state.manager.state.versions().get(PRODUCTION) == version,
            60,
            "the production model loaded",
        )
        body = client.get(f"/recommendations/{user}", params={"k": 10}, headers=key).json()
        return body, client.get("/metrics").text


@pytest.mark.slow
def test_a_model_that_beats_popularity_becomes_production_and_serves_itself(
    trained: tuple[BurstyWorld, TrainingParams, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, params, bundle = trained
    lake = fresh_lake(world, tmp_path)
    challenger_answers(monkeypatch, knn_lists)
    evaluation = steps.run_model_evaluation(lake, params, RULE, tmp_path / "cache", bundle)
    assert evaluation.decision == "first_model", evaluation.decision_reason
    rule = evaluation.first_model_rule
    assert rule["applies"] and rule["serve"] and rule["warning"] is None
    judged = rule["evidence"]["judged"]["per_user"]
    assert judged["users"] >= RULE.first_model_min_users
    assert judged["challenger"] > judged["popularity"]
    per_user = evaluation.per_user["metrics"]
    assert per_user["challenger"]["ndcg@10"] > per_user["popularity"]["ndcg@10"]

    registered = steps.run_registration(lake, tmp_path / "cache", evaluation)
    assert registered.registered_as == PRODUCTION
    production = ModelRegistry(lake).alias(PRODUCTION)
    assert production is not None and not serves_popularity(production)
    tags = ModelRegistry(lake).get(registered.version).tags
    assert float(tags["per_user_challenger_ndcg@10"]) > float(tags["per_user_popularity_ndcg@10"])

    user = str(world.events["user_id"][0])
    body, _ = recommend(lake, tmp_path, user)
    assert body["served_by"] == "champion"


@pytest.mark.slow
def test_a_model_below_popularity_answers_with_popularity_until_one_beats_it(
    trained: tuple[BurstyWorld, TrainingParams, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, params, bundle = trained
    lake = fresh_lake(world, tmp_path)
    challenger_answers(monkeypatch, least_popular_lists)
    evaluation = steps.run_model_evaluation(lake, params, RULE, tmp_path / "cache", bundle)
    assert evaluation.decision == "below_popularity"
    assert "serving popularity answers" in evaluation.decision_reason
    assert evaluation.first_model_rule["evidence"]["judged"]["per_user"]["clearly_below"]

    first = steps.run_registration(lake, tmp_path / "cache", evaluation)
    assert first.registered_as == f"{PRODUCTION} (answers: {POPULARITY_ANSWERS})"
    production = ModelRegistry(lake).alias(PRODUCTION)
    assert production is not None and production.evidence[ANSWERS] == POPULARITY_ANSWERS

    # The service answers with the bundle's popular items the user has not seen.
    user = str(world.events["user_id"][0])
    body, metrics = recommend(lake, tmp_path, user)
    assert body["served_by"] == "fallback"
    model = Recommender.load(ModelRegistry(lake).fetch(first.version, tmp_path / "fetch"))
    expected = [r.item_id for r in model.popular(10, exclude=model.seen(user))]
    assert [it["item_id"] for it in body["items"]] == expected
    reasons = {s[0].get("reason"): s[1] for s in parse_metrics(metrics)["recsys_fallback_total"]}
    assert reasons.get("below_popularity", 0) >= 1

    # The next model that beats popularity replaces it and serves its own answers.
    newest = steps.run_recommender_model(lake, params, tmp_path / "staging")
    challenger_answers(monkeypatch, knn_lists)
    again = steps.run_model_evaluation(lake, params, RULE, tmp_path / "cache", newest.version)
    assert again.decision == "first_model"
    assert again.decision_reason.startswith(f"production {first.version} answers with")
    second = steps.run_registration(lake, tmp_path / "cache", again)
    assert second.version != first.version
    assert second.registered_as == PRODUCTION
    assert not serves_popularity(ModelRegistry(lake).alias(PRODUCTION))
    body, _ = recommend(lake, tmp_path / "second", user)
    assert body["served_by"] == "champion"


# ------------------------------------------------------------------ the per-user holdout
def test_per_user_split_holds_out_each_users_last_fifth_and_their_later_impressions() -> None:
    from recsys_assets.training.data import Encoded
    from recsys_assets.training.evaluation import per_user_split

    # user 0: 5 events (two at t=4: item 3 sorts before item 7) -> 4 train, item 7 test;
    # user 1: 10 events -> 8 train; its test items 5 (seen before) and 9 -> truth {9};
    # user 2: 3 events, too few to be sampled (PER_USER_MIN_EVENTS = 5).
    rows = [(0, 1, 1.0), (0, 2, 2.0), (0, 4, 3.0), (0, 7, 4.0), (0, 3, 4.0)]
    rows += [(1, i, 10.0 + i) for i in range(8)] + [(1, 5, 30.0), (1, 9, 31.0)]
    rows += [(2, 1, 5.0), (2, 2, 6.0), (2, 3, 7.0)]
    rows.sort(key=lambda r: r[2])
    user, item, ts = (np.asarray(c) for c in zip(*rows, strict=True))
    n = user.size
    enc = Encoded(
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        ts=ts.astype(np.float64),
        weight=np.ones(n, np.float32),
        grade=np.ones(n, np.int8),
        session=np.zeros(n, np.int64),
        rating=np.full(n, np.nan),
        imp_user=np.asarray([0, 0, 1, -1], np.int64),
        imp_item=np.asarray([7, 7, 9, 1], np.int64),
        imp_ts=np.asarray([3.5, 4.0, 29.0, 50.0]),
        imp_clicked=np.zeros(4, bool),
        imp_position=np.zeros(4, np.int64),
        imp_request=np.zeros(4, np.int64),
    )
    ids = np.asarray([f"u{k}" for k in range(3)])
    items = np.asarray([f"i{k}" for k in range(10)])
    split = per_user_split(enc, ids, items, TrainingParams())
    assert split is not None
    assert split.truth == {"u0": {"i7"}, "u1": {"i9"}}
    assert split.stats["users_sampled"] == 2 and split.stats["test_events"] == 3
    kept = set(zip(split.train.user.tolist(), split.train.item.tolist(), strict=True))
    assert (0, 3) in kept and (0, 7) not in kept and (1, 9) not in kept
    assert split.train.user.size == n - 3
    assert np.all(np.diff(split.train.ts) >= 0)
    # Impressions of a held-out user from their first test event (t=4 for u0) are gone.
    assert split.train.imp_ts.tolist() == [3.5, 29.0, 50.0]
