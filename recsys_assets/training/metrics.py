"""Offline ranking metrics over top-K lists, plus an off-policy CTR estimate.

Binary relevance (an item the user interacted with in the holdout is relevant):

* ``ndcg@K``: DCG of the list (``1 / log2(rank + 2)`` per hit, 0-based rank) over the
  DCG of a perfect list with ``min(|relevant|, K)`` hits;
* ``recall@K``: hits / |relevant|;
* ``hit_rate@K``: 1 when the list holds at least one relevant item;
* ``map@K``: mean over hit ranks of precision at that rank, over ``min(|relevant|, K)``;
* ``coverage@K``: distinct recommended items over the items that could be recommended.

The CTR estimate replays logged impressions: a logged (user, item) impression counts
when the model ranks that item for that user; its click is reweighted by the ratio of
examination propensities at the model's rank and the logged position (estimated from
the logs as CTR by position), clipped, and self-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

METRICS = ("ndcg", "recall", "hit_rate", "map")


def _discounts(k: int) -> npt.NDArray[np.float64]:
    return 1.0 / np.log2(np.arange(k) + 2.0)


def user_metrics(recommended: Sequence[str], relevant: set[str], k: int) -> dict[str, float]:
    """Metrics of one top-K list against one user's relevant items."""
    if not relevant:
        raise ValueError("a user without relevant items cannot be scored")
    top = list(recommended)[:k]
    hits = np.asarray([item in relevant for item in top], dtype=float)
    disc = _discounts(k)
    dcg = float((hits * disc[: hits.size]).sum())
    ideal = float(disc[: min(len(relevant), k)].sum())
    n_hits = float(hits.sum())
    precision_at = np.cumsum(hits) / (np.arange(hits.size) + 1.0)
    ap = float((precision_at * hits).sum() / min(len(relevant), k))
    return {
        "ndcg": dcg / ideal,
        "recall": n_hits / len(relevant),
        "hit_rate": 1.0 if n_hits > 0 else 0.0,
        "map": ap,
    }


def aggregate(
    lists: Mapping[str, Sequence[str]],
    truth: Mapping[str, set[str]],
    k: int,
    n_candidates: int,
) -> dict[str, float]:
    """Mean metrics over users in ``truth`` (a missing list scores zero), plus coverage."""
    if not truth:
        raise ValueError("no users to evaluate")
    sums = dict.fromkeys(METRICS, 0.0)
    recommended: set[str] = set()
    for user, relevant in truth.items():
        top = list(lists.get(user, ()))[:k]
        recommended.update(top)
        for name, value in user_metrics(top, relevant, k).items():
            sums[name] += value
    n = len(truth)
    out = {f"{name}@{k}": sums[name] / n for name in METRICS}
    out[f"coverage@{k}"] = len(recommended) / max(n_candidates, 1)
    out["users"] = float(n)
    return out


def position_propensity(
    positions: npt.NDArray[np.int64], clicked: npt.NDArray[np.bool_], max_position: int
) -> npt.NDArray[np.float64]:
    """Relative examination by position (CTR at p / CTR at 0), monotone, from the logs."""
    prop = np.ones(max_position, dtype=np.float64)
    ok = (positions >= 0) & (positions < max_position)
    shown = np.bincount(positions[ok], minlength=max_position).astype(np.float64)
    clicks = np.bincount(positions[ok & clicked], minlength=max_position).astype(np.float64)
    ctr = np.where(shown > 0, clicks / np.maximum(shown, 1.0), np.nan)
    if not np.isfinite(ctr[0]) or ctr[0] <= 0:
        return prop
    rel = ctr / ctr[0]
    # Positions without data fall back to the standard 1 / log2(p + 2) curve.
    fallback = 1.0 / np.log2(np.arange(max_position) + 2.0)
    rel = np.where(np.isfinite(rel) & (rel > 0), rel, fallback)
    return np.minimum.accumulate(np.clip(rel, 1e-3, 1.0))


def replay_ctr(
    lists: Mapping[str, Sequence[str]],
    imp_users: Sequence[str],
    imp_items: Sequence[str],
    imp_positions: npt.NDArray[np.int64],
    imp_clicked: npt.NDArray[np.bool_],
    k: int,
    clip: float,
) -> dict[str, float]:
    """Clipped, self-normalised position-IPS CTR of the lists on logged impressions."""
    n = len(imp_users)
    if n == 0:
        return {"expected_ctr": float("nan"), "ctr_matches": 0.0, "logged_ctr": float("nan")}
    max_pos = int(max(k, int(imp_positions.max(initial=0)) + 1))
    prop = position_propensity(imp_positions, imp_clicked, max_pos)
    rank_of: dict[str, dict[str, int]] = {
        user: {item: r for r, item in enumerate(list(items)[:k])} for user, items in lists.items()
    }
    weights: list[float] = []
    clicks: list[float] = []
    for user, item, pos, click in zip(
        imp_users, imp_items, imp_positions.tolist(), imp_clicked.tolist(), strict=True
    ):
        ranks = rank_of.get(user)
        if ranks is None or item not in ranks or pos < 0:
            continue
        w = min(clip, prop[ranks[item]] / prop[min(pos, max_pos - 1)])
        weights.append(w)
        clicks.append(w * float(click))
    logged = float(imp_clicked.mean())
    if not weights:
        return {"expected_ctr": float("nan"), "ctr_matches": 0.0, "logged_ctr": logged}
    return {
        "expected_ctr": float(np.sum(clicks) / np.sum(weights)),
        "ctr_matches": float(len(weights)),
        "logged_ctr": logged,
    }
