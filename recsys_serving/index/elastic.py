"""The Elasticsearch candidate index: versioned indices, one alias, kNN with filters.

Every trained model version gets its own index ``<prefix>-<version>`` built from that
version's item vectors (a user vector from model A is meaningless against model B's
item vectors), so each serving model queries its own versioned index by name. The
alias ``<prefix>`` follows the latest published version, for people and tools; it is
moved with one ``_aliases`` request, which Elasticsearch applies atomically.

Scores: the vectors use ``max_inner_product`` similarity because ALS scores are
unnormalised inner products. Elasticsearch turns an inner product ``d`` into a
positive ``_score`` (``d + 1`` when ``d >= 0``, else ``1 / (1 - d)``); this module
inverts that, so ``Candidate.score`` is the raw inner product, as in the embedded
index (the ranker may use it as a feature).

Errors: every client failure of :class:`ElasticIndex` is raised as
:class:`~recsys_serving.index.base.CandidateIndexTimeout` (no answer within the
budget) or :class:`~recsys_serving.index.base.CandidateIndexError` (refused,
unreachable, HTTP error, malformed answer), with the client's exception chained;
bad arguments are ``ValueError``. Publishing failures raise :class:`IndexPublishError`
or the client's own exceptions, and never move the alias.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import ApiError, NotFoundError
from elasticsearch.helpers import BulkIndexError, streaming_bulk

from recsys_serving.index.base import (
    Candidate,
    CandidateIndexError,
    CandidateIndexTimeout,
    CandidateQuery,
    IndexArtifact,
)
from recsys_serving.index.embedded import epoch_seconds
from recsys_serving.logging import get_logger

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

    from recsys_serving.settings import StoreSettings

log = get_logger(__name__)

T = TypeVar("T")

VECTOR_FIELD = "vector"
# Elasticsearch's ceiling for knn.k, knn.num_candidates and from+size.
MAX_RESULTS = 10_000
# Index names: lowercase, no separators Elasticsearch forbids, not starting with -_+.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class IndexPublishError(RuntimeError):
    """Building a versioned index failed; the alias was not moved."""


def versioned_index_name(prefix: str, version: str) -> str:
    """``<prefix>-<version>``, checked against Elasticsearch's index-name rules."""
    name = f"{prefix}-{version}"
    if not _NAME.match(prefix) or not _NAME.match(version) or len(name.encode()) > 255:
        raise ValueError(
            f"{name!r} is not a valid Elasticsearch index name: prefix and version must be"
            " lowercase letters, digits, '.', '_' or '-', and start with a letter or digit"
        )
    return name


def connect(
    stores: StoreSettings,
    *,
    request_timeout: float,
    max_retries: int = 0,
    retry_on_timeout: bool = False,
) -> Elasticsearch:
    """A client for ``stores.es_url`` (comma-separated nodes; userinfo is basic auth)."""
    from elasticsearch import Elasticsearch

    if not stores.es_url:
        raise ValueError("RECSYS_ES_URL is not set")
    hosts = [url.strip() for url in stores.es_url.split(",") if url.strip()]
    return Elasticsearch(
        hosts,
        api_key=stores.es_api_key or None,
        request_timeout=request_timeout,
        max_retries=max_retries,
        retry_on_timeout=retry_on_timeout,
    )


def index_mapping(prefix: str, artifact: IndexArtifact) -> dict[str, Any]:
    """The explicit mapping of one versioned index (``dynamic: strict`` catches typos)."""
    return {
        "dynamic": "strict",
        "_meta": {
            "recsys": {
                "prefix": prefix,
                "version": artifact.version,
                "items": len(artifact.item_ids),
                "dim": artifact.dim,
            }
        },
        "properties": {
            "item_id": {"type": "keyword"},
            "title": {"type": "text"},
            "categories": {"type": "keyword"},
            "published_at": {"type": "date", "format": "epoch_millis"},
            "popularity": {"type": "float"},
            VECTOR_FIELD: {
                "type": "dense_vector",
                "dims": artifact.dim,
                "index": True,
                "similarity": "max_inner_product",
                # Float HNSW, not the int8 default of 8.14+: scores stay exact inner
                # products, equal to the embedded index's and to what training saw.
                "index_options": {"type": "hnsw"},
            },
        },
    }


def inner_product_from_score(score: float) -> float:
    """Undo Elasticsearch's ``max_inner_product`` score transform."""
    return score - 1.0 if score >= 1.0 else 1.0 - 1.0 / score


def _epoch_millis(seconds: float) -> int:
    return round(seconds * 1000.0)


def _server_version(info: Any) -> tuple[int, int]:
    number = str(info["version"]["number"])
    major, minor = [*re.findall(r"\d+", number), "0", "0"][:2]
    return int(major), int(minor)


class ElasticPublisher:
    """Builds ``<prefix>-<version>`` from an :class:`IndexArtifact` and moves the alias.

    ``shards``/``replicas`` are the new index's settings (one shard suits catalogues of
    up to a few million items); ``request_timeout`` bounds each publishing request and
    is generous because bulk chunks and the final refresh take seconds, not ms.
    """

    def __init__(
        self,
        client: Elasticsearch,
        prefix: str,
        *,
        chunk_size: int = 500,
        shards: int = 1,
        replicas: int = 1,
        request_timeout: float = 120.0,
    ) -> None:
        if not _NAME.match(prefix):
            raise ValueError(f"invalid Elasticsearch index prefix {prefix!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._es = client.options(request_timeout=request_timeout)
        self.prefix = prefix
        self.alias = prefix
        self._chunk_size = chunk_size
        self._shards = shards
        self._replicas = replicas

    def index_name(self, version: str) -> str:
        return versioned_index_name(self.prefix, version)

    # --- IndexPublisher --------------------------------------------------------------

    def publish(self, artifact: IndexArtifact) -> str:
        """Build the version's index (or reuse a complete one), then swap the alias.

        Returns the versioned index name. On any failure the half-built index is
        deleted and the alias still points where it did.
        """
        _check_artifact(artifact)
        name = self.index_name(artifact.version)
        started = time.perf_counter()
        if self._complete(name, artifact):
            log.info("es_index_reused", index=name, items=len(artifact.item_ids))
        else:
            self._build(name, artifact)
        self._swap_alias(name)
        log.info(
            "es_index_published",
            index=name,
            alias=self.alias,
            items=len(artifact.item_ids),
            seconds=round(time.perf_counter() - started, 3),
        )
        return name

    def prune(self, keep_versions: Iterable[str]) -> list[str]:
        """Delete this prefix's versioned indices except ``keep_versions`` and the alias's.

        Only indices this publisher built (recognised by their ``_meta``) are touched.
        Returns the deleted index names.
        """
        keep = {self.index_name(v) for v in keep_versions} | set(self._alias_targets())
        mappings = self._es.indices.get_mapping(index=f"{self.prefix}-*")
        doomed = sorted(
            index
            for index, body in mappings.body.items()
            if index not in keep
            and body.get("mappings", {}).get("_meta", {}).get("recsys", {}).get("prefix")
            == self.prefix
        )
        if doomed:
            self._es.indices.delete(index=",".join(doomed))
            log.info("es_indices_pruned", deleted=doomed, kept=sorted(keep))
        return doomed

    # --- internals -------------------------------------------------------------------

    def _complete(self, name: str, artifact: IndexArtifact) -> bool:
        """Whether ``name`` already holds exactly this artifact (a retried publish)."""
        if not self._es.indices.exists(index=name):
            return False
        mapping = self._es.indices.get_mapping(index=name).body.get(name, {}).get("mappings", {})
        meta = mapping.get("_meta", {}).get("recsys", {})
        count = int(self._es.count(index=name)["count"])
        if meta == index_mapping(self.prefix, artifact)["_meta"]["recsys"] and count == len(
            artifact.item_ids
        ):
            return True
        if name in self._alias_targets():
            raise IndexPublishError(
                f"{name} is behind alias {self.alias} but does not match artifact "
                f"{artifact.version} ({count} documents); refusing to rebuild it in place"
            )
        log.warning("es_index_incomplete_rebuilt", index=name, documents=count)
        self._es.indices.delete(index=name)
        return False

    def _build(self, name: str, artifact: IndexArtifact) -> None:
        settings: dict[str, Any] = {
            "number_of_shards": self._shards,
            "number_of_replicas": self._replicas,
            # Nothing reads the index before the explicit refresh at the end, and it
            # is never written again: periodic refreshes would only cost segments.
            "refresh_interval": "-1",
        }
        if _server_version(self._es.info()) >= (9, 2):
            # 9.2+ leaves vectors out of _source by default; similar() reads them back.
            settings["index.mapping.exclude_source_vectors"] = False
        self._es.indices.create(
            index=name, mappings=index_mapping(self.prefix, artifact), settings=settings
        )
        try:
            self._load(name, artifact)
            self._es.indices.refresh(index=name)
            count = int(self._es.count(index=name)["count"])
            if count != len(artifact.item_ids):
                raise IndexPublishError(
                    f"{name}: {count} documents after loading {len(artifact.item_ids)} items"
                )
        except BaseException:
            self._discard(name)
            raise

    def _load(self, name: str, artifact: IndexArtifact) -> None:
        loaded = 0
        try:
            for ok, _item in streaming_bulk(
                self._es,
                _documents(name, artifact),
                chunk_size=self._chunk_size,
                raise_on_error=True,
                max_retries=3,
                initial_backoff=1,
                max_backoff=30,
            ):
                if ok:
                    loaded += 1
                    if loaded % (self._chunk_size * 20) == 0:
                        log.info("es_index_loading", index=name, loaded=loaded)
        except BulkIndexError as exc:
            first = exc.errors[0] if exc.errors else {}
            detail = next(iter(first.values()), {}) if first else {}
            raise IndexPublishError(
                f"{name}: {len(exc.errors)} item(s) rejected after {loaded} loaded; first: "
                f"item {detail.get('_id')!r}: {detail.get('error')}"
            ) from exc

    def _discard(self, name: str) -> None:
        try:
            self._es.options(ignore_status=404).indices.delete(index=name)
        except (ApiError, TransportError) as exc:
            log.error("es_index_discard_failed", index=name, error=str(exc))

    def _alias_targets(self) -> list[str]:
        try:
            return sorted(self._es.indices.get_alias(name=self.alias).body)
        except NotFoundError:
            return []

    def _swap_alias(self, name: str) -> None:
        """Point the alias at ``name`` only, in ONE ``_aliases`` request.

        ``must_exist`` on the removals makes the request fail as a whole if another
        publisher moved the alias since we looked, instead of leaving it on two indices.
        """
        current = self._alias_targets()
        actions: list[dict[str, Any]] = [
            {"remove": {"index": old, "alias": self.alias, "must_exist": True}}
            for old in current
            if old != name
        ]
        if name not in current:
            actions.append({"add": {"index": name, "alias": self.alias}})
        if actions:
            self._es.indices.update_aliases(actions=actions)
            log.info("es_alias_moved", alias=self.alias, to=name, previous=current)


def _check_artifact(artifact: IndexArtifact) -> None:
    n = len(artifact.item_ids)
    if n == 0:
        raise ValueError(f"artifact {artifact.version} has no items: nothing to publish")
    vectors = artifact.vectors
    if vectors.ndim != 2 or vectors.shape[0] != n or vectors.shape[1] < 1:
        raise ValueError(
            f"artifact {artifact.version}: vectors have shape {vectors.shape} for {n} items"
        )
    for field_name, column in (
        ("categories", artifact.categories),
        ("published_at", artifact.published_at),
        ("popularity", artifact.popularity),
    ):
        if len(column) != n:
            raise ValueError(f"artifact {artifact.version}: {len(column)} {field_name} for {n}")
    if artifact.titles and len(artifact.titles) != n:
        raise ValueError(f"artifact {artifact.version}: {len(artifact.titles)} titles for {n}")
    if not np.isfinite(vectors).all() or not np.isfinite(artifact.popularity).all():
        raise ValueError(f"artifact {artifact.version}: vectors or popularity hold NaN/inf")


def _documents(name: str, artifact: IndexArtifact) -> Iterator[dict[str, Any]]:
    vectors = np.asarray(artifact.vectors, dtype=np.float32)
    for row, item_id in enumerate(artifact.item_ids):
        source: dict[str, Any] = {
            "item_id": item_id,
            "categories": list(artifact.categories[row] or []),
            "popularity": float(artifact.popularity[row]),
            VECTOR_FIELD: vectors[row].tolist(),
        }
        published = float(artifact.published_at[row])
        if not math.isnan(published):
            source["published_at"] = _epoch_millis(published)
        if artifact.titles:
            source["title"] = artifact.titles[row]
        yield {"_op_type": "index", "_index": name, "_id": item_id, "_source": source}


class ElasticIndex:
    """Queries one versioned index with kNN + filters, within ``timeout_ms`` per call.

    ``dim`` (the artifact's vector size) lets a wrong-size query vector fail as a
    ``ValueError`` before any request, like the embedded index. ``candidates_per_k``
    sets ``num_candidates = k * candidates_per_k``: HNSW explores that many neighbours
    per shard, trading latency for recall.
    """

    def __init__(
        self,
        client: Elasticsearch,
        index_name: str,
        *,
        version: str | None = None,
        dim: int | None = None,
        timeout_ms: float = 50.0,
        candidates_per_k: int = 10,
    ) -> None:
        if candidates_per_k < 1:
            raise ValueError("candidates_per_k must be at least 1")
        self.index_name = index_name
        self.version = version or index_name
        self.dim = dim
        self.timeout_ms = timeout_ms
        self._candidates_per_k = candidates_per_k
        # No retries: a second attempt cannot fit in a request's budget, and the
        # caller's fallback (popularity from the bundle) is better than waiting.
        self._es = client.options(
            request_timeout=timeout_ms / 1000.0, max_retries=0, retry_on_timeout=False
        )
        self._es_404_ok = self._es.options(ignore_status=404)

    # --- CandidateIndex ------------------------------------------------------------

    def search(self, query: CandidateQuery) -> list[Candidate]:
        k = self._check_k(query.k)
        if query.vector is None:
            raise ValueError("search() needs a query vector; use popular() for unknown users")
        vector = self._check_vector(query.vector)
        if k == 0:
            return []
        return self._knn(vector, k, self._filter(query, query.exclude), "knn")

    def popular(self, query: CandidateQuery) -> list[Candidate]:
        k = self._check_k(query.k)
        if k == 0:
            return []
        body_filter = self._filter(query, query.exclude)
        response = self._call(
            "popular",
            lambda: self._es.search(
                index=self.index_name,
                query=body_filter if body_filter is not None else {"match_all": {}},
                sort=[{"popularity": {"order": "desc"}}, {"item_id": {"order": "asc"}}],
                size=k,
                source=["item_id"],
                track_total_hits=False,
            ),
        )
        return self._parse(
            response,
            lambda hit: Candidate(hit["_source"]["item_id"], float(hit["sort"][0]), "popular"),
        )

    def similar(
        self, item_id: str, k: int, exclude: frozenset[str] = frozenset()
    ) -> list[Candidate]:
        k = self._check_k(k)
        if k == 0:
            return []
        response = self._call(
            "similar_get",
            lambda: self._es_404_ok.get(
                index=self.index_name, id=item_id, source_includes=[VECTOR_FIELD]
            ),
        )
        body = response.body
        if "error" in body:  # a 404 for the index itself, not for the item
            raise CandidateIndexError(f"{self.index_name}: {body['error']}")
        if not body.get("found"):
            return []
        vector = body.get("_source", {}).get(VECTOR_FIELD)
        if vector is None:
            raise CandidateIndexError(
                f"{self.index_name}: item {item_id!r} has no {VECTOR_FIELD} in _source "
                "(index built without index.mapping.exclude_source_vectors=false?)"
            )
        query = CandidateQuery(k=k, exclude=exclude | {item_id})
        return self._knn(
            np.asarray(vector, dtype=np.float32), k, self._filter(query, query.exclude), "similar"
        )

    def ping(self) -> bool:
        """Whether the versioned index exists and answers; never raises."""
        try:
            return bool(self._es.indices.exists(index=self.index_name))
        except Exception:
            return False

    # --- internals -------------------------------------------------------------------

    def _knn(
        self,
        vector: npt.NDArray[np.float32],
        k: int,
        body_filter: dict[str, Any] | None,
        source: str,
    ) -> list[Candidate]:
        # A multiple of k, within Elasticsearch's ceiling.
        num_candidates = max(k, min(k * self._candidates_per_k, (MAX_RESULTS // k) * k))
        knn: dict[str, Any] = {
            "field": VECTOR_FIELD,
            "query_vector": vector.tolist(),
            "k": k,
            "num_candidates": num_candidates,
        }
        if body_filter is not None:
            knn["filter"] = body_filter
        response = self._call(
            source,
            lambda: self._es.search(
                index=self.index_name,
                knn=knn,
                size=k,
                source=["item_id"],
                track_total_hits=False,
            ),
        )
        return self._parse(
            response,
            lambda hit: Candidate(
                hit["_source"]["item_id"], inner_product_from_score(float(hit["_score"])), source
            ),
        )

    @staticmethod
    def _filter(query: CandidateQuery, exclude: frozenset[str]) -> dict[str, Any] | None:
        """The bool filter shared by kNN and popularity queries (``None`` = no filter)."""
        clauses: list[dict[str, Any]] = []
        if query.categories:
            clauses.append({"terms": {"categories": sorted(set(query.categories))}})
        if query.published_after is not None or query.published_before is not None:
            bounds: dict[str, Any] = {"format": "epoch_millis"}
            if query.published_after is not None:
                bounds["gte"] = _epoch_millis(epoch_seconds(query.published_after))
            if query.published_before is not None:
                bounds["lte"] = _epoch_millis(epoch_seconds(query.published_before))
            clauses.append({"range": {"published_at": bounds}})
        boolean: dict[str, Any] = {}
        if clauses:
            boolean["filter"] = clauses
        if exclude:
            boolean["must_not"] = [{"ids": {"values": sorted(exclude)}}]
        return {"bool": boolean} if boolean else None

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if k > MAX_RESULTS:
            raise ValueError(f"k={k} exceeds Elasticsearch's limit of {MAX_RESULTS}")
        return int(k)

    def _check_vector(self, vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
        array = np.asarray(vector, dtype=np.float32)
        if array.ndim != 1 or (self.dim is not None and array.shape[0] != self.dim):
            raise ValueError(
                f"query vector has shape {array.shape}; index {self.index_name} expects "
                f"({self.dim if self.dim is not None else 'dim'},)"
            )
        if not np.isfinite(array).all():
            raise ValueError("query vector contains NaN or inf")
        return array

    def _call(self, what: str, request: Callable[[], T]) -> T:
        try:
            return request()
        except ConnectionTimeout as exc:
            raise CandidateIndexTimeout(
                f"{self.index_name}: {what} got no answer within {self.timeout_ms:g} ms"
            ) from exc
        except (ApiError, TransportError) as exc:
            raise CandidateIndexError(f"{self.index_name}: {what} failed: {exc}") from exc

    def _parse(self, response: Any, make: Callable[[dict[str, Any]], Candidate]) -> list[Candidate]:
        try:
            return [make(hit) for hit in response["hits"]["hits"]]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise CandidateIndexError(
                f"{self.index_name}: unexpected search response ({exc!r})"
            ) from exc
