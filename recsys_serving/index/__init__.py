"""Candidate retrieval: a broad first selection of items for the ranker to order.

Configuration, not code, picks the backend: with ``RECSYS_ES_URL`` unset the index
runs in-process from the artifact inside the model bundle; with it set, each model
version queries its own Elasticsearch index ``<RECSYS_ES_INDEX_PREFIX>-<version>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys_serving.index.base import (
    Candidate,
    CandidateIndex,
    CandidateIndexError,
    CandidateIndexTimeout,
    CandidateQuery,
    IndexArtifact,
    IndexPublisher,
)
from recsys_serving.index.embedded import EmbeddedIndex

if TYPE_CHECKING:
    from recsys_serving.settings import Settings, StoreSettings

__all__ = [
    "PUBLISH_TIMEOUT_SECONDS",
    "Candidate",
    "CandidateIndex",
    "CandidateIndexError",
    "CandidateIndexTimeout",
    "CandidateQuery",
    "EmbeddedIndex",
    "IndexArtifact",
    "IndexPublisher",
    "open_index",
    "open_publisher",
]

# Publishing bulk-loads and refreshes a whole index: seconds per request, not ms.
PUBLISH_TIMEOUT_SECONDS = 120.0


def open_index(settings: Settings, artifact: IndexArtifact) -> CandidateIndex:
    """The index a model version queries: Elasticsearch when configured, else in-process.

    No request is made here, so a model still loads while Elasticsearch is down; its
    queries then raise ``CandidateIndexError`` and the server falls back to popularity.
    """
    if not settings.stores.es_url:
        return EmbeddedIndex(artifact)
    from recsys_serving.index.elastic import ElasticIndex, connect, versioned_index_name

    return ElasticIndex(
        connect(settings.stores, request_timeout=settings.serving.store_timeout_ms / 1000.0),
        versioned_index_name(settings.stores.es_index_prefix, artifact.version),
        version=artifact.version,
        dim=artifact.dim,
        timeout_ms=settings.serving.store_timeout_ms,
    )


def open_publisher(stores: StoreSettings) -> IndexPublisher | None:
    """The Elasticsearch publisher, or ``None`` when the artifact travels in the bundle."""
    if not stores.es_url:
        return None
    from recsys_serving.index.elastic import ElasticPublisher, connect

    client = connect(
        stores, request_timeout=PUBLISH_TIMEOUT_SECONDS, max_retries=3, retry_on_timeout=True
    )
    return ElasticPublisher(client, stores.es_index_prefix, request_timeout=PUBLISH_TIMEOUT_SECONDS)
