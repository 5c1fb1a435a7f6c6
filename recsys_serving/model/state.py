"""Everything the runtime needs to answer a request, as flat numpy arrays.

A :class:`ModelState` is a snapshot of the world *as of* one instant: who has seen
what, recent items per user, per-item and per-user feature tables, co-visitation
neighbours, popularity orders and the retrieval factors. Training builds one state
per cut-off (ranking dataset, holdout evaluation, serving) with the same code, and
the bundle stores the serving one. Keeping it as arrays (CSR for ragged data) makes
loading a bundle a handful of ``np.load`` calls and keeps per-request work to
indexing and small matrix products.

Relative times (ages, recency) are measured against ``as_of``, never against the
wall clock, so a served score is exactly the offline score for the same state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

# 3: EASE item graph (``ease``) and per-item time-bucket counts (``time_edges``,
# ``item_time_counts``); bundles of format 2 are refused (the features differ).
# The answer table beside a state (``answers/``, model/answers.py) is optional and has
# its own version: adding it did not change this format, and a state without one (or
# with one this code does not read) loads and is served live.
STATE_FORMAT = 3

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass
class Ragged:
    """Rows of variable length (CSR without a shape): ``values[indptr[r]:indptr[r+1]]``."""

    indptr: IntArray
    indices: IntArray
    data: FloatArray

    def row(self, r: int) -> tuple[IntArray, FloatArray]:
        lo, hi = int(self.indptr[r]), int(self.indptr[r + 1])
        return self.indices[lo:hi], self.data[lo:hi]

    @property
    def n_rows(self) -> int:
        return int(self.indptr.size - 1)

    @classmethod
    def empty(cls, n_rows: int) -> Ragged:
        return cls(
            np.zeros(n_rows + 1, dtype=np.int64),
            np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.float32),
        )

    @classmethod
    def from_lists(cls, rows: list[tuple[IntArray, FloatArray]]) -> Ragged:
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r[0]) for r in rows])
        indices = np.concatenate([r[0] for r in rows]) if rows else np.empty(0)
        data = np.concatenate([r[1] for r in rows]) if rows else np.empty(0)
        return cls(indptr, indices.astype(np.int64), data.astype(np.float32))

    @classmethod
    def from_sorted_pairs(
        cls, n_rows: int, rows: IntArray, indices: IntArray, data: npt.ArrayLike
    ) -> Ragged:
        """Build from (row, index, value) triples already sorted by row."""
        counts = np.bincount(rows, minlength=n_rows) if rows.size else np.zeros(n_rows, int)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(counts)
        return cls(
            indptr,
            np.asarray(indices, dtype=np.int64),
            np.asarray(data, dtype=np.float32),
        )


@dataclass
class ModelState:
    """A snapshot of users, items and retrieval state at ``as_of`` (epoch seconds).

    Arrays indexed by item row have ``n_items`` rows; by user row, ``n_users``. The
    column names of ``item_table`` / ``user_table`` are in ``item_columns`` /
    ``user_columns`` so the feature function can pick columns by name.
    """

    as_of: float
    item_ids: npt.NDArray[np.str_]
    user_ids: npt.NDArray[np.str_]
    categories: npt.NDArray[np.str_]  # category names; column j of the affinity rows
    item_factors: FloatArray  # (n_items, dim); cold items get a content vector
    user_factors: FloatArray  # (n_users, dim); zero rows for users without history
    item_table: FloatArray  # (n_items, len(item_columns))
    item_columns: tuple[str, ...]
    user_table: FloatArray  # (n_users, len(user_columns))
    user_columns: tuple[str, ...]
    item_categories: Ragged  # item row -> category indices (primary first)
    user_affinity: Ragged  # user row -> (category, share) over the whole window
    user_affinity_recent: Ragged  # the same over the recent window
    seen: Ragged  # user row -> item rows interacted with (sorted), log-damped weight
    recent: Ragged  # user row -> most recent distinct item rows, newest first, weights
    covisit: Ragged  # item row -> neighbour item rows by co-visitation score, desc
    item_knn: Ragged  # item row -> neighbour item rows by cosine similarity, desc
    # item row -> items its presence in a history scores (EASE weights, positive top-N,
    # desc); empty rows when EASE was skipped (catalogue above the size guard)
    ease: Ragged
    available: npt.NDArray[np.bool_]  # items that may be recommended at as_of
    popular: IntArray  # available item rows by (decayed) popularity, desc
    trending: IntArray  # available item rows by recent-window popularity, desc
    fresh: IntArray  # recently published available item rows, newest first
    category_popular: Ragged  # category -> available item rows by popularity, desc
    published_at: npt.NDArray[np.float64]  # epoch seconds, NaN when unknown
    # Coarse popularity over time: ``time_edges`` (buckets + 1,) epoch seconds, equal
    # buckets from the window start to ``as_of``; ``item_time_counts`` (n_items,
    # buckets) interaction weight per item and bucket. They tell what was popular when
    # a user was last active, months before ``as_of`` for users who come in bursts.
    time_edges: npt.NDArray[np.float64]
    item_time_counts: FloatArray
    params: dict[str, Any] = field(default_factory=dict)

    _item_index: dict[str, int] | None = field(default=None, repr=False)
    _user_index: dict[str, int] | None = field(default=None, repr=False)
    _category_index: dict[str, int] | None = field(default=None, repr=False)

    RAGGED: ClassVar[tuple[str, ...]] = (
        "item_categories",
        "user_affinity",
        "user_affinity_recent",
        "seen",
        "recent",
        "covisit",
        "item_knn",
        "ease",
        "category_popular",
    )
    ARRAYS: ClassVar[tuple[str, ...]] = (
        "item_ids",
        "user_ids",
        "categories",
        "item_factors",
        "user_factors",
        "item_table",
        "user_table",
        "available",
        "popular",
        "trending",
        "fresh",
        "published_at",
        "time_edges",
        "item_time_counts",
    )

    # ------------------------------------------------------------------ lookups
    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_categories(self) -> int:
        return int(self.categories.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def item_index(self) -> dict[str, int]:
        if self._item_index is None:
            self._item_index = {str(v): i for i, v in enumerate(self.item_ids.tolist())}
        return self._item_index

    @property
    def user_index(self) -> dict[str, int]:
        if self._user_index is None:
            self._user_index = {str(v): i for i, v in enumerate(self.user_ids.tolist())}
        return self._user_index

    @property
    def category_index(self) -> dict[str, int]:
        if self._category_index is None:
            self._category_index = {str(v): i for i, v in enumerate(self.categories.tolist())}
        return self._category_index

    def user_row(self, user_id: str) -> int | None:
        """The user's row when the state knows any history for them, else ``None``."""
        row = self.user_index.get(user_id)
        if row is None or self.seen.indptr[row + 1] == self.seen.indptr[row]:
            return None
        return row

    def item_column(self, name: str) -> FloatArray:
        return self.item_table[:, self.item_columns.index(name)]

    # -------------------------------------------------------------- persistence
    def save(self, directory: Path) -> list[Path]:
        """Write ``state.npz`` and ``state.json``; reloading gives equal arrays."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {name: getattr(self, name) for name in self.ARRAYS}
        for name in self.RAGGED:
            ragged: Ragged = getattr(self, name)
            arrays[f"{name}.indptr"] = ragged.indptr
            arrays[f"{name}.indices"] = ragged.indices
            arrays[f"{name}.data"] = ragged.data
        npz = directory / "state.npz"
        with npz.open("wb") as fh:
            np.savez(fh, **arrays)
        meta = directory / "state.json"
        meta.write_text(
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "as_of": self.as_of,
                    "item_columns": list(self.item_columns),
                    "user_columns": list(self.user_columns),
                    "params": self.params,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return [npz, meta]

    @classmethod
    def load(cls, directory: Path) -> ModelState:
        meta = json.loads((directory / "state.json").read_text())
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{directory}: unknown state format {meta.get('format')!r}")
        with np.load(directory / "state.npz", allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        kwargs: dict[str, Any] = {name: arrays[name] for name in cls.ARRAYS}
        for name in cls.RAGGED:
            kwargs[name] = Ragged(
                arrays[f"{name}.indptr"], arrays[f"{name}.indices"], arrays[f"{name}.data"]
            )
        state = cls(
            as_of=float(meta["as_of"]),
            item_columns=tuple(meta["item_columns"]),
            user_columns=tuple(meta["user_columns"]),
            params=meta.get("params", {}),
            **kwargs,
        )
        state.validate()
        return state

    def validate(self) -> None:
        """Shape checks that catch a state assembled from mismatched pieces."""
        n_items, n_users = self.n_items, self.n_users
        checks = {
            "item_factors": (self.item_factors.shape[0], n_items),
            "item_table": (self.item_table.shape[0], n_items),
            "available": (self.available.shape[0], n_items),
            "published_at": (self.published_at.shape[0], n_items),
            "item_categories": (self.item_categories.n_rows, n_items),
            "covisit": (self.covisit.n_rows, n_items),
            "item_knn": (self.item_knn.n_rows, n_items),
            "ease": (self.ease.n_rows, n_items),
            "item_time_counts": (self.item_time_counts.shape[0], n_items),
            "user_factors": (self.user_factors.shape[0], n_users),
            "user_table": (self.user_table.shape[0], n_users),
            "seen": (self.seen.n_rows, n_users),
            "recent": (self.recent.n_rows, n_users),
            "user_affinity": (self.user_affinity.n_rows, n_users),
            "user_affinity_recent": (self.user_affinity_recent.n_rows, n_users),
            "category_popular": (self.category_popular.n_rows, self.n_categories),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"state: {name} has {got} rows, expected {want}")
        if self.item_time_counts.ndim != 2 or self.time_edges.shape != (
            self.item_time_counts.shape[1] + 1,
        ):
            raise ValueError("state: time_edges do not match item_time_counts buckets")
        if self.user_factors.shape[1] != self.item_factors.shape[1]:
            raise ValueError("state: user and item factors differ in dimension")
        if self.item_table.shape[1] != len(self.item_columns):
            raise ValueError("state: item_table columns do not match item_columns")
        if self.user_table.shape[1] != len(self.user_columns):
            raise ValueError("state: user_table columns do not match user_columns")
