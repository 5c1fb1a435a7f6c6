"""The users x items confidence matrix that ALS and EASE are both fitted on.

Its own module because both model modules build on it: ``retrieval`` (ALS, and the
snapshot that holds the EASE graph) and ``ease`` would otherwise import each other.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from recsys_assets.training.data import DAY, Encoded
from recsys_assets.training.params import TrainingParams


def decay_weights(
    ts: npt.NDArray[np.float64], as_of: float, half_life_days: float | None
) -> npt.NDArray[np.float32]:
    if half_life_days is None:
        return np.ones(ts.size, dtype=np.float32)
    age = np.maximum(as_of - ts, 0.0) / (half_life_days * DAY)
    return np.power(0.5, age).astype(np.float32)


def interaction_matrix(
    enc: Encoded, n_users: int, n_items: int, as_of: float, params: TrainingParams
) -> sp.csr_matrix:
    """Users x items confidence before ``as_of`` (decayed, BM25-weighted if configured)."""
    mask = enc.ts < as_of
    weight = enc.weight[mask] * decay_weights(
        enc.ts[mask], as_of, params.interaction_half_life_days
    )
    matrix = sp.csr_matrix(
        (weight.astype(np.float32), (enc.user[mask], enc.item[mask])),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    # Repeated interactions count with diminishing returns.
    matrix.data = np.log1p(matrix.data).astype(np.float32)
    if params.als_bm25 and matrix.nnz:
        matrix = _bm25(matrix, params.als_bm25_k1, params.als_bm25_b)
    return matrix


def _bm25(matrix: sp.csr_matrix, k1: float, b: float) -> sp.csr_matrix:
    """BM25 on user rows (items are the "terms"): damps very popular items and very
    active users, which measurably helps ALS on skewed implicit data."""
    n_users = matrix.shape[0]
    df = np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(np.float64)
    idf = np.log(n_users / (1.0 + df))
    idf = np.maximum(idf, 0.0) + 1e-3
    row_sums = np.asarray(matrix.sum(axis=1)).ravel()
    avg = row_sums.mean() if row_sums.size else 1.0
    length_norm = (1.0 - b) + b * row_sums / max(avg, 1e-9)
    rows = np.repeat(np.arange(n_users), np.diff(matrix.indptr))
    data = matrix.data.astype(np.float64)
    weighted = data * (k1 + 1.0) / (k1 * length_norm[rows] + data) * idf[matrix.indices]
    out = matrix.copy()
    out.data = weighted.astype(np.float32)
    return out
