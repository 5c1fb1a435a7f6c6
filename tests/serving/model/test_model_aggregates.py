"""The per-request neighbour aggregates against a plain-Python reference.

``context.py`` computes them with composite sort keys, ufunc.at and dense masks for
speed; this restates what they mean, one (user, item) at a time, on a real bundle.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from model_support import tiny_bundle, tiny_outcome, tiny_world

from recsys_serving.model import candidates as cand
from recsys_serving.model import context
from recsys_serving.model.context import (
    COVIS,
    HISTORY_ITEMS,
    KNN,
    descending_key,
    first_free,
    top_ranked,
    user_context,
)
from recsys_serving.model.recommender import Recommender
from recsys_serving.model.state import ModelState, Ragged

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(scope="module")
def state(tiny_bundle: Path) -> ModelState:
    return Recommender.load(tiny_bundle).state


def reference_recent(
    graph: Ragged, recent: np.ndarray, weights: np.ndarray
) -> dict[int, tuple[np.float32, np.float32, int]]:
    """item -> (sum, max, ref): contributions similarity x weight (float32), summed
    exactly (float64, in recent-item order) and rounded to float32; ref = the recent
    item of the largest (newest on ties)."""
    contributions: dict[int, list[tuple[np.float32, int, int]]] = defaultdict(list)
    for position, (item, weight) in enumerate(zip(recent.tolist(), weights, strict=True)):
        neighbours, sims = graph.row(item)
        for n, s in zip(neighbours.tolist(), sims, strict=True):
            contributions[n].append((np.float32(s * weight), position, item))
    out = {}
    for n, found in contributions.items():
        total = 0.0
        for c in found:
            total += float(c[0])
        found.sort(key=lambda c: (-c[0], c[1]))
        out[n] = (np.float32(total), found[0][0], found[0][2])
    return out


def reference_history(
    state: ModelState, seen: np.ndarray, weights: np.ndarray
) -> dict[int, tuple[np.float32, int]]:
    """item -> (score, ref) over the HISTORY_ITEMS strongest history items: exact sum of
    similarity x weight (float64), nonzero only; ref = the history item of the largest
    float32 contribution (lower row on ties)."""
    if seen.size > HISTORY_ITEMS:
        keep = np.sort(np.argpartition(-weights, HISTORY_ITEMS - 1)[:HISTORY_ITEMS])
        seen, weights = seen[keep], weights[keep]
    total: dict[int, float] = defaultdict(float)
    best: dict[int, tuple[np.float32, int]] = {}
    for item, weight in zip(seen.tolist(), weights, strict=True):
        neighbours, sims = state.item_knn.row(item)
        for n, s in zip(neighbours.tolist(), sims, strict=True):
            value = np.float32(s * weight)
            total[n] += float(s) * float(weight)
            if n not in best or value > best[n][0] or (value == best[n][0] and item < best[n][1]):
                best[n] = (value, item)
    return {n: (np.float32(t), best[n][1]) for n, t in total.items() if t != 0.0}


def test_neighbour_aggregates_match_the_reference(state: ModelState) -> None:
    users = [u for u in state.user_ids.tolist() if state.user_row(u) is not None]
    assert len(users) > 100
    checked = 0
    for user in users:
        ctx = user_context(state, user)
        assert ctx.row is not None
        recent, weights = state.recent.row(ctx.row)
        for group, graph, items, sums, maxs, refs in (
            (COVIS, state.covisit, ctx.covis_items, ctx.covis_sum, ctx.covis_max, ctx.covis_ref),
            (KNN, state.item_knn, ctx.knn_items, ctx.knn_sum, ctx.knn_max, ctx.knn_ref),
        ):
            want = reference_recent(graph, recent, weights)
            assert items.tolist() == sorted(want)
            assert sums.tolist() == [want[i][0] for i in items.tolist()]
            assert maxs.tolist() == [want[i][1] for i in items.tolist()]
            assert refs.tolist() == [want[i][2] for i in items.tolist()]
            # Candidate order: sum descending, then the lower row.
            order = sorted(want, key=lambda i: (-want[i][0], i))
            everything = np.ones(state.n_items, dtype=bool)
            rows, best_refs = ctx.neighbours.best(group, everything, len(order))
            assert rows.tolist() == order
            assert best_refs.tolist() == [want[i][2] for i in order]
        history = reference_history(state, *state.seen.row(ctx.row))
        assert ctx.history_items.tolist() == sorted(history)
        assert ctx.history_sum.tolist() == [history[i][0] for i in sorted(history)]
        assert ctx.history.refs(ctx.history_items).tolist() == [
            history[i][1] for i in sorted(history)
        ]
        order = sorted(history, key=lambda i: (-history[i][0], i))
        assert ctx.history.ranked.tolist() == order
        # The head candidate generation takes, with some items not free.
        free = np.ones(state.n_items, dtype=bool)
        free[order[::3]] = False
        want = [i for i in order if free[i]]
        for n in (1, 5, len(want) + 3):
            assert ctx.history.best(free, n).tolist() == want[:n]
        checked += 1
    assert checked == len(users)


def test_top_ranked_is_the_head_of_a_full_sort() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        size = int(rng.integers(0, 40))
        items = np.sort(rng.choice(1000, size=size, replace=False)).astype(np.int64)
        # Few distinct values: many ties, also at the bound of the head.
        sums = rng.integers(-2, 4, size=size).astype(np.float32) / 4
        full = sorted(range(size), key=lambda j: (-sums[j], items[j]))
        for n in (0, 1, 3, size, size + 2):
            assert top_ranked(items, sums, n).tolist() == full[:n]


def test_numpy_gathers_equal_the_compiled_ones(
    state: ModelState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without scipy's compiled kernels the aggregates are the same, bit for bit."""
    users = [u for u in state.user_ids.tolist() if state.user_row(u) is not None][:30]
    compiled = [user_context(state, u) for u in users]
    monkeypatch.setattr(context, "_csr_row_index", None)
    monkeypatch.setattr(context, "_csc_matvec", None)
    for user, fast in zip(users, compiled, strict=True):
        slow = user_context(state, user)
        for a, b in ((fast.history, slow.history), (fast.ease, slow.ease)):
            assert a.dense.tobytes() == b.dense.tobytes()
            assert a.refs(a.items).tolist() == b.refs(b.items).tolist()
        for name in ("keys", "scores", "lengths", "sums", "maxs"):
            assert np.array_equal(getattr(fast.neighbours, name), getattr(slow.neighbours, name))


def test_lookups_and_refs_of_absent_items(state: ModelState) -> None:
    user = next(u for u in state.user_ids.tolist() if state.user_row(u) is not None)
    ctx = user_context(state, user)
    absent = np.setdiff1d(np.arange(state.n_items), ctx.covis_items)[:3]
    sums, maxs = ctx.neighbours.lookup(absent)
    assert sums.shape == maxs.shape == (2, absent.size)
    assert not sums[0].any() and not maxs[0].any()
    outside = np.setdiff1d(np.arange(state.n_items), ctx.history_items)[:3]
    assert ctx.history.refs(outside).tolist() == [-1] * outside.size
    assert not ctx.history.at(outside).any()
    cold = user_context(state, "nobody-at-all")
    assert not cold.neighbours.lookup(np.arange(5))[0].any()
    assert cold.history.refs(np.arange(3)).tolist() == [-1, -1, -1]


def test_candidates_respect_the_free_mask_and_quotas(state: ModelState) -> None:
    user = next(u for u in state.user_ids.tolist() if state.user_row(u) is not None)
    ctx = user_context(state, user)
    allowed = cand.allowed_mask(state, ctx)
    before = allowed.copy()
    pool = cand.generate(state, ctx, allowed, 50)
    assert np.array_equal(allowed, before)  # the caller's mask is not modified
    assert len(pool) == 50 and np.unique(pool.items).size == 50
    assert allowed[pool.items].all()
    assert pool.source.dtype == np.int8 and pool.ref.dtype == np.int64
    quotas = cand.quotas(state, 50)
    assert cand.quotas(state, 50) is quotas  # computed once per state and pool size
    assert sum(quotas.values()) >= 49


@settings(deadline=None)  # an O(n^2) check: no per-example deadline outside the CI profile
@given(arrays(np.float32, st.integers(0, 60), elements=st.floats(width=32, allow_nan=False)))
def test_descending_key_orders_floats_in_reverse(values: np.ndarray) -> None:
    keys = descending_key(values)
    assert keys.dtype == np.int64 and ((keys >= -(2**31)) & (keys < 2**31)).all()
    for i in range(values.size):
        for j in range(values.size):
            a, b = values[i], values[j]
            assert (keys[i] < keys[j]) == (a > b)
            assert (keys[i] == keys[j]) == (a == b)  # -0.0 == 0.0 as well


@given(
    st.lists(st.booleans(), min_size=1, max_size=300),
    st.integers(0, 400),
    st.randoms(use_true_random=False),
)
def test_first_free_takes_the_first_free_entries_in_order(
    free_rows: list[bool], n: int, rnd: object
) -> None:
    free = np.asarray(free_rows)
    order = np.arange(free.size)
    rnd.shuffle(order)  # type: ignore[attr-defined]
    want = [p for p, row in enumerate(order.tolist()) if free[row]][:n]
    assert first_free(order, free, n).tolist() == want


def test_candidates_explain_neighbour_items_on_demand_like_the_reference(
    state: ModelState,
) -> None:
    """Candidates drawn from the recent items' neighbours keep no refs when drawn;
    asked for (``Candidates.ref``, what an answer's reasons use), each is the recent
    item of its largest contribution, as the plain reference finds it."""
    checked = 0
    for user in [u for u in state.user_ids.tolist() if state.user_row(u) is not None][:60]:
        ctx = user_context(state, user)
        assert ctx.row is not None
        recent, weights = state.recent.row(ctx.row)
        pool = cand.generate(state, ctx, cand.allowed_mask(state, ctx), 200)
        refs = pool.ref
        want = {
            cand.COVIS: reference_recent(state.covisit, recent, weights),
            cand.KNN: reference_recent(state.item_knn, recent, weights),
        }
        whole = reference_history(state, *state.seen.row(ctx.row))
        for position, (item, source) in enumerate(zip(pool.items, pool.source, strict=True)):
            if source == cand.COVIS:
                assert refs[position] == want[cand.COVIS][int(item)][2]
                checked += 1
            elif source == cand.KNN:
                # knn candidates come from the whole history first, then the recent items.
                assert refs[position] in (
                    whole.get(int(item), (None, None))[1],
                    want[cand.KNN].get(int(item), (None, None, None))[2],
                )
                checked += 1
    assert checked > 100
