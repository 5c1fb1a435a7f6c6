"""Per-request user context: what the state knows about one user, gathered once.

Candidate generation and feature assembly both need the user's vector, category
affinities, recent items and the neighbour scores those items imply; computing them
once per request keeps each of those steps to a few array gathers.

The two aggregates over the recent items (co-visitation and item-kNN) are computed
together: one gather per graph and one sort over all their entries, keyed by
``group * n_items + item``, instead of a sort each. The item-kNN score of the whole
history (many more entries) is accumulated densely over the catalogue instead, which
is cheaper than sorting it. Either way a request costs a fixed number of numpy
calls, which is what bounds its CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys_serving.model.state import FloatArray, IntArray, ModelState, Ragged

_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float32)
# History items (strongest first) whose neighbours make a user's item-kNN score.
HISTORY_ITEMS = 100
# History items (strongest first) whose EASE rows make a user's EASE score: EASE sums
# over the whole history, so the cap is wider (200 x 200 neighbours is still one
# bincount of 40k entries).
EASE_HISTORY_ITEMS = 200
# Time buckets on each side of the one holding a user's last event that make "the
# user's time" (ModelState.item_time_counts).
ERA_HALF_WIDTH = 1
# Keys of a user document (from the document store) that may name preferred
# categories; used only for users without history (cold start).
DOC_CATEGORY_KEYS = ("categories", "interests", "favorite_categories", "preferred_categories")
# The aggregates of a NeighbourScores table, in key order.
COVIS, KNN = range(2)


@dataclass(frozen=True, slots=True)
class NeighbourScores:
    """The neighbour aggregates of a user's recent items, in one table sorted by
    ``group * n_items + item``.

    For each (group, item): the recency-weighted sum of the contributions, the largest
    single contribution and the recent item that made it (ties: the newer one).
    Groups: :data:`COVIS` (co-visited with the recent items), :data:`KNN` (cosine
    neighbours of the recent items).
    """

    n_items: int
    keys: IntArray
    sums: FloatArray
    maxs: FloatArray
    refs: IntArray
    bounds: tuple[int, int, int]  # where each group starts in ``keys``, and the end
    # The same entries by group, then sum descending, then item ascending (the order
    # candidate generation takes them in): items and refs.
    ranked_items: IntArray
    ranked_refs: IntArray

    def group(self, g: int) -> tuple[IntArray, FloatArray, FloatArray, IntArray]:
        """(items, sums, maxs, refs) of one group, items ascending."""
        lo, hi = self.bounds[g], self.bounds[g + 1]
        items = self.keys[lo:hi] - g * self.n_items if g else self.keys[lo:hi]
        return items, self.sums[lo:hi], self.maxs[lo:hi], self.refs[lo:hi]

    def lookup(self, items: IntArray) -> tuple[FloatArray, FloatArray]:
        """(sums, maxs) of both groups for ``items``: arrays of shape (2, len(items)),
        0 where the item has no entry."""
        n = items.size
        sums = np.zeros((2, n), dtype=np.float32)
        maxs = np.zeros((2, n), dtype=np.float32)
        if self.keys.size and n:
            wanted = np.concatenate((items, items + self.n_items))
            pos = np.minimum(np.searchsorted(self.keys, wanted), self.keys.size - 1)
            hit = self.keys[pos] == wanted
            sums.ravel()[hit] = self.sums[pos[hit]]
            maxs.ravel()[hit] = self.maxs[pos[hit]]
        return sums, maxs

    def best(self, g: int, free: npt.NDArray[np.bool_], n: int) -> tuple[IntArray, IntArray]:
        """The ``n`` best-scored ``free`` items of a group (ties: lower row) and their refs."""
        lo, hi = self.bounds[g], self.bounds[g + 1]
        items = self.ranked_items[lo:hi]
        pick = first_free(items, free, n)
        return items[pick], self.ranked_refs[lo:hi][pick]

    @classmethod
    def empty(cls, n_items: int) -> NeighbourScores:
        return cls(n_items, _EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_I, (0, 0, 0), _EMPTY_I, _EMPTY_I)


@dataclass(frozen=True, slots=True)
class HistoryScores:
    """The item-kNN score of a user's whole history: for every item, the sum over the
    ``HISTORY_ITEMS`` strongest history items of weight x cosine similarity (the
    item-kNN baseline's own ranking score)."""

    dense: npt.NDArray[np.float64]  # (n_items,) exact sums; empty for cold users
    items: IntArray  # items with a nonzero score, ascending
    sums: FloatArray  # their scores (float32)
    ranked: IntArray  # the same items by score descending, then row ascending
    # (neighbour, contribution, source item) of every entry, to explain a few items
    entries: tuple[IntArray, FloatArray, IntArray]

    def at(self, items: IntArray) -> FloatArray:
        """Scores of ``items`` (0 where none)."""
        if not self.dense.size:
            return np.zeros(items.size, dtype=np.float32)
        return self.dense[items].astype(np.float32)

    def refs(self, rows: IntArray) -> IntArray:
        """For each item row, the history item contributing most (ties: the lower row);
        -1 when none."""
        neighbour, score, source = self.entries
        out = np.full(rows.size, -1, dtype=np.int64)
        if not rows.size or not neighbour.size:
            return out
        wanted = np.zeros(self.dense.size, dtype=bool)
        wanted[rows] = True
        hit = wanted[neighbour]
        nb, sc, src = neighbour[hit], score[hit], source[hit]
        best = np.full(self.dense.size, -np.inf, dtype=np.float32)
        np.maximum.at(best, nb, sc)
        top = sc == best[nb]
        ref = np.full(self.dense.size, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(ref, nb[top], src[top])
        found = ref[rows]
        return np.where(found == np.iinfo(np.int64).max, -1, found)

    def best(self, free: npt.NDArray[np.bool_], n: int) -> IntArray:
        """The ``n`` best-scored ``free`` items (ties: the lower row)."""
        return self.ranked[first_free(self.ranked, free, n)]

    @classmethod
    def empty(cls) -> HistoryScores:
        return cls(np.empty(0), _EMPTY_I, _EMPTY_F, _EMPTY_I, (_EMPTY_I, _EMPTY_F, _EMPTY_I))


@dataclass
class UserContext:
    """One user's view of a :class:`ModelState` (``row is None`` for unknown users)."""

    row: int | None
    vector: FloatArray | None
    affinity: FloatArray  # (n_categories,) shares over the whole window
    affinity_recent: FloatArray  # (n_categories,) shares over the recent window
    seen: IntArray  # item rows, sorted
    recent: IntArray  # newest first
    recent_weights: FloatArray
    neighbours: NeighbourScores
    history: HistoryScores
    covis_items: IntArray  # sorted item rows co-visited with the recent items
    covis_sum: FloatArray
    covis_max: FloatArray
    covis_ref: IntArray  # for each covis item, the recent item contributing most
    knn_items: IntArray  # sorted item rows similar (cosine) to the recent items
    knn_sum: FloatArray
    knn_max: FloatArray
    knn_ref: IntArray
    # The item-kNN baseline's own score over the whole history (``history``), for the
    # items that have one.
    history_items: IntArray
    history_sum: FloatArray
    last_vector: FloatArray | None  # unit vector of the newest item
    recent_vector: FloatArray | None  # unit mean vector of the recent items
    # EASE score of the whole history (empty for cold users or without an EASE graph)
    ease: HistoryScores
    # Time buckets [lo, hi) around the user's last event (None for cold users).
    era: tuple[int, int] | None
    # Epoch seconds of the user's last event before as_of (None for cold users).
    last_ts: float | None = None

    @property
    def known(self) -> bool:
        return self.row is not None

    def history_refs(self, rows: list[int]) -> list[int]:
        """For each item row, the history item contributing most to its kNN score."""
        return self.history.refs(np.asarray(rows, dtype=np.int64)).tolist()

    def top_categories(self, n: int) -> IntArray:
        """The user's strongest categories, recent behaviour first."""
        score = self.affinity_recent + 0.5 * self.affinity
        if not score.any():
            return _EMPTY_I
        order = np.argsort(-score, kind="stable")
        return order[: min(n, int((score > 0).sum()))].astype(np.int64)


def _unit(v: FloatArray) -> FloatArray | None:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm <= 1e-12:
        return None
    return (v / norm).astype(np.float32)


def _dense(state: ModelState, row: int, which: str) -> FloatArray:
    out = np.zeros(state.n_categories, dtype=np.float32)
    idx, val = getattr(state, which).row(row)
    out[idx] = val
    return out


def doc_categories(state: ModelState, user_doc: Mapping[str, Any] | None) -> IntArray:
    """Known category rows named by a user document (any of :data:`DOC_CATEGORY_KEYS`)."""
    if not user_doc:
        return _EMPTY_I
    rows: list[int] = []
    for key in DOC_CATEGORY_KEYS:
        value = user_doc.get(key)
        names: Sequence[Any] = [value] if isinstance(value, str) else (value or [])
        if not isinstance(names, list | tuple):
            continue
        for name in names:
            row = state.category_index.get(str(name))
            if row is not None and row not in rows:
                rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def user_context(
    state: ModelState, user_id: str, user_doc: Mapping[str, Any] | None = None
) -> UserContext:
    row = state.user_row(user_id)
    if row is None:
        affinity = np.zeros(state.n_categories, dtype=np.float32)
        named = doc_categories(state, user_doc)
        if named.size:
            affinity[named] = 1.0 / named.size
        return UserContext(
            row=None,
            vector=None,
            affinity=affinity,
            affinity_recent=affinity.copy(),
            seen=_EMPTY_I,
            recent=_EMPTY_I,
            recent_weights=_EMPTY_F,
            neighbours=NeighbourScores.empty(state.n_items),
            history=HistoryScores.empty(),
            covis_items=_EMPTY_I,
            covis_sum=_EMPTY_F,
            covis_max=_EMPTY_F,
            covis_ref=_EMPTY_I,
            knn_items=_EMPTY_I,
            knn_sum=_EMPTY_F,
            knn_max=_EMPTY_F,
            knn_ref=_EMPTY_I,
            history_items=_EMPTY_I,
            history_sum=_EMPTY_F,
            last_vector=None,
            recent_vector=None,
            ease=HistoryScores.empty(),
            era=None,
        )
    vector = state.user_factors[row]
    seen, seen_weights = state.seen.row(row)
    recent, weights = state.recent.row(row)
    table = neighbour_scores(state, recent, weights)
    covis_items, covis_sum, covis_max, covis_ref = table.group(COVIS)
    knn_items, knn_sum, knn_max, knn_ref = table.group(KNN)
    history = history_scores(state, seen, seen_weights)
    factors = state.item_factors
    last_vector = recent_vector = None
    if recent.size:
        last_vector = _unit(factors[recent[0]])
        recent_vector = _unit((factors[recent] * weights[:, None]).sum(axis=0))
    return UserContext(
        row=row,
        vector=vector if np.any(vector) else None,
        affinity=_dense(state, row, "user_affinity"),
        affinity_recent=_dense(state, row, "user_affinity_recent"),
        seen=seen,
        recent=recent,
        recent_weights=weights,
        neighbours=table,
        history=history,
        covis_items=covis_items,
        covis_sum=covis_sum,
        covis_max=covis_max,
        covis_ref=covis_ref,
        knn_items=knn_items,
        knn_sum=knn_sum,
        knn_max=knn_max,
        knn_ref=knn_ref,
        history_items=history.items,
        history_sum=history.sums,
        last_vector=last_vector,
        recent_vector=recent_vector,
        ease=graph_scores(state.ease, state.n_items, seen, seen_weights, EASE_HISTORY_ITEMS),
        era=user_era(state, row),
        last_ts=user_last_ts(state, row),
    )


def user_last_ts(state: ModelState, row: int) -> float | None:
    """When the user was last active (epoch seconds), from the user table."""
    if "days_since_last" not in state.user_columns:
        return None
    days = float(state.user_table[row, state.user_columns.index("days_since_last")])
    return None if days < 0 else state.as_of - days * 86_400.0


def user_era(state: ModelState, row: int) -> tuple[int, int] | None:
    """The time buckets around the user's last event before ``as_of``."""
    edges = state.time_edges
    buckets = edges.size - 1
    last = user_last_ts(state, row)
    if buckets <= 0 or last is None:
        return None
    bucket = int(np.clip(np.searchsorted(edges, last, side="right") - 1, 0, buckets - 1))
    return max(bucket - ERA_HALF_WIDTH, 0), min(bucket + ERA_HALF_WIDTH + 1, buckets)


def _gather(graph: Ragged, rows: IntArray) -> tuple[IntArray, IntArray]:
    """Positions of every entry of ``rows`` in ``graph`` and the index of the row each
    came from, in row order."""
    lo = graph.indptr[rows]
    lengths = graph.indptr[rows + 1] - lo
    owner = np.repeat(np.arange(rows.size), lengths)
    # entry j of row i sits at lo[i] + j; j = (running index) - (entries before row i)
    skip = np.cumsum(lengths) - lengths - lo
    return np.arange(owner.size) - skip[owner], owner


def first_free(order: IntArray, free: npt.NDArray[np.bool_], n: int) -> IntArray:
    """Positions of the first ``n`` entries of ``order`` (item rows) that are ``free``."""
    if n <= 0:
        return _EMPTY_I
    # Usually most entries are free: look at a short head first.
    head = order[: 4 * n + 64]
    pos = np.flatnonzero(free[head])[:n]
    if pos.size < n and head.size < order.size:
        rest = np.flatnonzero(free[order[head.size :]])[: n - pos.size] + head.size
        pos = np.concatenate([pos, rest])
    return pos


def _run_starts(sorted_keys: IntArray) -> IntArray:
    """Where each run of equal values starts in a sorted array."""
    starts = np.empty(sorted_keys.size, dtype=bool)
    starts[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def descending_key(values: FloatArray) -> IntArray:
    """An int64 per float32 value that sorts in the opposite order (equal values give
    equal keys; -0.0 counts as 0.0), in [-2**31, 2**31): to build composite sort keys
    that one fast (quick)sort orders, where ``np.lexsort`` runs a slow stable sort per key."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) * -1 - 1


def neighbour_scores(
    state: ModelState, recent: IntArray, recent_weights: FloatArray
) -> NeighbourScores:
    """Co-visitation and item-kNN aggregates of the recent items (see
    :class:`NeighbourScores`): contributions are ``score x recency weight`` in float32,
    summed in float32 from the largest down."""
    n = state.n_items
    covis, knn = state.covisit, state.item_knn
    pos_c, own_c = _gather(covis, recent)
    pos_k, own_k = _gather(knn, recent)
    if pos_c.size + pos_k.size == 0:
        return NeighbourScores.empty(n)
    keys = np.concatenate((covis.indices[pos_c], knn.indices[pos_k] + n))
    owner = np.concatenate((own_c, own_k))
    scores = np.concatenate((covis.data[pos_c], knn.data[pos_k])) * recent_weights[owner]
    # By key, then largest contribution first (one sort of a composite key).
    composite = (keys << 32) + (descending_key(scores) + 2**31)
    order = np.argsort(composite)
    composite = composite[order]
    first = _run_starts(composite >> 32)
    if np.any(composite[1:] == composite[:-1]):
        # Equal contributions to one item: the newer recent item explains it, as a
        # stable sort would have ordered them (rare; pay for the stable sort then).
        order = np.lexsort((-scores, keys))
    ukeys = keys[order[first]]
    scores = scores[order]
    sums = np.add.reduceat(scores, first)
    refs = recent[owner[order[first]]]
    split = int(np.searchsorted(ukeys, n))
    # Candidate order within each group: sum descending, then item (one more sort).
    items = ukeys.copy()
    items[split:] -= n
    group = np.zeros(ukeys.size, dtype=np.int64)
    group[split:] = 1 << 62
    ranked = np.argsort(group + ((descending_key(sums) + 2**31) << 30) + items)
    return NeighbourScores(
        n,
        ukeys,
        sums,
        scores[first],
        refs,
        (0, split, int(ukeys.size)),
        items[ranked],
        refs[ranked],
    )


def history_scores(state: ModelState, seen: IntArray, weights: FloatArray) -> HistoryScores:
    """Item-kNN scores of the history: sum over history items of weight x cosine."""
    return graph_scores(state.item_knn, state.n_items, seen, weights, HISTORY_ITEMS)


def graph_scores(
    graph: Ragged, n_items: int, seen: IntArray, weights: FloatArray, cap: int
) -> HistoryScores:
    """Scores of a history over an item graph: sum over the ``cap`` strongest history
    items of weight x edge weight (item-kNN: cosine; EASE: its item-item weights).

    Dense accumulation over the catalogue (one bincount, exact in float64) is cheaper
    than sorting the tens of thousands of (history item, neighbour) pairs of a heavy
    user.
    """
    if not seen.size or not graph.indices.size:
        return HistoryScores.empty()
    if seen.size > cap:
        keep = np.sort(np.argpartition(-weights, cap - 1)[:cap])
        seen, weights = seen[keep], weights[keep]
    pos, owner = _gather(graph, seen)
    neighbour = graph.indices[pos]
    score = graph.data[pos] * weights[owner]
    dense = np.bincount(neighbour, weights=score, minlength=n_items)
    items = np.flatnonzero(dense)
    sums = dense[items].astype(np.float32)
    ranked = items[np.argsort((descending_key(sums) << 32) + items)]
    return HistoryScores(dense, items, sums, ranked, (neighbour, score, seen[owner]))
