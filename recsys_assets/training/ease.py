"""EASE: the closed-form linear item model, as a candidate source and ranking feature.

``B = I - P / diag(P)`` with ``P = (G + lambda I)^-1`` and ``G = X^T X`` the item gram
of the user x item interaction matrix (Steck, "Embarrassingly Shallow Autoencoders",
2019). It is the strongest classical baseline on ratings logs (issue 11), so the
two-stage model carries it: sparsified to each item's top-N positive weights (an
item -> neighbours graph like item-kNN's), a user's score is a capped history x
N-neighbours aggregation at request time (``recsys_serving.model.context``).

``X`` is the interaction matrix ALS uses without BM25 (log-damped summed weights),
which is exactly the ``seen`` weight the runtime aggregates with, so the offline and
served scores are the same sums.

The inverse is dense (n^2 floats, n^3 work): above ``ease_max_items`` items with
interactions EASE is skipped (empty graph, logged, recorded in metadata) and the
other sources carry on. The regularisation is chosen on the leave-last-out split of
the training data (``lastout.py``), never on the holdout.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from recsys_assets.training.confidence import interaction_matrix
from recsys_assets.training.data import Encoded, Vocabulary
from recsys_assets.training.lastout import LastOut
from recsys_assets.training.metrics import user_metrics
from recsys_assets.training.params import TrainingParams
from recsys_serving.logging import get_logger
from recsys_serving.model.context import EASE_HISTORY_ITEMS
from recsys_serving.model.state import Ragged

log = get_logger(__name__)
GRAPH_BLOCK_ROWS = 1024


def ease_matrix(
    enc: Encoded, vocab: Vocabulary, as_of: float, params: TrainingParams
) -> sp.csr_matrix:
    """Users x items before ``as_of``: the weights the runtime's ``seen`` rows hold."""
    return interaction_matrix(
        enc, vocab.user_ids.size, vocab.item_ids.size, as_of, params.replace(als_bm25=False)
    )


def too_big(n_warm: int, params: TrainingParams) -> str | None:
    """Why EASE is skipped for ``n_warm`` items with interactions, or ``None``."""
    if n_warm > params.ease_max_items:
        return (
            f"{n_warm:,} items with interactions exceed ease_max_items="
            f"{params.ease_max_items:,} (RECSYS_EASE_MAX_ITEMS): EASE skipped"
        )
    if n_warm < 2:
        return "fewer than 2 items with interactions: EASE skipped"
    return None


# Gram columns computed per sparse product: the whole product as a sparse matrix
# (up to n^2 entries, 12 bytes each) beside its dense copy was 2.5 n^2 floats at once.
GRAM_BLOCK_COLS = 512


def _gram(
    matrix: sp.csr_matrix, block: int = GRAM_BLOCK_COLS
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Warm item columns and their dense gram matrix, ``block`` columns at a time.

    Each block is ``sub.T @ sub[:, block]``: scipy sums every entry over the users in
    the same order as ``sub.T @ sub`` does (the left operand's rows, user by user), so
    the matrix is the same bit for bit (``test_gram_by_blocks_is_the_whole_product``)."""
    warm = np.flatnonzero(np.diff(matrix.tocsc().indptr) > 0).astype(np.int64)
    sub = matrix[:, warm].astype(np.float64)
    left = sub.T
    n = warm.size
    gram = np.empty((n, n), dtype=np.float64)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        gram[:, lo:hi] = (left @ sub[:, lo:hi]).toarray()
    return warm, gram


def ease_weights(gram: npt.NDArray[np.float64], lam: float) -> npt.NDArray[np.float64]:
    """B of EASE for a gram matrix (diagonal zero); ``B[i, j]``: what item i in a
    history adds to item j's score.

    ``gram``'s diagonal is regularised in place for the inverse and restored after it
    (the saved values, so ``gram`` is unchanged bit for bit): a regularised copy was
    one more n x n float64 matrix (200 MB at 5k items, 3.2 GB at 20k) beside the
    inverse's own buffers."""
    diagonal = np.diag_indices_from(gram)
    saved = gram[diagonal].copy()
    gram[diagonal] += lam
    try:
        b = np.linalg.inv(gram)
    finally:
        gram[diagonal] = saved
    b /= -np.diag(b)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def _graph(
    b: npt.NDArray[np.float64], warm: npt.NDArray[np.int64], n_items: int, top: int
) -> Ragged:
    """Each item's ``top`` largest positive weights, descending (ties: lower item)."""
    n = b.shape[0]
    k = min(top, n - 1)
    if k <= 0:
        return Ragged.empty(n_items)
    # In row blocks: a whole n x n index matrix would double the memory of B.
    parts, values = [], []
    for lo in range(0, n, GRAPH_BLOCK_ROWS):
        block = b[lo : lo + GRAPH_BLOCK_ROWS]
        part = np.argpartition(block, block.shape[1] - k, axis=1)[:, block.shape[1] - k :]
        parts.append(part)
        values.append(np.take_along_axis(block, part, axis=1))
    rows = np.repeat(np.arange(n), k)
    cols, vals = np.concatenate(parts).ravel(), np.concatenate(values).ravel()
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    return Ragged.from_sorted_pairs(n_items, warm[rows], warm[cols], vals.astype(np.float32))


def ease_graph(
    enc: Encoded,
    vocab: Vocabulary,
    as_of: float,
    params: TrainingParams,
    lam: float | None,
    matrix: sp.csr_matrix | None = None,
) -> tuple[Ragged, dict[str, Any]]:
    """The sparsified EASE graph as of ``as_of`` (empty when skipped) and its stats.

    ``lam``: the chosen regularisation as a multiple of the mean diagonal of the gram
    (scale-free across weightings); ``None`` = EASE off."""
    n_items = vocab.item_ids.size
    if lam is None:
        return Ragged.empty(n_items), {"skipped": "no regularisation chosen (EASE off)"}
    started = time.perf_counter()
    if matrix is None:
        matrix = ease_matrix(enc, vocab, as_of, params)
    n_warm = int((np.diff(matrix.tocsc().indptr) > 0).sum())
    why = too_big(n_warm, params)
    if why is not None:
        log.warning("training.ease_skipped", items=n_warm, reason=why)
        return Ragged.empty(n_items), {"skipped": why, "items": n_warm}
    warm, gram = _gram(matrix)
    del matrix
    scale = float(np.mean(np.diag(gram)))
    b = ease_weights(gram, lam * scale)
    del gram  # before the graph's blocks: one n x n matrix alive, not two
    graph = _graph(b, warm, n_items, params.ease_neighbours)
    del b
    return graph, {
        "items": n_warm,
        "lambda_factor": lam,
        "lambda": round(lam * scale, 4),
        "edges": int(graph.indices.size),
        "seconds": round(time.perf_counter() - started, 3),
    }


def select_lambda(
    enc: Encoded, vocab: Vocabulary, lastout: LastOut | None, params: TrainingParams
) -> tuple[float | None, dict[str, Any]]:
    """The regularisation factor with the best NDCG@K on the leave-last-out split
    (users' own held-out events, scored from the rest of the training data), as the
    runtime scores: capped history, top-N graph, seen items excluded."""
    if not params.ease:
        return None, {"skipped": "EASE switched off (ease=false)"}
    grid = list(params.ease_lambda_grid)
    if lastout is None:
        return grid[len(grid) // 2], {"skipped": "no leave-last-out users: middle of the grid"}
    kept = lastout.kept(enc)
    matrix = ease_matrix(kept, vocab, lastout.as_of, params)
    del kept  # a copy of the window, not held through the grid's inverses
    n_warm = int((np.diff(matrix.tocsc().indptr) > 0).sum())
    why = too_big(n_warm, params)
    if why is not None:
        log.warning("training.ease_skipped", items=n_warm, reason=why)
        return None, {"skipped": why, "items": n_warm}
    grades = lastout.labels(enc)
    users = np.asarray(sorted(grades), dtype=np.int64)
    if users.size > params.ease_select_max_users:
        rng = np.random.default_rng([params.seed, 0xEA5E])
        users = np.sort(rng.choice(users, size=params.ease_select_max_users, replace=False))
    if not users.size:
        return grid[len(grid) // 2], {"skipped": "no held-out new items: middle of the grid"}
    started = time.perf_counter()
    warm, gram = _gram(matrix)
    scale = float(np.mean(np.diag(gram)))
    history = matrix[users].tocsr()
    k = params.eval_k
    results = []
    for factor in grid:
        graph = _graph(
            ease_weights(gram, factor * scale), warm, vocab.item_ids.size, params.ease_neighbours
        )
        total = 0.0
        for n, u in enumerate(users.tolist()):
            seen = history.indices[history.indptr[n] : history.indptr[n + 1]]
            weights = history.data[history.indptr[n] : history.indptr[n + 1]]
            scores = _history_scores(graph, vocab.item_ids.size, seen, weights)
            scores[seen] = -np.inf
            top = np.argsort(-scores, kind="stable")[:k]
            total += user_metrics(top.tolist(), set(grades[u]), k)["ndcg"]
        results.append({"lambda_factor": factor, f"ndcg@{k}": round(total / users.size, 6)})
    metric = f"ndcg@{k}"
    best = max(range(len(grid)), key=lambda j: (results[j][metric], -j))
    return grid[best], {
        "selected": grid[best],
        "lambda": round(grid[best] * scale, 4),
        "validation": {"protocol": "leave-last-out", "users": int(users.size)},
        "results": results,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _history_scores(
    graph: Ragged, n_items: int, seen: npt.NDArray[np.int64], weights: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    from recsys_serving.model.context import graph_scores

    found = graph_scores(
        graph, n_items, seen.astype(np.int64), weights.astype(np.float32), EASE_HISTORY_ITEMS
    )
    return found.dense.copy() if found.dense.size else np.zeros(n_items)
