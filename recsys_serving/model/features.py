"""THE feature function: one row of ranking features per (user, candidate item).

The ranking dataset (training) and every served request call
:func:`assemble_features` with a :class:`~recsys_serving.model.state.ModelState`
and a :class:`~recsys_serving.model.context.UserContext`, so train/serve skew can
only come from the state, which the bundle carries verbatim.

Features are finite by construction: "unknown" is an explicit sentinel plus a flag
(``item_age_days = -1`` when the catalogue has no publication date, ``user_known =
0`` for cold users), never NaN, so a NaN reaching the ranker is always a bug and the
blocking asset check on the ranking dataset can treat it as one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from recsys_serving.model.context import UserContext
from recsys_serving.model.state import IntArray, ModelState

# Per-item columns of ModelState.item_table, computed at the state's as_of.
ITEM_COLUMNS: tuple[str, ...] = (
    "log_pop",  # log1p of the weighted interaction count over the window
    "log_pop_recent",  # the same over the recent window
    "log_pop_decayed",  # log1p of exponentially decayed weight (popularity half-life)
    "trend",  # log ratio of recent share to overall share (rising items > 0)
    "ctr",  # clicks / impressions, Bayesian-smoothed toward the global CTR
    "log_impressions",
    "log_users",  # distinct users who interacted
    "age_days",  # as_of - published_at; -1 when unknown
    "first_seen_days",  # as_of - first interaction; -1 when none
    "last_seen_days",  # as_of - last interaction; -1 when none
    "mean_rating",  # mean rating value; 0 when the item has no ratings
    "has_history",  # 1 when the item has interactions before as_of
)
# Per-user columns of ModelState.user_table.
USER_COLUMNS: tuple[str, ...] = (
    "log_events",
    "log_events_recent",
    "days_since_last",  # as_of - last interaction; -1 when none
    "log_items",  # distinct items interacted with
    "ctr",  # clicks / impressions, smoothed
)
# Features that depend on the (user, item) pair.
PAIR_FEATURES: tuple[str, ...] = (
    "als_score",  # user factor . item factor (0 for users without a vector)
    "als_cosine",
    "covis_sum",  # co-visitation with the user's recent items, recency-weighted
    "covis_max",
    "knn_sum",  # item-item cosine similarity to the user's recent items, recency-weighted
    "knn_max",
    "knn_history",  # item-kNN score over the whole history (weighted by interaction strength)
    # The same three scores relative to the user's best (scales differ between users;
    # trees split on absolute values, so per-user ratios are easier to use).
    "covis_rel",
    "knn_rel",
    "knn_history_rel",
    "last_item_sim",  # cosine to the user's newest item
    "recent_sim",  # cosine to the mean of the user's recent items
    "cat_affinity",  # the user's share of interactions in the item's categories
    "cat_affinity_recent",  # the same over the recent window
    "user_known",  # 1 when the state has history for the user
    "ease_score",  # EASE (closed-form linear item model) score of the whole history
    "ease_rel",  # the same relative to the user's best EASE score
    # The item's share of all interactions in the time buckets around the user's last
    # event (popularity at the user's own time), and its log ratio to the share in
    # the newest buckets (now): taste vs recency for users idle for months.
    "item_share_at_user",
    "item_share_user_vs_now",
    # Days from the item's release (publication date, else its first interaction) to
    # the user's last event: negative = released after the user left, small positive
    # = new when the user was here; UNKNOWN_AGE when either is unknown.
    "item_age_at_user",
)
FEATURE_NAMES: tuple[str, ...] = (
    PAIR_FEATURES
    + tuple(f"item_{c}" for c in ITEM_COLUMNS)
    + tuple(f"user_{c}" for c in USER_COLUMNS)
)
N_FEATURES = len(FEATURE_NAMES)
MAX_CATEGORIES_PER_ITEM = 8
# Smoothing of the time-bucket shares (a share of one in a million).
SHARE_EPS = 1e-6
# item_age_at_user when the release or the user's last event is unknown ("very old").
UNKNOWN_AGE = 100_000.0


def padded_categories(state: ModelState) -> npt.NDArray[np.int64]:
    """Item categories as a fixed-width matrix (``n_categories`` pads), cached on the state.

    Gathering a (candidates x width) block is much faster per request than slicing a
    ragged structure item by item.
    """
    cached = getattr(state, "_padded_categories", None)
    if cached is not None:
        return cached
    ragged = state.item_categories
    lengths = np.diff(ragged.indptr)
    width = int(min(max(int(lengths.max(initial=0)), 1), MAX_CATEGORIES_PER_ITEM))
    out = np.full((state.n_items, width), state.n_categories, dtype=np.int64)
    for slot in range(width):
        has = lengths > slot
        out[has, slot] = ragged.indices[ragged.indptr[:-1][has] + slot]
    object.__setattr__(state, "_padded_categories", out)
    return out


def item_norms(state: ModelState) -> npt.NDArray[np.float32]:
    """Euclidean norms of the item factors, cached on the state (a row's norm is the
    same computed alone or with the whole matrix)."""
    cached = getattr(state, "_item_norms", None)
    if cached is None:
        cached = np.linalg.norm(state.item_factors, axis=1).astype(np.float32)
        object.__setattr__(state, "_item_norms", cached)
    return cached


def _cosine(
    vectors: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    unit: npt.NDArray[np.float32] | None,
) -> npt.NDArray[np.float32]:
    if unit is None:
        return np.zeros(vectors.shape[0], dtype=np.float32)
    return (vectors @ unit) / np.maximum(norms, 1e-12)


def time_totals(state: ModelState) -> npt.NDArray[np.float64]:
    """Interaction weight per time bucket over all items, cached on the state."""
    cached = getattr(state, "_time_totals", None)
    if cached is None:
        cached = state.item_time_counts.sum(axis=0, dtype=np.float64)
        object.__setattr__(state, "_time_totals", cached)
    return cached


def era_shares(
    state: ModelState, items: IntArray, era: tuple[int, int] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(share at the user's time, log ratio of that share to the share now) per item.

    "Now" is as many newest buckets as the user's era spans; 0 and 0 for cold users.
    """
    n = items.size
    buckets = state.item_time_counts.shape[1]
    if era is None or buckets == 0 or n == 0:
        return np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    lo, hi = era
    totals = time_totals(state)
    counts = state.item_time_counts[items]
    then = counts[:, lo:hi].sum(axis=1, dtype=np.float64) / max(float(totals[lo:hi].sum()), 1e-9)
    width = hi - lo
    now = counts[:, buckets - width :].sum(axis=1, dtype=np.float64) / max(
        float(totals[buckets - width :].sum()), 1e-9
    )
    ratio = np.log((then + SHARE_EPS) / (now + SHARE_EPS))
    return then.astype(np.float32), ratio.astype(np.float32)


def release_times(state: ModelState) -> npt.NDArray[np.float64]:
    """Each item's release: its publication date, else its first interaction before
    ``as_of``, else NaN; never after ``as_of`` (the served state lists items the
    catalogue publishes after the last event, which no training state has: they look
    just released, as ``item_age_days`` has them); cached on the state."""
    cached = getattr(state, "_release_times", None)
    if cached is None:
        first = state.item_column("first_seen_days").astype(np.float64)
        seen_at = np.where(first >= 0, state.as_of - first * 86_400.0, np.nan)
        cached = np.where(np.isfinite(state.published_at), state.published_at, seen_at)
        cached = np.where(np.isfinite(cached), np.minimum(cached, state.as_of), cached)
        object.__setattr__(state, "_release_times", cached)
    return cached


def age_at_user(
    state: ModelState, items: IntArray, last_ts: float | None
) -> npt.NDArray[np.float32]:
    """Days from each item's release to the user's last event (UNKNOWN_AGE if unknown)."""
    if last_ts is None:
        return np.full(items.size, UNKNOWN_AGE, dtype=np.float32)
    release = release_times(state)[items]
    age = (last_ts - release) / 86_400.0
    return np.where(np.isfinite(age), age, UNKNOWN_AGE).astype(np.float32)


def _top(values: npt.NDArray[np.float32]) -> float:
    """The user's largest aggregate score (over every neighbour, not just candidates,
    so the ratio does not depend on which candidates were drawn); 1 when none."""
    top = float(values.max()) if values.size else 0.0
    return top if top > 0 else 1.0


def assemble_features(
    state: ModelState, ctx: UserContext, items: IntArray
) -> npt.NDArray[np.float32]:
    """The (len(items), N_FEATURES) float32 feature matrix, columns in FEATURE_NAMES order."""
    items = np.asarray(items, dtype=np.int64)
    n = items.size
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    vectors = state.item_factors[items]
    norms = item_norms(state)[items]
    if ctx.vector is not None:
        als = vectors @ ctx.vector
        user_norm = float(np.sqrt(ctx.vector.dot(ctx.vector)))  # np.linalg.norm's formula
        cosine = als / np.maximum(norms * user_norm, 1e-12)
    else:
        als = cosine = np.zeros(n, dtype=np.float32)
    # Rows: co-visitation, item-kNN of the recent items (context.NeighbourScores).
    sums, maxs = ctx.neighbours.lookup(items)
    covis_sum, knn_sum = sums
    history = ctx.history.at(items)
    out[:, 0] = als
    out[:, 1] = cosine
    out[:, 2] = covis_sum
    out[:, 3] = maxs[0]
    out[:, 4] = knn_sum
    out[:, 5] = maxs[1]
    out[:, 6] = history
    out[:, 7] = covis_sum / ctx.neighbours.tops[0]
    out[:, 8] = knn_sum / ctx.neighbours.tops[1]
    out[:, 9] = history / _top(ctx.history.sums)
    out[:, 10] = _cosine(vectors, norms, ctx.last_vector)
    out[:, 11] = _cosine(vectors, norms, ctx.recent_vector)
    # Both affinities in one gather: (2, n, width) summed over each item's categories.
    padded = np.zeros((2, state.n_categories + 1), dtype=np.float32)  # the pad scores 0
    padded[0, :-1] = ctx.affinity
    padded[1, :-1] = ctx.affinity_recent
    out[:, 12:14] = padded[:, padded_categories(state)[items]].sum(axis=2).T
    out[:, 14] = 1.0 if ctx.known else 0.0
    ease = ctx.ease.at(items)
    out[:, 15] = ease
    out[:, 16] = ease / _top(ctx.ease.sums)
    out[:, 17], out[:, 18] = era_shares(state, items, ctx.era)
    out[:, 19] = age_at_user(state, items, ctx.last_ts)
    p = len(PAIR_FEATURES)
    out[:, p : p + len(ITEM_COLUMNS)] = state.item_table[items]
    u0 = p + len(ITEM_COLUMNS)
    if ctx.row is not None:
        out[:, u0:] = state.user_table[ctx.row]
    else:
        out[:, u0:] = cold_user_row(state)
    return out


def cold_user_row(state: ModelState) -> npt.NDArray[np.float32]:
    """The user-table row of a user the state has no history for.

    Counts are zero, recency is the "unknown" sentinel and the CTR is the smoothing
    prior, exactly what training writes for users without events before ``as_of``.
    """
    row = np.zeros(len(USER_COLUMNS), dtype=np.float32)
    row[USER_COLUMNS.index("days_since_last")] = -1.0
    row[USER_COLUMNS.index("ctr")] = float(state.params.get("user_ctr_prior", 0.0))
    return row
