"""Retrieval components: implicit ALS factors and session co-visitation.

ALS is fitted on interactions before a cut-off; user vectors for any later state are
recomputed from that state's interactions with the item factors held fixed (one
exact least-squares solve per user, implicit's ``recalculate_user``), so the served
bundle reflects every interaction in the window without refitting the items.
Items without interactions before the fit get a content vector: the mean factor of
the items sharing their categories, so they can still be retrieved and scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from recsys_assets.training.artifacts import pack_meta, pack_ragged, unpack_meta, unpack_ragged
from recsys_assets.training.confidence import decay_weights, interaction_matrix
from recsys_assets.training.data import Encoded, Vocabulary
from recsys_assets.training.ease import ease_graph
from recsys_assets.training.params import TrainingParams
from recsys_serving.model.state import Ragged


@dataclass
class AlsFit:
    """Item factors (content vectors for cold items) of one ALS fit, plus its settings."""

    item_factors: npt.NDArray[np.float32]
    fitted_before: float
    warm: npt.NDArray[np.bool_]  # items that had interactions before the fit
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = {"fitted_before": self.fitted_before, "seconds": self.seconds, "stats": self.stats}
        return {"item_factors": self.item_factors, "warm": self.warm, **pack_meta(meta)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AlsFit:
        meta = unpack_meta(arrays)
        return cls(
            item_factors=arrays["item_factors"],
            fitted_before=meta["fitted_before"],
            warm=arrays["warm"],
            seconds=meta["seconds"],
            stats=meta["stats"],
        )


@dataclass
class RetrievalSnapshot:
    """Retrieval state as of ``as_of``: item factors, recomputed user vectors, session
    co-visitation and item-item cosine neighbours."""

    as_of: float
    item_factors: npt.NDArray[np.float32]
    user_factors: npt.NDArray[np.float32]
    covisit: Ragged
    item_knn: Ragged
    ease: Ragged
    ease_stats: dict[str, Any] = field(default_factory=dict)

    ARRAYS: ClassVar[tuple[str, ...]] = ("item_factors", "user_factors")

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "item_factors": self.item_factors,
            "user_factors": self.user_factors,
            **pack_ragged("covisit", self.covisit),
            **pack_ragged("item_knn", self.item_knn),
            **pack_ragged("ease", self.ease),
            **pack_meta({"as_of": self.as_of, "ease": self.ease_stats}),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RetrievalSnapshot:
        meta = unpack_meta(arrays)
        return cls(
            as_of=meta["as_of"],
            item_factors=arrays["item_factors"],
            user_factors=arrays["user_factors"],
            covisit=unpack_ragged("covisit", arrays),
            item_knn=unpack_ragged("item_knn", arrays),
            ease=unpack_ragged("ease", arrays),
            ease_stats=meta.get("ease", {}),
        )


def retrieval_snapshot(
    enc: Encoded,
    vocab: Vocabulary,
    as_of: float,
    item_factors: npt.NDArray[np.float32],
    params: TrainingParams,
    matrix: sp.csr_matrix | None = None,
    ease_lambda: float | None = None,
    ease: tuple[Ragged, dict[str, Any]] | None = None,
) -> RetrievalSnapshot:
    """``matrix``: the ALS interaction matrix before ``as_of``, when the caller has it;
    ``ease_lambda``: EASE's chosen regularisation factor (``None``: no EASE graph);
    ``ease``: its :func:`~recsys_assets.training.ease.ease_graph` with that factor,
    when the caller built it first (its dense n x n matrices are then not alive beside
    the ALS matrix and the other pieces of the snapshot)."""
    if ease is None:
        ease = ease_graph(enc, vocab, as_of, params, ease_lambda)
    graph, ease_stats = ease
    return RetrievalSnapshot(
        as_of=float(as_of),
        item_factors=np.ascontiguousarray(item_factors, dtype=np.float32),
        user_factors=user_factors(enc, vocab, item_factors, as_of, params, matrix=matrix),
        covisit=covisitation(enc, vocab.item_ids.size, as_of, params),
        item_knn=item_knn(enc, vocab, as_of, params),
        ease=graph,
        ease_stats=ease_stats,
    )


def item_knn(enc: Encoded, vocab: Vocabulary, as_of: float, params: TrainingParams) -> Ragged:
    """Top cosine neighbours per item over users' (log-weighted) interactions.

    The signal of the item-kNN baseline, kept as a candidate source and as ranking
    features so the ranker can only add to it.
    """
    from implicit.nearest_neighbours import all_pairs_knn

    n_users, n_items = vocab.user_ids.size, vocab.item_ids.size
    matrix = interaction_matrix(enc, n_users, n_items, as_of, params.replace(als_bm25=False))
    if matrix.nnz == 0:
        return Ragged.empty(n_items)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=0)).ravel())
    scale = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    normalized = (matrix @ sp.diags(scale)).tocsr().astype(np.float64)
    sim = all_pairs_knn(
        normalized,
        params.knn_neighbours + 1,
        num_threads=params.resolved_threads,
        show_progress=False,
    ).tocoo()
    keep = (sim.row != sim.col) & (sim.data > 0)
    rows, cols, vals = sim.row[keep], sim.col[keep], sim.data[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    top = rank < params.knn_neighbours
    return Ragged.from_sorted_pairs(
        n_items, rows[top].astype(np.int64), cols[top].astype(np.int64), vals[top]
    )


def _als_model(params: TrainingParams) -> Any:
    """Build the model; call inside ``threadpool_limits`` after :func:`_load_implicit`."""
    from implicit.cpu.als import AlternatingLeastSquares

    return AlternatingLeastSquares(
        factors=params.als_factors,
        regularization=params.als_regularization,
        alpha=params.als_alpha,
        iterations=params.als_iterations,
        random_state=params.seed,
        num_threads=params.resolved_threads,
        calculate_training_loss=False,
    )


def _load_implicit() -> None:
    # Imported before threadpool_limits is entered: a BLAS library loaded inside the
    # context would escape the limit.
    import implicit.cpu.als  # noqa: F401


def als_matrix(
    enc: Encoded, vocab: Vocabulary, as_of: float, params: TrainingParams
) -> sp.csr_matrix:
    """The interaction matrix ALS is fitted on and user vectors are solved from: built
    once by callers that do both for the same moment (a second or so at 10M events)."""
    return interaction_matrix(enc, vocab.user_ids.size, vocab.item_ids.size, as_of, params)


def fit_als(
    enc: Encoded,
    vocab: Vocabulary,
    before: float,
    params: TrainingParams,
    matrix: sp.csr_matrix | None = None,
) -> AlsFit:
    """Fit ALS on interactions before ``before`` (``matrix``: their
    :func:`als_matrix`, when the caller has it); cold items get content vectors."""
    from threadpoolctl import threadpool_limits

    _load_implicit()
    if matrix is None:
        matrix = als_matrix(enc, vocab, before, params)
    started = time.perf_counter()
    # implicit parallelises itself; a multi-threaded BLAS underneath only fights it.
    with threadpool_limits(1, "blas"):
        model = _als_model(params)
        model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - started
    factors = np.asarray(model.item_factors, dtype=np.float32)
    warm = np.diff(matrix.tocsc().indptr) > 0
    factors = with_content_vectors(factors, warm, vocab)
    return AlsFit(
        item_factors=factors,
        fitted_before=before,
        warm=warm,
        seconds=seconds,
        stats={
            "users": int((np.diff(matrix.indptr) > 0).sum()),
            "items": int(warm.sum()),
            "nnz": int(matrix.nnz),
            "factors": int(factors.shape[1]),
            "alpha": float(params.als_alpha),
            "regularization": float(params.als_regularization),
            "bm25": bool(params.als_bm25),
            "seconds": round(seconds, 3),
        },
    )


def with_content_vectors(
    factors: npt.NDArray[np.float32], warm: npt.NDArray[np.bool_], vocab: Vocabulary
) -> npt.NDArray[np.float32]:
    """Replace cold items' factors by the mean factor of warm items in their categories."""
    factors = factors.copy()
    factors[~warm] = 0.0
    n_cat = vocab.categories.size
    if n_cat == 0 or warm.all():
        return factors
    sums = np.zeros((n_cat, factors.shape[1]), dtype=np.float64)
    counts = np.zeros(n_cat, dtype=np.float64)
    for row in np.flatnonzero(warm).tolist():
        for cat in vocab.item_categories[row]:
            sums[cat] += factors[row]
            counts[cat] += 1
    means = sums / np.maximum(counts, 1.0)[:, None]
    for row in np.flatnonzero(~warm).tolist():
        cats = [c for c in vocab.item_categories[row] if counts[c] > 0]
        if cats:
            factors[row] = means[cats].mean(axis=0)
    return factors


def user_factors(
    enc: Encoded,
    vocab: Vocabulary,
    item_factors: npt.NDArray[np.float32],
    as_of: float,
    params: TrainingParams,
    users: npt.NDArray[np.int64] | None = None,
    matrix: sp.csr_matrix | None = None,
) -> npt.NDArray[np.float32]:
    """Least-squares user vectors for interactions before ``as_of``, items fixed (for
    ``users`` only, in that order, when given; ``matrix``: the :func:`als_matrix` at
    ``as_of``, when the caller has it)."""
    from threadpoolctl import threadpool_limits

    _load_implicit()
    if matrix is None:
        matrix = als_matrix(enc, vocab, as_of, params)
    rows = np.arange(vocab.user_ids.size) if users is None else np.asarray(users, dtype=np.int64)
    if users is not None:
        matrix = matrix[rows]
    with threadpool_limits(1, "blas"):
        model = _als_model(params)
        model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        vectors = model.recalculate_user(np.arange(rows.size), matrix)
    vectors = np.asarray(vectors, dtype=np.float32).reshape(rows.size, item_factors.shape[1])
    vectors[np.diff(matrix.indptr) == 0] = 0.0
    return vectors


def covisitation(enc: Encoded, n_items: int, as_of: float, params: TrainingParams) -> Ragged:
    """Top neighbours per item from items interacted with close together in a session.

    Within a session (consecutive repeats of one item collapsed), item ``b`` at
    distance ``d`` after ``a`` adds ``1/d`` to ``a -> b`` and
    ``covis_backward_weight / d`` to ``b -> a``; weights decay with age when an
    interaction half-life is set.
    """
    mask = enc.ts < as_of
    session, item, ts = enc.session[mask], enc.item[mask], enc.ts[mask]
    order = np.lexsort((ts, session))
    session, item, ts = session[order], item[order], ts[order]
    if item.size:
        keep = np.ones(item.size, dtype=bool)
        keep[1:] = (session[1:] != session[:-1]) | (item[1:] != item[:-1])
        session, item, ts = session[keep], item[keep], ts[keep]
    decay = decay_weights(ts, as_of, params.interaction_half_life_days)
    src: list[npt.NDArray[np.int64]] = []
    dst: list[npt.NDArray[np.int64]] = []
    wts: list[npt.NDArray[np.float32]] = []
    for d in range(1, params.covis_window + 1):
        if item.size <= d:
            break
        same = (session[d:] == session[:-d]) & (item[d:] != item[:-d])
        a, b = item[:-d][same], item[d:][same]
        w = (decay[d:][same] / d).astype(np.float32)
        src += [a, b]
        dst += [b, a]
        wts += [w, (w * params.covis_backward_weight).astype(np.float32)]
    if not src:
        return Ragged.empty(n_items)
    a, b, w = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
    keys, sums = sum_by_key(a * np.int64(n_items) + b, w)
    a, b = keys // n_items, keys % n_items
    order = np.lexsort((b, -sums, a))
    a, b, sums = a[order], b[order], sums[order]
    rank = np.arange(a.size) - np.searchsorted(a, a, side="left")
    top = rank < params.covis_top
    return Ragged.from_sorted_pairs(
        n_items, a[top].astype(np.int64), b[top].astype(np.int64), sums[top].astype(np.float32)
    )


def sum_by_key(
    keys: npt.NDArray[np.int64], values: npt.NDArray[np.floating[Any]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Sum ``values`` per distinct key, in a fixed order (sorted keys, stable within a key).

    Parallel group-by sums add floats in whatever order threads finish, so ties in
    the results (and everything ranked from them) would change between runs; a seed
    must give the same model every time.
    """
    if keys.size == 0:
        return keys.astype(np.int64), np.empty(0, dtype=np.float64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    sums = np.add.reduceat(values[order].astype(np.float64), starts)
    return sorted_keys[starts].astype(np.int64), sums
