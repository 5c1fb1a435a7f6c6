"""The in-process candidate index: exact inner-product search over the bundle's vectors.

A catalogue of up to a few hundred thousand items fits in memory, and an exact
matrix-vector product over it costs well under a millisecond, so the default
deployment needs no search server and retrieval is exact (no HNSW recall loss).
Everything a query needs besides the product (category bitmasks, id -> row, the
popularity order, the tie-break rank) is computed once at construction.

Semantics shared with the Elasticsearch backend:

- ``exclude`` ids are never returned; unknown ids are ignored.
- ``categories`` keeps items having any of them; ``None`` or an empty tuple means no
  category filter.
- the published window is inclusive on both ends; an item without ``published_at``
  (NaN) passes only when no window is given. Naive datetimes are taken as UTC.
- ties on score are broken by item id, ascending, so answers are reproducible.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from recsys_serving.index.base import Candidate, CandidateQuery, IndexArtifact

_EMPTY_ROWS = np.empty(0, dtype=np.int64)


def epoch_seconds(moment: datetime) -> float:
    """Seconds since the epoch; a naive datetime is UTC (the lake stores UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


class EmbeddedIndex:
    """Exact top-k by inner product (or popularity) with boolean filter masks."""

    def __init__(self, artifact: IndexArtifact) -> None:
        vectors = np.ascontiguousarray(artifact.vectors, dtype=np.float32)
        n = len(artifact.item_ids)
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise ValueError(
                f"index {artifact.version}: vectors have shape {vectors.shape}, expected ({n}, dim)"
            )
        for name, column in (
            ("categories", artifact.categories),
            ("published_at", artifact.published_at),
            ("popularity", artifact.popularity),
        ):
            if len(column) != n:
                raise ValueError(f"index {artifact.version}: {len(column)} {name} for {n} item ids")
        if not np.isfinite(vectors).all():
            raise ValueError(f"index {artifact.version}: item vectors contain NaN or inf")
        popularity = np.asarray(artifact.popularity, dtype=np.float32)
        if not np.isfinite(popularity).all():
            raise ValueError(f"index {artifact.version}: popularity contains NaN or inf")

        self.version = artifact.version
        self.dim = int(vectors.shape[1])
        self._ids = np.asarray(artifact.item_ids, dtype=object)
        self._row = {item_id: row for row, item_id in enumerate(artifact.item_ids)}
        if len(self._row) != n:
            raise ValueError(f"index {artifact.version}: item ids are not unique")
        self._n = n
        self._vectors = vectors
        self._published = np.asarray(artifact.published_at, dtype=np.float64)
        self._popularity = popularity
        # Rank of each row in item-id order: the tie-breaker of every ordering.
        self._id_rank = np.empty(n, dtype=np.int64)
        self._id_rank[np.argsort(self._ids.astype(str), kind="stable")] = np.arange(n)
        # Popularity desc, then item id asc: popular() is a filtered walk of this order.
        self._popular_order = np.lexsort((self._id_rank, -popularity.astype(np.float64)))
        # One packed bitmask per category: an any-of filter is an OR of a few n/8-byte
        # arrays instead of a scan over every item's category list.
        members: dict[str, list[int]] = {}
        for row, cats in enumerate(artifact.categories):
            for cat in cats or ():
                members.setdefault(cat, []).append(row)
        self._category_bits: dict[str, npt.NDArray[np.uint8]] = {}
        for cat, rows in members.items():
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            self._category_bits[cat] = np.packbits(mask)

    def __len__(self) -> int:
        return self._n

    # --- CandidateIndex ------------------------------------------------------------

    def search(self, query: CandidateQuery) -> list[Candidate]:
        k = _check_k(query.k)
        if query.vector is None:
            raise ValueError("search() needs a query vector; use popular() for unknown users")
        vector = self._check_vector(query.vector)
        if k == 0 or self._n == 0:
            return []
        mask = self._filter_mask(query)
        excluded = self._rows(query.exclude)
        scores = self._vectors @ vector
        return self._top_k(scores, mask, excluded, k, "knn")

    def popular(self, query: CandidateQuery) -> list[Candidate]:
        k = _check_k(query.k)
        if k == 0 or self._n == 0:
            return []
        mask = self._filter_mask(query)
        excluded = self._rows(query.exclude)
        order = self._popular_order
        if mask is None:
            # Only exclusions: the answer lies within the first k + |excluded| rows.
            head = order[: k + excluded.size]
            if excluded.size:
                head = head[~np.isin(head, excluded)]
            rows = head[:k]
        else:
            if excluded.size:
                mask[excluded] = False
            rows = order[mask[order]][:k]
        return [
            Candidate(item_id, score, "popular")
            for item_id, score in zip(
                self._ids[rows].tolist(), self._popularity[rows].tolist(), strict=True
            )
        ]

    def similar(
        self, item_id: str, k: int, exclude: frozenset[str] = frozenset()
    ) -> list[Candidate]:
        k = _check_k(k)
        row = self._row.get(item_id)
        if row is None or k == 0:
            return []
        excluded = np.union1d(self._rows(exclude), np.array([row], dtype=np.int64))
        scores = self._vectors @ self._vectors[row]
        return self._top_k(scores, None, excluded, k, "similar")

    def ping(self) -> bool:
        return True

    # --- internals -----------------------------------------------------------------

    def _check_vector(self, vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
        array = np.asarray(vector, dtype=np.float32)
        if array.ndim != 1 or array.shape[0] != self.dim:
            raise ValueError(
                f"query vector has shape {array.shape}; index {self.version} expects ({self.dim},)"
            )
        if not np.isfinite(array).all():
            raise ValueError("query vector contains NaN or inf")
        return array

    def _rows(self, item_ids: frozenset[str]) -> npt.NDArray[np.int64]:
        if not item_ids:
            return _EMPTY_ROWS
        rows = [self._row[i] for i in item_ids if i in self._row]
        return np.fromiter(rows, dtype=np.int64, count=len(rows))

    def _filter_mask(self, query: CandidateQuery) -> npt.NDArray[np.bool_] | None:
        """The rows passing the category and window filters; ``None`` when unfiltered."""
        mask: npt.NDArray[np.bool_] | None = None
        if query.categories:
            bits = np.zeros((self._n + 7) // 8, dtype=np.uint8)
            for cat in query.categories:
                cat_bits = self._category_bits.get(cat)
                if cat_bits is not None:
                    np.bitwise_or(bits, cat_bits, out=bits)
            mask = np.unpackbits(bits, count=self._n).astype(bool)
        if query.published_after is not None or query.published_before is not None:
            # NaN compares False, so items without a date fail any window.
            window = np.ones(self._n, dtype=bool)
            if query.published_after is not None:
                window &= self._published >= epoch_seconds(query.published_after)
            if query.published_before is not None:
                window &= self._published <= epoch_seconds(query.published_before)
            mask = window if mask is None else mask & window
        return mask

    def _top_k(
        self,
        scores: npt.NDArray[np.float32],
        mask: npt.NDArray[np.bool_] | None,
        excluded: npt.NDArray[np.int64],
        k: int,
        source: str,
    ) -> list[Candidate]:
        """The k best rows by (score desc, item id asc) among the allowed ones."""
        candidates: npt.NDArray[np.intp] | None = None
        pool = scores
        if mask is not None or excluded.size:
            allowed = np.ones(self._n, dtype=bool) if mask is None else mask
            if excluded.size:
                allowed[excluded] = False
            valid = int(np.count_nonzero(allowed))
            if valid == 0:
                return []
            if valid * 8 < self._n:
                # A narrow filter: partition only the survivors.
                candidates = np.flatnonzero(allowed)
                pool = scores[candidates]
            else:
                # A broad one (the usual "not already seen"): masking with -inf is
                # several times cheaper than gathering ~n survivors; k <= valid keeps
                # the threshold finite, so no masked row can be picked.
                pool = np.where(allowed, scores, np.float32(-np.inf))
            k = min(k, valid)
        k = min(k, pool.shape[0])
        if k < pool.shape[0]:
            kth = np.argpartition(pool, pool.shape[0] - k)[pool.shape[0] - k]
            threshold = pool[kth]
            above = np.flatnonzero(pool > threshold)
            tied = np.flatnonzero(pool == threshold)
            need = k - above.size
            tie_rank = self._id_rank[tied if candidates is None else candidates[tied]]
            if tied.size > need:
                tied = tied[np.argpartition(tie_rank, need - 1)[:need]]
            picked = np.concatenate([above, tied])
        else:
            picked = np.arange(pool.shape[0])
        rows = picked if candidates is None else candidates[picked]
        picked_scores = pool[picked]
        order = np.lexsort((self._id_rank[rows], -picked_scores.astype(np.float64)))
        return [
            Candidate(item_id, score, source)
            for item_id, score in zip(
                self._ids[rows[order]].tolist(), picked_scores[order].tolist(), strict=True
            )
        ]
