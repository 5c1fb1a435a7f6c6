"""Candidate generation: a few hundred items worth ranking for one user.

Sources, each with a quota (a share of the pool, in ``state.params["candidates"]``):

* ``als``: top inner products with the user's ALS vector (the embedded index, or
  an external :class:`~recsys_serving.index.base.CandidateIndex` such as Elasticsearch);
* ``covis``: items co-visited in sessions with the user's recent items;
* ``knn``: items whose audiences overlap most (cosine) with the user's history (the
  item-kNN ranking) and with the recent items;
* ``category``: popular items in the user's strongest categories (or the requested
  ones, or a document's interests for a cold user; several categories for diversity);
* ``ease``: the best EASE (closed-form linear item model) scores of the history;
* ``popular`` and ``trending``: overall and recent-window popularity;
* ``then``: what was popular around the user's last activity (users who came in a
  burst months ago liked what was around then, not what is trending now);
* ``fresh``: newly published items, those in the user's categories first, so items
  without any interaction can reach the ranker through their content features.

Already-seen items, caller exclusions, items unavailable at ``as_of`` and (when
asked) items outside the requested categories are never returned. Training calls
the same function to build the ranking dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys_serving.model.context import COVIS as NEIGHBOUR_COVIS
from recsys_serving.model.context import KNN as NEIGHBOUR_KNN
from recsys_serving.model.context import UserContext, first_free
from recsys_serving.model.features import padded_categories, time_totals
from recsys_serving.model.state import IntArray, ModelState
from recsys_serving.settings import default_of
from recsys_serving.training_params import TrainingParams

ALS, COVIS, CATEGORY, POPULAR, TRENDING, FRESH, KNN, EASE, THEN = range(9)
SOURCE_NAMES = (
    "als",
    "covis",
    "category",
    "popular",
    "trending",
    "fresh",
    "knn",
    "ease",
    "then",
)
DEFAULT_QUOTAS: dict[str, float] = {
    "als": 0.18,
    "ease": 0.2,
    "knn": 0.18,
    "covis": 0.1,
    "category": 0.08,
    "popular": 0.07,
    "trending": 0.06,
    "then": 0.07,
    "fresh": 0.06,
}
# Bundles whose params predate candidate_pool: the training default (declared once).
DEFAULT_POOL: int = default_of(TrainingParams, "candidate_pool")
# Categories the category source draws from (the user's strongest, or the biggest).
CATEGORY_FANOUT = 3

_EMPTY = np.empty(0, dtype=np.int64)
# (vector, k, allowed mask) -> item rows, best first: the ALS retrieval step.
Retriever = Callable[[npt.NDArray[np.float32], int, npt.NDArray[np.bool_]], IntArray]
# Item rows -> their source detail (-1 where none), computed on demand.
Explainer = Callable[[IntArray], IntArray]


@dataclass
class Candidates:
    items: IntArray  # item rows, unique
    source: npt.NDArray[np.int8]  # which source found each item first
    # Source detail (the co-visited or similar item row, the category row; -1) where
    # known when drawn; pieces in ``explained`` are explained on demand (:meth:`refs`).
    known_refs: IntArray
    # (start, stop, explainer): candidates [start, stop) came from a history aggregate
    # (whole-history kNN or EASE, neighbours of the recent items); which history item
    # explains one costs a pass over the aggregate's entries, paid only for the few
    # candidates an answer shows (training never asks).
    explained: list[tuple[int, int, Explainer]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.items.size)

    def refs(self, positions: IntArray) -> IntArray:
        """The source detail of the candidates at ``positions`` (-1 where none)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = self.known_refs[positions]
        if self.explained:
            # An answer shows a handful of positions: plain Python finds their pieces.
            listed = positions.tolist()
            for start, stop, explain in self.explained:
                inside = [j for j, p in enumerate(listed) if start <= p < stop]
                if inside:
                    out[inside] = explain(self.items[positions[inside]])
        return out

    @property
    def ref(self) -> IntArray:
        """The source detail of every candidate (see :meth:`refs`)."""
        return self.refs(np.arange(self.items.size))


def quotas(state: ModelState, pool: int) -> dict[str, int]:
    """Items per source for a pool of ``pool`` (computed once per state and pool size)."""
    cache: dict[int, dict[str, int]] | None = getattr(state, "_quotas", None)
    if cache is None:
        cache = {}
        object.__setattr__(state, "_quotas", cache)
    found = cache.get(pool)
    if found is None:
        shares = {**DEFAULT_QUOTAS, **state.params.get("candidate_quotas", {})}
        found = cache[pool] = {name: round(share * pool) for name, share in shares.items()}
    return found


def allowed_mask(
    state: ModelState,
    ctx: UserContext,
    exclude: IntArray | None = None,
    categories: IntArray | None = None,
) -> npt.NDArray[np.bool_]:
    """Items that may be returned: available, unseen, not excluded, in the categories."""
    if categories is not None:
        allowed = np.zeros(state.n_items, dtype=bool)
        for cat in categories.tolist():
            members, _ = state.category_popular.row(cat)
            allowed[members] = True
        allowed &= state.available
    else:
        allowed = state.available.copy()
    if ctx.seen.size:
        allowed[ctx.seen] = False
    if exclude is not None and exclude.size:
        allowed[exclude] = False
    return allowed


def exact_retriever(state: ModelState) -> Retriever:
    """Exact inner-product top-k over the state's item factors (the embedded index)."""

    def retrieve(vector: npt.NDArray[np.float32], k: int, allowed: npt.NDArray[np.bool_]):
        scores = state.item_factors @ vector
        return top_k(scores, allowed, k)

    return retrieve


def top_k(scores: npt.NDArray[np.float32], allowed: npt.NDArray[np.bool_], k: int) -> IntArray:
    """Rows of the k best allowed scores, best first; ties by lower row (deterministic)."""
    rows = allowed.nonzero()[0]
    if rows.size == 0 or k <= 0:
        return np.empty(0, dtype=np.int64)
    pool = scores[rows]
    if k < rows.size:
        part = np.argpartition(-pool, k - 1)[:k]
        rows, pool = rows[part], pool[part]
    order = np.lexsort((rows, -pool))
    return rows[order].astype(np.int64)


def _walk(
    order: IntArray,
    allowed: npt.NDArray[np.bool_],
    n: int,
    taken: npt.NDArray[np.bool_] | None = None,
) -> list[int]:
    """The first ``n`` allowed, not yet taken rows of a precomputed order (marked taken)."""
    free = allowed if taken is None else allowed & ~taken
    picked = order[first_free(order, free, n)]
    if taken is not None:
        taken[picked] = True
    return picked.tolist()


class _Pool:
    """The pool being filled: at most ``size`` rows, first source wins.

    ``free`` is the allowed mask minus every row a source has already taken (a source
    takes what it selected, even rows that no longer fit in the pool).
    """

    def __init__(self, size: int, allowed: npt.NDArray[np.bool_]) -> None:
        self.size = size
        self.free = allowed.copy()
        self.items: list[IntArray] = []
        self.sources: list[int] = []
        self.counts: list[int] = []
        self.refs: list[int] = []  # the ref of every row of a piece (-1: see explained)
        self.explained: list[tuple[int, int, Explainer]] = []
        self.count = 0

    def take(
        self,
        rows: IntArray,
        src: int,
        ref: int = -1,
        explain: Explainer | None = None,
    ) -> None:
        """Add rows (first source wins); ``ref``: the source detail of all of them,
        ``explain``: what explains each of them on demand."""
        self.free[rows] = False
        room = self.size - self.count
        if room <= 0 or not rows.size:
            return
        rows = rows[:room]
        self.items.append(rows)
        self.sources.append(src)
        self.counts.append(rows.size)
        self.refs.append(ref)
        if explain is not None:
            self.explained.append((self.count, self.count + int(rows.size), explain))
        self.count += int(rows.size)

    def take_first(self, order: IntArray, n: int, src: int, ref: int = -1) -> None:
        self.take(order[first_free(order, self.free, n)], src, ref=ref)

    def result(self) -> Candidates:
        if not self.items:
            return Candidates(_EMPTY, np.empty(0, dtype=np.int8), _EMPTY)
        ref = np.repeat(np.asarray(self.refs, dtype=np.int64), self.counts)
        return Candidates(
            items=np.concatenate(self.items).astype(np.int64, copy=False),
            source=np.repeat(np.asarray(self.sources, dtype=np.int8), self.counts),
            known_refs=ref,
            explained=self.explained,
        )


def generate(
    state: ModelState,
    ctx: UserContext,
    allowed: npt.NDArray[np.bool_],
    pool: int = DEFAULT_POOL,
    categories: IntArray | None = None,
    retrieve: Retriever | None = None,
) -> Candidates:
    """Merge the sources into at most ``pool`` unique candidates (first source wins)."""
    want = quotas(state, pool)
    out = _Pool(pool, allowed)

    if ctx.vector is not None and want["als"] > 0:
        retriever = retrieve or exact_retriever(state)
        out.take(retriever(ctx.vector, want["als"], allowed), ALS)

    if ctx.ease.items.size and want.get("ease", 0) > 0:
        out.take(ctx.ease.best(out.free, want["ease"]), EASE, explain=ctx.ease.refs)

    if ctx.neighbours.live and want["covis"] > 0:
        rows = ctx.neighbours.top(NEIGHBOUR_COVIS, out.free, want["covis"])
        out.take(rows, COVIS, explain=ctx.neighbours.explainer(NEIGHBOUR_COVIS))

    if ctx.history.items.size and want["knn"] > 0:
        # Half by similarity to the whole history (the item-kNN ranking), half to the
        # most recent items (what the user is into right now).
        whole = want["knn"] - want["knn"] // 2
        out.take(ctx.history.best(out.free, whole), KNN, explain=ctx.history.refs)
        rows = ctx.neighbours.top(NEIGHBOUR_KNN, out.free, want["knn"] // 2)
        out.take(rows, KNN, explain=ctx.neighbours.explainer(NEIGHBOUR_KNN))

    if categories is not None and categories.size:
        cats = categories[: CATEGORY_FANOUT * 2]
    else:
        cats = ctx.top_categories(CATEGORY_FANOUT)
        if not cats.size:
            cats = np.asarray(state.params.get("top_categories", [])[:CATEGORY_FANOUT], np.int64)
    if cats.size and want["category"] > 0:
        per = max(1, -(-want["category"] // cats.size))
        popular = state.category_popular
        for cat in cats.tolist():
            out.take_first(
                popular.indices[popular.indptr[cat] : popular.indptr[cat + 1]], per, CATEGORY, cat
            )

    out.take_first(state.popular, want["popular"], POPULAR)
    out.take_first(state.trending, want["trending"], TRENDING)
    if ctx.era is not None and want.get("then", 0) > 0:
        out.take(popular_then(state, ctx.era, out.free, want["then"]), THEN)

    if want["fresh"] > 0 and state.fresh.size:
        fresh = state.fresh[allowed[state.fresh]]
        if cats.size and fresh.size:
            # Fresh items in the user's categories first: content is all they have.
            padded = np.zeros(state.n_categories + 1, dtype=bool)
            padded[cats] = True
            liked = padded[padded_categories(state)[fresh]].any(axis=1)
            fresh = np.concatenate([fresh[liked], fresh[~liked]])
        out.take_first(fresh, want["fresh"], FRESH)

    if out.count < pool:
        # Sources came up short (cold user, narrow filter): top up by popularity.
        out.take_first(state.popular, pool - out.count, POPULAR)

    return out.result()


def popular_then(
    state: ModelState, era: tuple[int, int], free: npt.NDArray[np.bool_], n: int
) -> IntArray:
    """The ``n`` free items with the most interaction weight in the buckets of ``era``
    (ties: lower row); only items with some weight there."""
    if n <= 0:
        return _EMPTY
    found = era_weight(state, era)
    if found is None:
        return _EMPTY
    weight, positive = found
    return top_k(weight, free & positive, n)


def era_weight(
    state: ModelState, era: tuple[int, int]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
    """Each item's interaction weight in the buckets of ``era`` and where it is
    positive (None when the era has none): computed once per state and era (a state
    has a few dozen eras at most), where each request summed the whole catalogue's
    buckets."""
    cache: dict[tuple[int, int], Any] | None = getattr(state, "_era_weights", None)
    if cache is None:
        cache = {}
        object.__setattr__(state, "_era_weights", cache)
    if era not in cache:
        lo, hi = era
        if not time_totals(state)[lo:hi].any():
            cache[era] = None
        else:
            weight = state.item_time_counts[:, lo:hi].sum(axis=1, dtype=np.float64)
            cache[era] = (weight, weight > 0)
    return cache[era]


def reason(state: ModelState, source: int, ref: int) -> str:
    """Where a candidate came from, in words for API answers and logs."""
    if source == COVIS and ref >= 0:
        return f"co-visited with {state.item_ids[ref]}"
    if source in (KNN, EASE) and ref >= 0:
        return f"similar to {state.item_ids[ref]}"
    if source == CATEGORY and ref >= 0:
        return f"popular in {state.categories[ref]}"
    if source == FRESH:
        return "new item"
    if source == THEN:
        return "popular when you were last here"
    return SOURCE_NAMES[source]
