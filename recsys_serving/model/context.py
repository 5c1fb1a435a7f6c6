"""Per-request user context: what the state knows about one user, gathered once.

Candidate generation and feature assembly both need the user's vector, category
affinities, recent items and the co-visitation scores those recent items imply;
computing them once per request keeps each of those steps to a few array gathers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys_serving.model.state import FloatArray, IntArray, ModelState, Ragged

_EMPTY_I = np.empty(0, dtype=np.int64)
# History items (strongest first) whose neighbours make a user's item-kNN score.
HISTORY_ITEMS = 100
_EMPTY_F = np.empty(0, dtype=np.float32)
# Keys of a user document (from the document store) that may name preferred
# categories; used only for users without history (cold start).
DOC_CATEGORY_KEYS = ("categories", "interests", "favorite_categories", "preferred_categories")


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
    covis_items: IntArray  # sorted item rows co-visited with the recent items
    covis_sum: FloatArray
    covis_max: FloatArray
    covis_ref: IntArray  # for each covis item, the recent item contributing most
    knn_items: IntArray  # sorted item rows similar (cosine) to the recent items
    knn_sum: FloatArray
    knn_max: FloatArray
    knn_ref: IntArray
    # The item-kNN baseline's own score: weighted similarity to the whole history
    # (its HISTORY_ITEMS strongest items); ``history_entries`` = (neighbour, weighted
    # similarity, source item) for explaining a few of them (:meth:`history_refs`).
    history_items: IntArray
    history_sum: FloatArray
    history_entries: tuple[IntArray, FloatArray, IntArray]
    last_vector: FloatArray | None  # unit vector of the newest item
    recent_vector: FloatArray | None  # unit mean vector of the recent items

    @property
    def known(self) -> bool:
        return self.row is not None

    def history_refs(self, rows: list[int]) -> list[int]:
        """For each item row, the history item contributing most to its kNN score."""
        neighbour, score, source = self.history_entries
        if not rows or neighbour.size == 0:
            return [-1] * len(rows)
        mask = np.isin(neighbour, rows)
        nb, sc, src = neighbour[mask], score[mask], source[mask]
        best: dict[int, tuple[float, int]] = {}
        for n, c, r in zip(nb.tolist(), sc.tolist(), src.tolist(), strict=True):
            if n not in best or c > best[n][0] or (c == best[n][0] and r < best[n][1]):
                best[n] = (c, r)
        return [best[r][1] if r in best else -1 for r in rows]

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
            history_entries=(_EMPTY_I, _EMPTY_F, _EMPTY_I),
            last_vector=None,
            recent_vector=None,
        )
    vector = state.user_factors[row]
    seen, seen_weights = state.seen.row(row)
    recent, weights = state.recent.row(row)
    covis_items, covis_sum, covis_max, covis_ref = _neighbours(state.covisit, recent, weights)
    knn_items, knn_sum, knn_max, knn_ref = _neighbours(state.item_knn, recent, weights)
    history_items, history_sum, history_entries = _history(state, seen, seen_weights)
    factors = state.item_factors
    last_vector = _unit(factors[recent[0]]) if recent.size else None
    recent_vector = None
    if recent.size:
        recent_vector = _unit((factors[recent] * weights[:, None]).sum(axis=0))
    return UserContext(
        row=row,
        vector=vector if np.any(vector) else None,
        affinity=_dense(state, row, "user_affinity"),
        affinity_recent=_dense(state, row, "user_affinity_recent"),
        seen=seen,
        recent=recent,
        recent_weights=weights,
        covis_items=covis_items,
        covis_sum=covis_sum,
        covis_max=covis_max,
        covis_ref=covis_ref,
        knn_items=knn_items,
        knn_sum=knn_sum,
        knn_max=knn_max,
        knn_ref=knn_ref,
        history_items=history_items,
        history_sum=history_sum,
        history_entries=history_entries,
        last_vector=last_vector,
        recent_vector=recent_vector,
    )


def _gather(graph: Ragged, rows: IntArray) -> tuple[IntArray, IntArray]:
    """Positions of every entry of ``rows`` in ``graph`` and the row each came from."""
    lo, hi = graph.indptr[rows], graph.indptr[rows + 1]
    lengths = hi - lo
    total = int(lengths.sum())
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total), np.repeat(np.arange(rows.size), lengths)


def _history(
    state: ModelState, seen: IntArray, weights: FloatArray
) -> tuple[IntArray, FloatArray, tuple[IntArray, FloatArray, IntArray]]:
    """Item-kNN scores of the user's history: sum over history items of weight x cosine.

    Dense accumulation over the catalogue (one bincount) is cheaper than sorting the
    tens of thousands of (history item, neighbour) pairs of a heavy user.
    """
    if not seen.size:
        return _EMPTY_I, _EMPTY_F, (_EMPTY_I, _EMPTY_F, _EMPTY_I)
    if seen.size > HISTORY_ITEMS:
        keep = np.sort(np.argpartition(-weights, HISTORY_ITEMS - 1)[:HISTORY_ITEMS])
        seen, weights = seen[keep], weights[keep]
    pos, owner = _gather(state.item_knn, seen)
    neighbour = state.item_knn.indices[pos]
    score = (state.item_knn.data[pos] * weights[owner]).astype(np.float32)
    dense = np.bincount(neighbour, weights=score, minlength=state.n_items)
    items = np.flatnonzero(dense).astype(np.int64)
    return items, dense[items].astype(np.float32), (neighbour, score, seen[owner])


def _neighbours(
    graph: Ragged, recent: IntArray, weights: FloatArray
) -> tuple[IntArray, FloatArray, FloatArray, IntArray]:
    """Aggregate the neighbours of the recent items, weighted by recency: for each
    neighbour the weighted sum, the largest single contribution and its source item."""
    if not recent.size:
        return _EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_I
    indptr = graph.indptr
    lo, hi = indptr[recent], indptr[recent + 1]
    lengths = hi - lo
    total = int(lengths.sum())
    if total == 0:
        return _EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_I
    # Positions of every neighbour entry of every recent item, without a Python loop.
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    pos = starts + np.arange(total)
    items = graph.indices[pos]
    scores = graph.data[pos] * np.repeat(weights, lengths)
    refs = np.repeat(recent, lengths)
    order = np.lexsort((-scores, items))
    items, scores, refs = items[order], scores[order], refs[order]
    uniq, first = np.unique(items, return_index=True)
    sums = np.add.reduceat(scores, first).astype(np.float32)
    return uniq, sums, scores[first].astype(np.float32), refs[first]
