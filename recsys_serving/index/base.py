"""The candidate index contract shared by the embedded and Elasticsearch backends.

The ranking model only ever sees a few hundred items per request; the index's job is
to find them fast with business filters applied (not already seen, category,
published window). Both backends answer the same queries with the same semantics so
configuration, not code, chooses one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt


class CandidateIndexError(RuntimeError):
    """The index backend failed to answer (unreachable, refused, rejected the request).

    Backends translate their client's errors into this type so the server can fall
    back to popularity without knowing which backend is configured.
    """


class CandidateIndexTimeout(CandidateIndexError):
    """The index backend did not answer within its budget (``store_timeout_ms``)."""


@dataclass(frozen=True)
class CandidateQuery:
    """What a request asks of the index.

    ``vector`` is the user's embedding in the item-vector space (``None`` for users
    the model does not know: only popularity can answer). ``categories`` keeps items
    having any of them; the published window is inclusive; ``exclude`` are item ids
    never to return (already seen, or excluded by the caller).
    """

    k: int
    vector: npt.NDArray[np.float32] | None = None
    exclude: frozenset[str] = frozenset()
    categories: tuple[str, ...] | None = None
    published_after: datetime | None = None
    published_before: datetime | None = None


@dataclass(frozen=True)
class Candidate:
    item_id: str
    score: float
    source: str  # "knn" | "popular" | "similar"


@dataclass
class IndexArtifact:
    """Everything needed to build an index: one row per item, aligned arrays.

    ``vectors`` are the retrieval model's item factors (inner product with a user
    factor is the retrieval score); ``popularity`` is a recent, decayed interaction
    count used for cold start and as a fallback ordering.
    """

    version: str
    item_ids: list[str]
    vectors: npt.NDArray[np.float32]  # (n_items, dim)
    categories: list[list[str]]
    published_at: npt.NDArray[np.float64]  # epoch seconds, NaN when unknown
    popularity: npt.NDArray[np.float32]
    titles: list[str] = field(default_factory=list)

    def save(self, directory: Path) -> list[Path]:
        """Write ``vectors.npy``, ``items.parquet`` and ``index.json`` into ``directory``."""
        import orjson
        import polars as pl

        directory.mkdir(parents=True, exist_ok=True)
        vectors = directory / "vectors.npy"
        np.save(vectors, np.ascontiguousarray(self.vectors, dtype=np.float32))
        items = directory / "items.parquet"
        pl.DataFrame(
            {
                "item_id": self.item_ids,
                "categories": self.categories,
                "published_at": self.published_at.astype(np.float64),
                "popularity": self.popularity.astype(np.float32),
                "title": self.titles or [""] * len(self.item_ids),
            },
            schema={
                "item_id": pl.String,
                "categories": pl.List(pl.String),
                "published_at": pl.Float64,
                "popularity": pl.Float32,
                "title": pl.String,
            },
        ).write_parquet(items)
        meta = directory / "index.json"
        meta.write_bytes(
            orjson.dumps({"version": self.version, "items": len(self.item_ids), "dim": self.dim})
        )
        return [vectors, items, meta]

    @classmethod
    def load(cls, directory: Path) -> IndexArtifact:
        import orjson
        import polars as pl

        meta = orjson.loads((directory / "index.json").read_bytes())
        items = pl.read_parquet(directory / "items.parquet")
        vectors = np.load(directory / "vectors.npy")
        if vectors.shape[0] != items.height:
            raise ValueError(f"{directory}: {vectors.shape[0]} vectors for {items.height} items")
        return cls(
            version=meta["version"],
            item_ids=items["item_id"].to_list(),
            vectors=vectors.astype(np.float32, copy=False),
            categories=[list(c or []) for c in items["categories"].to_list()],
            published_at=items["published_at"].to_numpy().astype(np.float64),
            popularity=items["popularity"].to_numpy().astype(np.float32),
            titles=items["title"].to_list(),
        )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0


class CandidateIndex(Protocol):
    """A queryable candidate index of one version."""

    version: str

    def search(self, query: CandidateQuery) -> list[Candidate]:
        """Top-k items by inner product with ``query.vector``, filters applied."""

    def popular(self, query: CandidateQuery) -> list[Candidate]:
        """Top-k items by popularity with the same filters (cold start, fallback)."""

    def similar(
        self, item_id: str, k: int, exclude: frozenset[str] = frozenset()
    ) -> list[Candidate]:
        """Items nearest to ``item_id``'s vector (item-to-item); empty if it is unknown."""

    def ping(self) -> bool:
        """Whether the backend answers (readiness)."""


class IndexPublisher(Protocol):
    """Builds a new index version and makes it the one queries see, atomically."""

    def publish(self, artifact: IndexArtifact) -> str:
        """Build the version's index and switch readers to it; returns where it lives."""

    def prune(self, keep_versions: Iterable[str]) -> list[str]:
        """Delete indices of versions not in ``keep_versions``; returns what was deleted.

        The registry's production and candidate versions must stay: each model
        version queries the index built from its own item vectors.
        """
