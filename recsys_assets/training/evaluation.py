"""Time-based holdout evaluation of recommenders on the same users and truth.

The holdout is ``[holdout_start, end)``. Each sampled user's relevant items are the
items they interacted with there and had not interacted with before (recommenders
never repeat seen items). Every model is asked for the same users at the same K:
the challenger (its learned parts applied to the state as of the holdout start),
the current production model as it is served, and a popularity baseline.

The **per-user holdout** tests users at their own time instead, as acceptance's per-user
protocol does (``docs/model.md``): for a sample of users, each one's last 20% of events
(by time, then item) are left out, and the challenger's state is rebuilt, as of the end
of the window, from everything else. Users active in a burst months before the end are
then tested too, which a time holdout of the last day never sees: a model that only
follows recency passes the time holdout and fails this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.data import Encoded, impression_slices
from recsys_assets.training.metrics import aggregate, replay_ctr, user_metrics
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
    imask = _holdout_impressions(enc, start, end, users)
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
            "impressions": int(imask.size),
        },
    )
    return holdout


def _holdout_impressions(
    enc: Encoded, start: float, end: float, users: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Rows of the impressions shown to ``users`` in ``[start, end)``, ascending, found
    one slice of the impressions at a time (the sampled users' rows are few; whole-array
    masks over every impression are a gigabyte at 100M events)."""
    wanted = np.sort(np.asarray(users, dtype=np.int64))
    rows: list[npt.NDArray[np.int64]] = []
    for part in impression_slices(enc.imp_ts.size):
        ts = enc.imp_ts[part]
        ok = (ts >= start) & (ts < end)
        ok[ok] = np.isin(enc.imp_user[part][ok], wanted)
        rows.append(np.flatnonzero(ok) + part.start)
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)


PER_USER_TEST_SHARE = 0.2  # each sampled user's last 20% of events, as acceptance splits
PER_USER_MIN_EVENTS = 5  # a user needs a history and a test: at least 4 + 1 events


@dataclass
class PerUserSplit:
    """The per-user holdout: who is tested on what, and the events the state is built from."""

    truth: dict[str, set[str]]  # user id -> relevant (unseen) items of their last 20%
    train: Encoded  # every event except the sampled users' last 20%
    stats: dict[str, Any]


def _subset(enc: Encoded, keep: npt.NDArray[np.bool_], keep_imp: npt.NDArray[np.bool_]) -> Encoded:
    """``enc`` without some events and impressions (both stay sorted by time)."""
    values: dict[str, np.ndarray] = {}
    for name, array in enc.to_arrays().items():
        values[name] = array[keep_imp] if name.startswith("imp_") else array[keep]
    return Encoded.from_arrays(values)


def per_user_split(
    enc: Encoded, user_ids: npt.NDArray[Any], item_ids: npt.NDArray[Any], params: TrainingParams
) -> PerUserSplit | None:
    """Each sampled user's last ``floor``-20% of events, by (time, item), is their test.

    Users with at least ``PER_USER_MIN_EVENTS`` events are eligible; at most
    ``params.eval_per_user_users`` of them are drawn (seeded), which bounds the cost of
    scoring, not of the state rebuild (one more snapshot of the window). Their
    impressions from their first test event on are left out too. None when no user is
    eligible or ``eval_per_user_users`` is 0.
    """
    if params.eval_per_user_users <= 0 or enc.user.size == 0:
        return None
    counts = np.bincount(enc.user, minlength=int(enc.user.max()) + 1)
    eligible = np.flatnonzero(counts >= PER_USER_MIN_EVENTS)
    if eligible.size == 0:
        return None
    rng = np.random.default_rng([params.seed, 0x9E5E])
    if eligible.size > params.eval_per_user_users:
        eligible = np.sort(rng.choice(eligible, size=params.eval_per_user_users, replace=False))
    chosen = np.zeros(counts.size, dtype=bool)
    chosen[eligible] = True
    rows = np.flatnonzero(chosen[enc.user])
    order = rows[np.lexsort((enc.item[rows], enc.ts[rows], enc.user[rows]))]
    users = enc.user[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, users.size])
    rank = np.arange(users.size) - np.repeat(starts, sizes)
    n_train = np.floor(np.repeat(sizes, sizes) * (1.0 - PER_USER_TEST_SHARE) + 1e-9)
    test = order[rank >= n_train]
    keep = np.ones(enc.user.size, dtype=bool)
    keep[test] = False
    first_test = np.full(counts.size, np.inf)
    np.minimum.at(first_test, enc.user[test], enc.ts[test])
    # An impression is kept unless its user is sampled and it is from their first test
    # event on; computed one slice at a time (float64 limits for every impression are
    # most of a gigabyte at 100M events).
    keep_imp = np.empty(enc.imp_user.size, dtype=bool)
    for part in impression_slices(enc.imp_user.size):
        imp_user = enc.imp_user[part]
        known = (imp_user >= 0) & (imp_user < counts.size)
        limit = np.where(known, first_test[np.where(known, imp_user, 0)], np.inf)
        keep_imp[part] = enc.imp_ts[part] < limit
    train_pairs = set(
        zip(
            enc.user[keep & chosen[enc.user]].tolist(),
            enc.item[keep & chosen[enc.user]].tolist(),
            strict=True,
        )
    )
    truth_rows: dict[int, set[int]] = {}
    for u, i in zip(enc.user[test].tolist(), enc.item[test].tolist(), strict=True):
        if (u, i) not in train_pairs:
            truth_rows.setdefault(u, set()).add(i)
    if not truth_rows:
        return None
    truth = {str(user_ids[u]): {str(item_ids[i]) for i in items} for u, items in truth_rows.items()}
    stats = {
        "users_eligible": int((counts >= PER_USER_MIN_EVENTS).sum()),
        "users_sampled": int(eligible.size),
        "users_evaluated": len(truth),
        "test_events": int(test.size),
        "relevant_items": int(sum(len(v) for v in truth.values())),
        "test_share": PER_USER_TEST_SHARE,
    }
    return PerUserSplit(truth, _subset(enc, keep, keep_imp), stats)


def per_user_ndcg(lists_for: ListFn, holdout: Holdout) -> dict[str, float]:
    """NDCG@k of every holdout user (for paired comparisons between two recommenders)."""
    k = holdout.k
    return {
        user: user_metrics(list(lists_for(user, k))[:k], relevant, k)["ndcg"]
        for user, relevant in holdout.truth.items()
    }


def paired_comparison(challenger: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Mean NDCG of both on the same users, and the mean per-user difference with its
    standard error: what tells a real gap from the noise of a small holdout."""
    users = sorted(challenger)
    a = np.asarray([challenger[u] for u in users], dtype=np.float64)
    b = np.asarray([baseline[u] for u in users], dtype=np.float64)
    diff = a - b
    n = int(diff.size)
    stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return {
        "users": float(n),
        "challenger": round(float(a.mean()), 6) if n else math.nan,
        "popularity": round(float(b.mean()), 6) if n else math.nan,
        "difference": round(float(diff.mean()), 6) if n else math.nan,
        "stderr": round(stderr, 6) if math.isfinite(stderr) else math.inf,
    }


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
