"""Time-based holdout evaluation of recommenders on the same users and truth.

The holdout is ``[holdout_start, end)``. Each sampled user's relevant items are the
items they interacted with there and had not interacted with before (recommenders
never repeat seen items). Every model is asked for the same users at the same K:
the challenger (its learned parts applied to the state as of the holdout start),
the current production model as it is served, and a popularity baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.data import Encoded
from recsys_assets.training.metrics import aggregate, replay_ctr
from recsys_assets.training.params import TrainingParams
from recsys_serving.model.state import ModelState

ListFn = Callable[[str, int], Sequence[str]]


@dataclass
class Holdout:
    k: int
    truth: dict[str, set[str]]  # user id -> relevant item ids
    n_candidates: int  # items recommendable at the holdout start
    imp_users: list[str] = field(default_factory=list)
    imp_items: list[str] = field(default_factory=list)
    imp_positions: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    imp_clicked: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, bool))
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return sorted(self.truth)


def build_holdout(state: ModelState, enc: Encoded, end: float, params: TrainingParams) -> Holdout:
    """Relevant unseen items per user in ``[state.as_of, end)``; a seeded user sample."""
    start = state.as_of
    mask = (enc.ts >= start) & (enc.ts < end)
    pairs = pl.DataFrame({"u": enc.user[mask], "i": enc.item[mask]}).unique().sort("u", "i")
    truth_rows: dict[int, list[int]] = {}
    for u, i in pairs.iter_rows():
        lo, hi = state.seen.indptr[u], state.seen.indptr[u + 1]
        seen = state.seen.indices[lo:hi]
        pos = np.searchsorted(seen, i)
        if pos < seen.size and seen[pos] == i:
            continue
        truth_rows.setdefault(int(u), []).append(int(i))
    users = np.asarray(sorted(truth_rows), dtype=np.int64)
    if users.size == 0:
        raise ValueError("the holdout has no user with a new item to predict")
    rng = np.random.default_rng([params.seed, 0xE7A1])
    if users.size > params.eval_max_users:
        users = np.sort(rng.choice(users, size=params.eval_max_users, replace=False))
    truth = {
        str(state.user_ids[u]): {str(state.item_ids[i]) for i in truth_rows[int(u)]}
        for u in users.tolist()
    }
    imask = (enc.imp_ts >= start) & (enc.imp_ts < end) & np.isin(enc.imp_user, users)
    holdout = Holdout(
        k=params.eval_k,
        truth=truth,
        n_candidates=int(state.available.sum()),
        imp_users=state.user_ids[enc.imp_user[imask]].tolist(),
        imp_items=state.item_ids[enc.imp_item[imask]].tolist(),
        imp_positions=enc.imp_position[imask],
        imp_clicked=enc.imp_clicked[imask],
        stats={
            "users_with_new_items": len(truth_rows),
            "users_evaluated": int(users.size),
            "cold_users": int(sum(state.user_row(u) is None for u in truth)),
            "relevant_items": int(sum(len(v) for v in truth.values())),
            "impressions": int(imask.sum()),
        },
    )
    return holdout


def evaluate(lists_for: ListFn, holdout: Holdout, params: TrainingParams) -> dict[str, float]:
    """Ranking metrics plus the replayed CTR of one recommender on the holdout."""
    k = holdout.k
    lists = {user: list(lists_for(user, k)) for user in holdout.users}
    metrics = aggregate(lists, holdout.truth, k, holdout.n_candidates)
    if holdout.imp_users:
        ctr = replay_ctr(
            lists,
            holdout.imp_users,
            holdout.imp_items,
            holdout.imp_positions,
            holdout.imp_clicked,
            k,
            params.ips_clip,
        )
        metrics[f"expected_ctr@{k}"] = ctr["expected_ctr"]
        metrics["ctr_matches"] = ctr["ctr_matches"]
        metrics["logged_ctr"] = ctr["logged_ctr"]
    return {name: round(float(v), 6) for name, v in metrics.items() if math.isfinite(v)}


def popularity_lists(state: ModelState) -> ListFn:
    """The baseline: the state's most popular available items the user has not seen."""

    def lists_for(user_id: str, k: int) -> list[str]:
        row = state.user_row(user_id)
        seen = set(state.seen.row(row)[0].tolist()) if row is not None else set()
        out: list[str] = []
        for item in state.popular.tolist():
            if item not in seen:
                out.append(str(state.item_ids[item]))
                if len(out) >= k:
                    break
        return out

    return lists_for


def model_lists(model: Any) -> ListFn:
    """Top-K item ids from anything with the Recommender's ``recommend``."""

    def lists_for(user_id: str, k: int) -> list[str]:
        return [r.item_id for r in model.recommend(user_id, k)]

    return lists_for


def markdown_table(results: dict[str, dict[str, float]], k: int) -> str:
    """One row per model, the headline metrics as columns (for Dagster metadata)."""
    cols = [f"ndcg@{k}", f"recall@{k}", f"hit_rate@{k}", f"map@{k}", f"coverage@{k}"]
    cols += [f"expected_ctr@{k}"] if any(f"expected_ctr@{k}" in r for r in results.values()) else []
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_chart_png(results: dict[str, dict[str, float] | None], k: int) -> bytes:
    """Grouped bars of the headline metrics per model (PNG, for the Dagster UI)."""
    import altair as alt
    import vl_convert as vlc

    names = [f"ndcg@{k}", f"recall@{k}", f"hit_rate@{k}", f"map@{k}", f"coverage@{k}"]
    rows = [
        {"model": model, "metric": name, "value": float(metrics[name])}
        for model, metrics in results.items()
        if metrics
        for name in names
        if name in metrics
    ]
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X("model:N", title=None),
            y=alt.Y("value:Q", title=None),
            color=alt.Color("model:N", legend=None),
            column=alt.Column("metric:N", title=None, sort=names),
        )
        .properties(width=90, height=160)
    )
    return vlc.vegalite_to_png(chart.to_json(), scale=1)
