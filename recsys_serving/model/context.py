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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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
    """The neighbour aggregates of a user's recent items, dense over ``group * n_items
    + item`` (two groups: :data:`COVIS`, co-visited with the recent items, and
    :data:`KNN`, cosine neighbours of the recent items).

    For each (group, item): the recency-weighted sum of the contributions (``sums``,
    0 without any) and the largest single contribution (``maxs``, -inf without any).
    The recent item that made the largest one (ties: the newer) is what explains a
    candidate; it is looked up only for the few items that need it (:meth:`refs`),
    from the gathered contributions kept here (``keys``, ``scores``, and the number
    of entries each recent item gave to each group, ``lengths``).
    """

    n_items: int
    sums: FloatArray
    maxs: FloatArray
    keys: IntArray
    scores: FloatArray
    lengths: IntArray  # (2 * len(recent),): covis entries per recent item, then knn
    recent: IntArray
    tops: tuple[float, float]  # each group's largest sum, 1 when none is positive

    @property
    def live(self) -> bool:
        return bool(self.keys.size)

    def entries(self, g: int) -> IntArray:
        """Items with an entry in a group, ascending."""
        if not self.live:
            return _EMPTY_I
        n = self.n_items
        return (self.maxs[g * n : (g + 1) * n] > -np.inf).nonzero()[0]

    def group(self, g: int) -> tuple[IntArray, FloatArray, FloatArray, IntArray]:
        """(items, sums, maxs, refs) of one group, items ascending."""
        items = self.entries(g)
        keys = items + g * self.n_items
        return items, self.sums[keys], self.maxs[keys], self.refs(g, items)

    def lookup(self, items: IntArray) -> tuple[FloatArray, FloatArray]:
        """(sums, maxs) of both groups for ``items``: arrays of shape (2, len(items)),
        0 where the item has no entry."""
        if not self.live:
            zeros = np.zeros((2, items.size), dtype=np.float32)
            return zeros, zeros.copy()
        n = self.n_items
        sums = self.sums.reshape(2, n)[:, items]
        maxs = self.maxs.reshape(2, n)[:, items]
        return sums, np.where(maxs > -np.inf, maxs, np.float32(0.0))

    def refs(self, g: int, items: IntArray) -> IntArray:
        """For each item, the recent item of its largest contribution in group ``g``
        (ties: the newer, i.e. earlier in ``recent``); -1 without any."""
        out = np.full(items.size, -1, dtype=np.int64)
        if not self.live or not items.size:
            return out
        keys = items + g * self.n_items
        wanted = np.zeros(self.sums.size, dtype=bool)
        wanted[keys] = True
        hit = wanted[self.keys].nonzero()[0]
        if not hit.size:
            return out
        top = hit[self.scores[hit] == self.maxs[self.keys[hit]]]
        # Entries run recent item by recent item (the covis block, then the knn one), so
        # a key's first top entry is the newest recent item's (np.unique's first index).
        found, first = np.unique(self.keys[top], return_index=True)
        block = np.searchsorted(np.cumsum(self.lengths), top[first], side="right")
        pos = np.minimum(np.searchsorted(found, keys), found.size - 1)
        return np.where(found[pos] == keys, self.recent[block[pos] % self.recent.size], -1)

    def top(self, g: int, free: npt.NDArray[np.bool_], n: int) -> IntArray:
        """The ``n`` best-scored ``free`` items of a group (ties: lower row), best first
        (the group's order by sum descending, then item ascending)."""
        if not self.live:
            return _EMPTY_I
        size = self.n_items
        lo = g * size
        items = (free & (self.maxs[lo : lo + size] > -np.inf)).nonzero()[0]
        return items[top_ranked(items, self.sums[lo + items], n)]

    def best(self, g: int, free: npt.NDArray[np.bool_], n: int) -> tuple[IntArray, IntArray]:
        """:meth:`top` and the refs of those items."""
        picked = self.top(g, free, n)
        return picked, self.refs(g, picked)

    def explainer(self, g: int) -> Callable[[IntArray], IntArray]:
        """Item rows -> their refs in group ``g`` (what candidates keep to explain the
        few items an answer shows)."""
        return partial(self.refs, g)

    @classmethod
    def empty(cls, n_items: int) -> NeighbourScores:
        return cls(n_items, _EMPTY_F, _EMPTY_F, _EMPTY_I, _EMPTY_F, _EMPTY_I, _EMPTY_I, (1.0, 1.0))


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
        hit = wanted[indices].nonzero()[0]
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

    # The neighbour aggregates as (items ascending, sums, maxs, refs) per group, and the
    # whole-history kNN scores (the item-kNN baseline's own ranking score): views for
    # tests and tools; requests use ``neighbours`` and ``history`` directly.
    @property
    def covis_items(self) -> IntArray:
        return self.neighbours.group(COVIS)[0]

    @property
    def covis_sum(self) -> FloatArray:
        return self.neighbours.group(COVIS)[1]

    @property
    def covis_max(self) -> FloatArray:
        return self.neighbours.group(COVIS)[2]

    @property
    def covis_ref(self) -> IntArray:
        return self.neighbours.group(COVIS)[3]

    @property
    def knn_items(self) -> IntArray:
        return self.neighbours.group(KNN)[0]

    @property
    def knn_sum(self) -> FloatArray:
        return self.neighbours.group(KNN)[1]

    @property
    def knn_max(self) -> FloatArray:
        return self.neighbours.group(KNN)[2]

    @property
    def knn_ref(self) -> IntArray:
        return self.neighbours.group(KNN)[3]

    @property
    def history_items(self) -> IntArray:
        return self.history.items

    @property
    def history_sum(self) -> FloatArray:
        return self.history.sums

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
    norm = float(np.sqrt(v.dot(v)))  # np.linalg.norm's own formula, without its wrapper
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
            last_vector=None,
            recent_vector=None,
            ease=HistoryScores.empty(),
            era=None,
        )
    vector = state.user_factors[row]
    seen, seen_weights = state.seen.row(row)
    recent, weights = state.recent.row(row)
    table = neighbour_scores(state, recent, weights)
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
    bucket = min(max(int(edges.searchsorted(last, side="right")) - 1, 0), buckets - 1)
    return max(bucket - ERA_HALF_WIDTH, 0), min(bucket + ERA_HALF_WIDTH + 1, buckets)


def first_free(order: IntArray, free: npt.NDArray[np.bool_], n: int) -> IntArray:
    """Positions of the first ``n`` entries of ``order`` (item rows) that are ``free``."""
    if n <= 0:
        return _EMPTY_I
    # Usually most entries are free: look at a short head first.
    head = order[: 4 * n + 64]
    pos = free[head].nonzero()[0][:n]
    if pos.size < n and head.size < order.size:
        rest = free[order[head.size :]].nonzero()[0][: n - pos.size] + head.size
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
        head = (sums >= bound).nonzero()[0]  # ties at the bound may add a few
        # The head is a few dozen entries: a two-key sort of it costs less than the
        # arithmetic of composite keys (-0.0 sorts with 0.0 here too).
        return head[np.lexsort((items[head], -sums[head]))[:n]]
    return np.lexsort((items, -sums))[:n]


def gather_rows(graph: Ragged, rows: IntArray) -> tuple[IntArray, IntArray, FloatArray]:
    """The entries of some rows of a graph, concatenated in row order: (offsets of
    each row, neighbours, values), a CSR matrix of ``rows.size`` rows.

    scipy's compiled CSR row gather copies them in one pass when the arrays have its
    types (they do in every state); a numpy gather (the same entries) otherwise.
    """
    lengths = row_lengths(graph)[rows]
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nnz = int(indptr[-1])
    if _compiled(graph, rows):
        indices = np.empty(nnz, dtype=np.int64)
        data = np.empty(nnz, dtype=np.float32)
        _csr_row_index(rows.size, rows, graph.indptr, graph.indices, graph.data, indices, data)
        return indptr, indices, data
    lo = graph.indptr[rows]
    owner = np.repeat(np.arange(rows.size), lengths)
    pos = np.arange(nnz) - (indptr[:-1] - lo)[owner]
    return indptr, graph.indices[pos], graph.data[pos]


def row_lengths(graph: Ragged) -> IntArray:
    """Entries per row of a graph, computed once per graph (kept on it, with the
    offsets they were computed from)."""
    found: tuple[IntArray, IntArray] | None = getattr(graph, "_lengths", None)
    if found is None or found[0] is not graph.indptr:
        found = (graph.indptr, np.diff(graph.indptr))
        object.__setattr__(graph, "_lengths", found)
    return found[1]


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


def neighbour_scores(
    state: ModelState, recent: IntArray, recent_weights: FloatArray
) -> NeighbourScores:
    """Co-visitation and item-kNN aggregates of the recent items (see
    :class:`NeighbourScores`): contributions are ``score x recency weight`` in float32,
    summed exactly (float64, then rounded to float32).

    Two dense scatters over the catalogue (``bincount`` and ``maximum.at`` keyed by
    ``group * n_items + item``); which recent item explains an item is left to the few
    items that need it, so a request pays no per-entry work beyond these.
    """
    n = state.n_items
    if not recent.size:
        return NeighbourScores.empty(n)
    c_ptr, c_ind, c_val = gather_rows(state.covisit, recent)
    k_ptr, k_ind, k_val = gather_rows(state.item_knn, recent)
    if c_ind.size + k_ind.size == 0:
        return NeighbourScores.empty(n)
    keys = np.concatenate((c_ind, k_ind + n))
    lengths = np.concatenate((np.diff(c_ptr), np.diff(k_ptr)))
    weights = np.repeat(np.concatenate((recent_weights, recent_weights)), lengths)
    scores = np.concatenate((c_val, k_val)) * weights
    sums = np.bincount(keys, weights=scores, minlength=2 * n).astype(np.float32)
    maxs = np.full(2 * n, -np.inf, dtype=np.float32)
    np.maximum.at(maxs, keys, scores)
    top = sums.reshape(2, n).max(axis=1).tolist()
    return NeighbourScores(
        n,
        sums,
        maxs,
        keys,
        scores,
        lengths,
        recent,
        (top[0] if top[0] > 0 else 1.0, top[1] if top[1] > 0 else 1.0),
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
    items = dense.nonzero()[0]
    sums = dense[items].astype(np.float32)
    return HistoryScores(dense, items, sums, (indptr, indices, data, seen, weights))
