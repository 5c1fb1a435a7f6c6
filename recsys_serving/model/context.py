"""Per-request user context: what the state knows about one user, gathered once.

Candidate generation and feature assembly both need the user's vector, category
affinities, recent items and the neighbour scores those items imply; computing them
once per request keeps each of those steps to a few array gathers.

The aggregates are bounded by what a history may contribute, not by its length: the
co-visitation and item-kNN scores come from the ``recent_items`` newest items, the
whole-history item-kNN and EASE scores from the ``HISTORY_ITEMS`` /
``EASE_HISTORY_ITEMS`` strongest (log-damped, time-decayed weight, so strong and
recent). Each is a fixed number of compiled calls (scipy's CSR row gather and
matrix-vector product, ``bincount`` and ``ufunc.at`` scatters over the catalogue):
no per-item loop and no sort of the tens of thousands of (history item, neighbour)
pairs of a heavy user; candidate generation partitions out the few best items it
takes instead of ranking every scored one. Training builds its ranking dataset with
the same functions, so the served features are the offline ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

try:  # scipy's compiled CSR kernels (stable for years, but not public API)
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - numpy gathers do the same work
    _csc_matvec = _csr_row_index = None

from recsys_serving.model.state import FloatArray, IntArray, ModelState, Ragged

_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float32)
_ZERO_PTR = np.zeros(1, dtype=np.int64)
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
        """The ``n`` best-scored ``free`` items of a group (ties: lower row) and their
        refs, best first (the group's order by sum descending, then item ascending)."""
        items, sums, _, refs = self.group(g)
        keep = np.flatnonzero(free[items])
        pick = keep[top_ranked(items[keep], sums[keep], n)]
        return items[pick], refs[pick]

    @classmethod
    def empty(cls, n_items: int) -> NeighbourScores:
        return cls(n_items, _EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_I, (0, 0, 0))


@dataclass(frozen=True, slots=True)
class HistoryScores:
    """The item-kNN score of a user's whole history: for every item, the sum over the
    ``HISTORY_ITEMS`` strongest history items of weight x cosine similarity (the
    item-kNN baseline's own ranking score)."""

    dense: npt.NDArray[np.float64]  # (n_items,) exact sums; empty for cold users
    items: IntArray  # items with a nonzero score, ascending
    sums: FloatArray  # their scores (float32)
    # The capped history's graph rows (CSR: offsets, neighbours, values; one row per
    # source item), the source items and their weights: what explains a few items
    # (:meth:`refs`), on demand.
    sources: tuple[IntArray, IntArray, FloatArray, IntArray, FloatArray]

    @property
    def ranked(self) -> IntArray:
        """All scored items by score descending, then row ascending (candidate
        generation only needs the head of it: :meth:`best`)."""
        return self.items[np.argsort(_rank_keys(self.sums, self.items))]

    def at(self, items: IntArray) -> FloatArray:
        """Scores of ``items`` (0 where none)."""
        if not self.dense.size:
            return np.zeros(items.size, dtype=np.float32)
        return self.dense[items].astype(np.float32)

    def refs(self, rows: IntArray) -> IntArray:
        """For each item row, the history item contributing most (weight x edge weight
        in float32; ties: the lower row); -1 when none."""
        indptr, indices, data, seen, weights = self.sources
        out = np.full(rows.size, -1, dtype=np.int64)
        if not rows.size or not indices.size:
            return out
        wanted = np.zeros(self.dense.size, dtype=bool)
        wanted[rows] = True
        hit = np.flatnonzero(wanted[indices])
        if not hit.size:
            return out
        owner = np.searchsorted(indptr, hit, side="right") - 1
        nb = indices[hit]
        sc = data[hit] * weights[owner]
        src = seen[owner]
        best = np.full(self.dense.size, -np.inf, dtype=np.float32)
        np.maximum.at(best, nb, sc)
        top = sc == best[nb]
        ref = np.full(self.dense.size, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(ref, nb[top], src[top])
        found = ref[rows]
        return np.where(found == np.iinfo(np.int64).max, -1, found)

    def best(self, free: npt.NDArray[np.bool_], n: int) -> IntArray:
        """The ``n`` best-scored ``free`` items (ties: the lower row): the head of
        :attr:`ranked` without sorting every scored item (a heavy user's history
        scores thousands)."""
        keep = free[self.items]
        items = self.items[keep]
        return items[top_ranked(items, self.sums[keep], n)]

    @classmethod
    def empty(cls) -> HistoryScores:
        return cls(
            np.empty(0), _EMPTY_I, _EMPTY_F, (_ZERO_PTR, _EMPTY_I, _EMPTY_F, _EMPTY_I, _EMPTY_F)
        )


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


def descending_key(values: FloatArray) -> IntArray:
    """An int64 per float32 value that sorts in the opposite order (equal values give
    equal keys; -0.0 counts as 0.0), in [-2**31, 2**31): to build composite sort keys
    that one fast (quick)sort orders, where ``np.lexsort`` runs a slow stable sort per key."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) * -1 - 1


def _rank_keys(sums: FloatArray, items: IntArray) -> IntArray:
    """Sort keys ordering items by score descending, then row ascending (unique)."""
    return (descending_key(sums) << 32) + items


def top_ranked(items: IntArray, sums: FloatArray, n: int) -> IntArray:
    """Positions of the ``n`` items with the highest sums (ties: the lower row), best
    first, in the order a full sort would give: the ``n``-th largest sum bounds the
    head (one partition of the float sums), and only the head is sorted."""
    if n <= 0 or not items.size:
        return _EMPTY_I
    if items.size > n:
        bound = np.partition(sums, items.size - n)[items.size - n]
        head = np.flatnonzero(sums >= bound)  # ties at the bound may add a few
    else:
        head = np.arange(items.size)
    order = np.argsort(_rank_keys(sums[head], items[head]))[:n]
    return head[order]


def gather_rows(graph: Ragged, rows: IntArray) -> tuple[IntArray, IntArray, FloatArray]:
    """The entries of some rows of a graph, concatenated in row order: (offsets of
    each row, neighbours, values), a CSR matrix of ``rows.size`` rows.

    scipy's compiled CSR row gather copies them in one pass when the arrays have its
    types (they do in every state); a numpy gather (the same entries) otherwise.
    """
    lo = graph.indptr[rows]
    lengths = graph.indptr[rows + 1] - lo
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nnz = int(indptr[-1])
    if _compiled(graph, rows):
        indices = np.empty(nnz, dtype=np.int64)
        data = np.empty(nnz, dtype=np.float32)
        _csr_row_index(rows.size, rows, graph.indptr, graph.indices, graph.data, indices, data)
        return indptr, indices, data
    owner = np.repeat(np.arange(rows.size), lengths)
    pos = np.arange(nnz) - (indptr[:-1] - lo)[owner]
    return indptr, graph.indices[pos], graph.data[pos]


def weighted_sum(
    n_items: int, indptr: IntArray, indices: IntArray, data: FloatArray, weights: FloatArray
) -> npt.NDArray[np.float64]:
    """Dense (n_items,) sums over gathered rows of row weight x value, exact in float64
    (a float32 x float32 product is exact in float64), added in entry order."""
    out = np.zeros(n_items, dtype=np.float64)
    w64 = weights.astype(np.float64)
    if _csc_matvec is not None and indices.dtype == np.int64:
        # The gathered rows are the columns of a CSC (items x rows) matrix.
        _csc_matvec(n_items, w64.size, indptr, indices, data.astype(np.float64), w64, out)
        return out
    owner = np.repeat(np.arange(w64.size), np.diff(indptr))
    out += np.bincount(indices, weights=data.astype(np.float64) * w64[owner], minlength=n_items)
    return out


def _compiled(graph: Ragged, rows: IntArray) -> bool:
    return (
        _csr_row_index is not None
        and graph.indptr.dtype == graph.indices.dtype == rows.dtype == np.int64
        and graph.data.dtype == np.float32
        and rows.flags.c_contiguous
    )


def _owners(indptr: IntArray) -> IntArray:
    """For each entry of a CSR matrix, its row."""
    return np.repeat(np.arange(indptr.size - 1), np.diff(indptr))


def neighbour_scores(
    state: ModelState, recent: IntArray, recent_weights: FloatArray
) -> NeighbourScores:
    """Co-visitation and item-kNN aggregates of the recent items (see
    :class:`NeighbourScores`): contributions are ``score x recency weight`` in float32,
    summed exactly (float64, then rounded to float32).

    Dense scatters over the catalogue (``bincount`` and ``ufunc.at`` keyed by
    ``group * n_items + item``) cost a fixed number of passes; sorting the thousands of
    contributions of twenty recent items cost more than everything else together.
    """
    n = state.n_items
    if not recent.size:
        return NeighbourScores.empty(n)
    c_ptr, c_ind, c_val = gather_rows(state.covisit, recent)
    k_ptr, k_ind, k_val = gather_rows(state.item_knn, recent)
    if c_ind.size + k_ind.size == 0:
        return NeighbourScores.empty(n)
    keys = np.concatenate((c_ind, k_ind + n))
    owner = np.concatenate((_owners(c_ptr), _owners(k_ptr)))
    scores = np.concatenate((c_val, k_val)) * recent_weights[owner]
    sums = np.bincount(keys, weights=scores, minlength=2 * n)
    maxs = np.full(2 * n, -np.inf, dtype=np.float32)
    np.maximum.at(maxs, keys, scores)
    # The recent item of the largest contribution; on ties the newer (recent is
    # newest first, so the lowest position).
    top = scores == maxs[keys]
    first = np.full(2 * n, recent.size, dtype=np.int64)
    np.minimum.at(first, keys[top], owner[top])
    ukeys = np.flatnonzero(first < recent.size)
    split = int(np.searchsorted(ukeys, n))
    return NeighbourScores(
        n,
        ukeys,
        sums[ukeys].astype(np.float32),
        maxs[ukeys],
        recent[first[ukeys]],
        (0, split, int(ukeys.size)),
    )


def history_scores(state: ModelState, seen: IntArray, weights: FloatArray) -> HistoryScores:
    """Item-kNN scores of the history: sum over history items of weight x cosine."""
    return graph_scores(state.item_knn, state.n_items, seen, weights, HISTORY_ITEMS)


def graph_scores(
    graph: Ragged, n_items: int, seen: IntArray, weights: FloatArray, cap: int
) -> HistoryScores:
    """Scores of a history over an item graph: sum over the ``cap`` strongest history
    items of weight x edge weight (item-kNN: cosine; EASE: its item-item weights),
    exact in float64.

    The capped history's graph rows are gathered and weighted in one sparse
    matrix-vector product (compiled; its cost is bounded by ``cap`` rows, not by the
    length of the history), accumulated densely over the catalogue.
    """
    if not seen.size or not graph.indices.size:
        return HistoryScores.empty()
    if seen.size > cap:
        keep = np.sort(np.argpartition(-weights, cap - 1)[:cap])
        seen, weights = seen[keep], weights[keep]
    indptr, indices, data = gather_rows(graph, seen)
    dense = weighted_sum(n_items, indptr, indices, data, weights)
    items = np.flatnonzero(dense)
    sums = dense[items].astype(np.float32)
    return HistoryScores(dense, items, sums, (indptr, indices, data, seen, weights))
