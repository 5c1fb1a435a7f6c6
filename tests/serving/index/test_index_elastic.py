"""The Elasticsearch backend through the real client, against an HTTP test double.

Every test asserts the request bodies the client really sent (mapping, bulk NDJSON,
the single ``_aliases`` body, kNN clause and filters, popularity sort), and the
double evaluates them, so results are also compared with the embedded index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from elasticsearch import Elasticsearch, NotFoundError

from es_double import ElasticsearchDouble, Recorded, alias_swap_scenario
from recsys_serving.index import (
    Candidate,
    CandidateIndexError,
    CandidateIndexTimeout,
    CandidateQuery,
    EmbeddedIndex,
    IndexArtifact,
    open_index,
    open_publisher,
)
from recsys_serving.index.elastic import (
    ElasticIndex,
    ElasticPublisher,
    IndexPublishError,
    inner_product_from_score,
    versioned_index_name,
)
from recsys_serving.settings import Settings

PREFIX = "recsys-items"
V1 = "v20240101000000-000000a1"
V2 = "v20240102000000-000000b2"
V3 = "v20240103000000-000000c3"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_artifact(version: str = V1, n: int = 20, dim: int = 4, seed: int = 0) -> IndexArtifact:
    rng = np.random.default_rng(seed)
    published = T0.timestamp() + rng.integers(0, 20, n) * 86_400.0
    published[::5] = np.nan
    return IndexArtifact(
        version=version,
        item_ids=[f"item-{i:02d}" for i in rng.permutation(n)],
        vectors=rng.normal(size=(n, dim)).astype(np.float32),
        categories=[[c for c in ("a", "b", "c") if rng.random() < 0.4] for _ in range(n)],
        published_at=published,
        popularity=rng.integers(0, 5, n).astype(np.float32),
        titles=[f"Title {i}" for i in range(n)],
    )


@pytest.fixture
def es() -> Iterator[ElasticsearchDouble]:
    with ElasticsearchDouble().running() as double:
        yield double


@pytest.fixture
def client(es: ElasticsearchDouble) -> Iterator[Elasticsearch]:
    with Elasticsearch(es.url, request_timeout=5) as client:
        yield client


def published(client: Elasticsearch, es: ElasticsearchDouble, artifact: IndexArtifact) -> str:
    name = ElasticPublisher(client, PREFIX).publish(artifact)
    es.clear_requests()
    return name


def assert_same(got: list[Candidate], want: list[Candidate]) -> None:
    """Same items, order and sources; scores equal up to float32 summation order."""
    assert [(c.item_id, c.source) for c in got] == [(c.item_id, c.source) for c in want]
    np.testing.assert_allclose([c.score for c in got], [c.score for c in want], rtol=1e-5)


def creations(es: ElasticsearchDouble) -> list[Recorded]:
    return [r for r in es.calls("PUT") if r.path.count("/") == 1 and r.path[1] != "_"]


def bulks(es: ElasticsearchDouble) -> list[Recorded]:
    return [r for r in es.requests if r.path.endswith("/_bulk")]


# --- publishing ----------------------------------------------------------------------


def test_publish_creates_the_versioned_index_with_an_explicit_mapping(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact()
    name = ElasticPublisher(client, PREFIX, replicas=2).publish(artifact)
    assert name == f"{PREFIX}-{V1}"
    (create,) = creations(es)
    assert create.path == f"/{name}"
    assert create.body == {
        "mappings": {
            "dynamic": "strict",
            "_meta": {"recsys": {"prefix": PREFIX, "version": V1, "items": 20, "dim": 4}},
            "properties": {
                "item_id": {"type": "keyword"},
                "title": {"type": "text"},
                "categories": {"type": "keyword"},
                "published_at": {"type": "date", "format": "epoch_millis"},
                "popularity": {"type": "float"},
                "vector": {
                    "type": "dense_vector",
                    "dims": 4,
                    "index": True,
                    "similarity": "max_inner_product",
                    "index_options": {"type": "hnsw"},
                },
            },
        },
        "settings": {"number_of_shards": 1, "number_of_replicas": 2, "refresh_interval": "-1"},
    }
    # Loaded, made searchable, verified, then (and only then) exposed through the alias.
    order = [(r.method, r.path.split("/")[-1]) for r in es.requests if r.method != "HEAD"]
    assert order.index(("POST", "_refresh")) > max(
        i for i, call in enumerate(order) if call[1] == "_bulk"
    )
    assert order.index(("POST", "_aliases")) > order.index(("POST", "_count"))
    assert order[-1] == ("POST", "_aliases")


def test_bulk_sends_one_action_and_one_source_line_per_item_in_chunks(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact(n=20)
    name = ElasticPublisher(client, PREFIX, chunk_size=7).publish(artifact)
    sent = bulks(es)
    assert [len(b.body) for b in sent] == [14, 14, 12]  # 7 + 7 + 6 items, 2 lines each
    assert all("ndjson" in b.headers["content-type"] for b in sent)
    lines = [line for b in sent for line in b.body]
    actions, sources = lines[0::2], lines[1::2]
    assert actions == [{"index": {"_index": name, "_id": i}} for i in artifact.item_ids]
    for row, source in enumerate(sources):
        expected = {
            "item_id": artifact.item_ids[row],
            "title": artifact.titles[row],
            "categories": artifact.categories[row],
            "popularity": float(artifact.popularity[row]),
            "vector": artifact.vectors[row].tolist(),
        }
        if not math.isnan(artifact.published_at[row]):
            expected["published_at"] = round(artifact.published_at[row] * 1000)
        assert source == expected  # no published_at at all when it is unknown
    assert es.indices[name].visible.keys() == set(artifact.item_ids)


def test_alias_moves_with_one_atomic_aliases_request(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX)
    name1 = publisher.publish(make_artifact(V1))
    first = es.calls("POST", "_aliases")
    assert [r.body for r in first] == [{"actions": [{"add": {"index": name1, "alias": PREFIX}}]}]
    es.clear_requests()

    name2 = publisher.publish(make_artifact(V2, seed=1))
    (swap,) = es.calls("POST", "_aliases")
    assert swap.body == {
        "actions": [
            {"remove": {"index": name1, "alias": PREFIX, "must_exist": True}},
            {"add": {"index": name2, "alias": PREFIX}},
        ]
    }
    assert es.alias_targets(PREFIX) == {name2}
    assert name1 in es.indices  # the older version stays for its model


def test_alias_swap_fails_whole_when_someone_else_moved_it(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX)
    name1 = publisher.publish(make_artifact(V1))
    # Between our look and our swap, another writer moved the alias: simulate by
    # making the must_exist removal fail, which must leave the alias as it was.
    es.aliases[PREFIX] = {name1}
    original_get_alias = es._get_alias

    def stale(alias: str) -> tuple[int, object]:
        status, body = original_get_alias(alias)
        es.aliases[PREFIX] = {f"{PREFIX}-other"}  # moved right after we looked
        es.indices[f"{PREFIX}-other"] = es.indices[name1]
        return status, body

    es._get_alias = stale  # type: ignore[method-assign]
    with pytest.raises(NotFoundError):
        publisher.publish(make_artifact(V2, seed=1))
    assert es.alias_targets(PREFIX) == {f"{PREFIX}-other"}


def test_a_rejected_bulk_item_fails_loudly_and_leaves_the_alias_alone(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX, chunk_size=5)
    name1 = publisher.publish(make_artifact(V1))
    es.clear_requests()
    bad = make_artifact(V2, seed=1)
    es.fail_items = {bad.item_ids[7]}
    with pytest.raises(IndexPublishError, match=rf"1 item\(s\) rejected.*{bad.item_ids[7]}"):
        publisher.publish(bad)
    assert es.alias_targets(PREFIX) == {name1}
    assert es.calls("POST", "_aliases") == []
    assert f"{PREFIX}-{V2}" not in es.indices  # the half-built index is discarded
    assert [r.path for r in es.calls("DELETE")] == [f"/{PREFIX}-{V2}"]


def test_a_retried_publish_reuses_a_complete_index_and_rebuilds_a_partial_one(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX)
    artifact = make_artifact(V1)
    name = publisher.publish(artifact)
    es.clear_requests()
    assert publisher.publish(artifact) == name
    assert creations(es) == [] and bulks(es) == []
    assert es.calls("POST", "_aliases") == []  # already pointing there

    # A crash mid-load left V2 with part of its documents and no alias.
    partial = make_artifact(V2, seed=1)
    es.fail_items = {partial.item_ids[-1]}
    with pytest.raises(IndexPublishError):
        publisher.publish(partial)
    es.fail_items = set()
    name2 = f"{PREFIX}-{V2}"
    es._create(name2, {"mappings": {"properties": {}}})
    es.clear_requests()
    assert publisher.publish(partial) == name2
    assert [r.path for r in es.calls("DELETE")] == [f"/{name2}"]
    assert len(es.indices[name2].visible) == len(partial.item_ids)
    assert es.alias_targets(PREFIX) == {name2}


def test_prune_deletes_old_versions_but_keeps_the_given_ones_and_the_alias(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX)
    names = [publisher.publish(make_artifact(v, seed=i)) for i, v in enumerate((V1, V2, V3))]
    es._create(f"{PREFIX}-hand-made", {"mappings": {"properties": {}}})  # not ours: no _meta
    es._create("recsys-users", {"mappings": {"properties": {}}})
    es.clear_requests()

    assert publisher.prune([V2]) == [names[0]]
    (delete,) = es.calls("DELETE")
    assert delete.path == f"/{names[0]}"
    assert set(es.indices) == {names[1], names[2], f"{PREFIX}-hand-made", "recsys-users"}
    # The alias's index survives even when not listed; nothing left to delete twice.
    assert publisher.prune([]) == [names[1]]
    assert publisher.prune([]) == []
    assert es.alias_targets(PREFIX) == {names[2]}


def test_elasticsearch_9_2_keeps_vectors_in_source_so_similar_still_works() -> None:
    with ElasticsearchDouble(version="9.2.1").running() as es, Elasticsearch(es.url) as client:
        artifact = make_artifact()
        name = ElasticPublisher(client, PREFIX).publish(artifact)
        (create,) = creations(es)
        assert create.body["settings"]["index.mapping.exclude_source_vectors"] is False
        index = ElasticIndex(client, name, dim=artifact.dim, timeout_ms=5000)
        item = artifact.item_ids[2]
        assert_same(index.similar(item, 5), EmbeddedIndex(artifact).similar(item, 5))


def test_bad_artifacts_and_names_are_refused_before_any_request(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    publisher = ElasticPublisher(client, PREFIX)
    with pytest.raises(ValueError, match="not a valid Elasticsearch index name"):
        publisher.publish(make_artifact("V1-Upper"))
    empty = make_artifact(n=1)
    empty.item_ids, empty.vectors = [], empty.vectors[:0]
    with pytest.raises(ValueError, match="no items"):
        publisher.publish(empty)
    nan = make_artifact()
    nan.vectors[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        publisher.publish(nan)
    assert es.requests == []
    with pytest.raises(ValueError):
        versioned_index_name("Recsys", V1)


# --- querying ------------------------------------------------------------------------


def test_search_sends_a_knn_clause_with_all_filters(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact()
    name = published(client, es, artifact)
    index = ElasticIndex(client, name, version=V1, dim=4, timeout_ms=5000, candidates_per_k=10)
    vector = np.array([0.5, -1.0, 0.25, 2.0], dtype=np.float32)
    query = CandidateQuery(
        k=5,
        vector=vector,
        exclude=frozenset({"item-03", "item-01", "ghost"}),
        categories=("c", "a"),
        published_after=T0 + timedelta(days=2),
        published_before=T0 + timedelta(days=15),
    )
    got = index.search(query)
    (request,) = es.calls("POST", "_search")
    assert request.path == f"/{name}/_search"
    assert request.body == {
        "knn": {
            "field": "vector",
            "query_vector": [0.5, -1.0, 0.25, 2.0],
            "k": 5,
            "num_candidates": 50,
            "filter": {
                "bool": {
                    "filter": [
                        {"terms": {"categories": ["a", "c"]}},
                        {
                            "range": {
                                "published_at": {
                                    "format": "epoch_millis",
                                    "gte": int((T0 + timedelta(days=2)).timestamp() * 1000),
                                    "lte": int((T0 + timedelta(days=15)).timestamp() * 1000),
                                }
                            }
                        },
                    ],
                    "must_not": [{"ids": {"values": ["ghost", "item-01", "item-03"]}}],
                }
            },
        },
        "size": 5,
        "_source": ["item_id"],
        "track_total_hits": False,
    }
    assert got, "filters leave items to find"
    assert_same(got, EmbeddedIndex(artifact).search(query))


def test_search_without_filters_and_num_candidates_limits(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    name = published(client, es, make_artifact())
    index = ElasticIndex(client, name, dim=4, timeout_ms=5000, candidates_per_k=10)
    index.search(CandidateQuery(k=3, vector=np.ones(4, dtype=np.float32)))
    index.search(CandidateQuery(k=3000, vector=np.ones(4, dtype=np.float32)))
    small, large = (r.body["knn"] for r in es.calls("POST", "_search"))
    assert "filter" not in small and small["num_candidates"] == 30
    assert large["k"] == 3000 and large["num_candidates"] == 9000  # a multiple of k, <= 10000
    with pytest.raises(ValueError, match="10000"):
        index.search(CandidateQuery(k=10_001, vector=np.ones(4, dtype=np.float32)))


def test_results_match_the_embedded_index_end_to_end(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact(n=30, dim=6, seed=4)
    index = ElasticIndex(client, published(client, es, artifact), dim=6, timeout_ms=5000)
    embedded = EmbeddedIndex(artifact)
    rng = np.random.default_rng(5)
    for _ in range(10):
        vector = rng.normal(size=6).astype(np.float32)
        query = CandidateQuery(
            k=int(rng.integers(1, 12)),
            vector=vector,
            exclude=frozenset(rng.choice(artifact.item_ids, 4, replace=False)),
            categories=("b",) if rng.random() < 0.5 else None,
            published_after=T0 + timedelta(days=int(rng.integers(0, 10))),
        )
        for got, want in (
            (index.search(query), embedded.search(query)),
            (index.popular(query), embedded.popular(query)),
        ):
            assert_same(got, want)


def test_scores_are_raw_inner_products_even_when_negative() -> None:
    for dot in (-3.5, -0.25, 0.0, 0.75, 12.0):
        score = dot + 1.0 if dot >= 0 else 1.0 / (1.0 - dot)
        assert inner_product_from_score(score) == pytest.approx(dot)


def test_popular_is_a_filtered_query_sorted_by_popularity(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact()
    index = ElasticIndex(client, published(client, es, artifact), timeout_ms=5000)
    got = index.popular(CandidateQuery(k=4, exclude=frozenset({"item-05"}), categories=("b",)))
    everything = index.popular(CandidateQuery(k=4))
    filtered, unfiltered = (r.body for r in es.calls("POST", "_search"))
    assert filtered == {
        "query": {
            "bool": {
                "filter": [{"terms": {"categories": ["b"]}}],
                "must_not": [{"ids": {"values": ["item-05"]}}],
            }
        },
        "sort": [{"popularity": {"order": "desc"}}, {"item_id": {"order": "asc"}}],
        "size": 4,
        "_source": ["item_id"],
        "track_total_hits": False,
    }
    assert unfiltered["query"] == {"match_all": {}}
    assert [c.source for c in got] == ["popular"] * len(got)
    assert_same(everything, EmbeddedIndex(artifact).popular(CandidateQuery(k=4)))


def test_similar_fetches_the_vector_then_excludes_the_item(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    artifact = make_artifact()
    index = ElasticIndex(client, published(client, es, artifact), dim=4, timeout_ms=5000)
    item = artifact.item_ids[6]
    got = index.similar(item, 5, exclude=frozenset({"item-00"}))
    get, search = es.requests
    assert (get.method, get.path) == ("GET", f"/{PREFIX}-{V1}/_doc/{item}")
    assert get.query == {"_source_includes": "vector"}
    assert search.body["knn"]["query_vector"] == artifact.vectors[6].tolist()
    assert search.body["knn"]["filter"] == {
        "bool": {"must_not": [{"ids": {"values": sorted({item, "item-00"})}}]}
    }
    assert item not in {c.item_id for c in got}
    assert_same(got, EmbeddedIndex(artifact).similar(item, 5, exclude=frozenset({"item-00"})))
    es.clear_requests()
    assert index.similar("no-such-item", 5) == []
    assert len(es.requests) == 1  # no kNN for an unknown item


def test_bad_queries_fail_before_any_request(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    index = ElasticIndex(client, published(client, es, make_artifact()), dim=4)
    with pytest.raises(ValueError, match=r"expects \(4,\)"):
        index.search(CandidateQuery(k=3, vector=np.ones(5, dtype=np.float32)))
    with pytest.raises(ValueError, match="popular"):
        index.search(CandidateQuery(k=3))
    with pytest.raises(ValueError, match="non-negative"):
        index.popular(CandidateQuery(k=-2))
    assert index.search(CandidateQuery(k=0, vector=np.ones(4, dtype=np.float32))) == []
    assert es.requests == []


def test_ping_says_whether_the_versioned_index_answers(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    name = published(client, es, make_artifact())
    assert ElasticIndex(client, name).ping() is True
    assert ElasticIndex(client, f"{PREFIX}-v0-missing").ping() is False
    assert [r.method for r in es.requests] == ["HEAD", "HEAD"]


def test_a_missing_index_is_a_candidate_index_error(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    index = ElasticIndex(client, f"{PREFIX}-{V2}", dim=4, timeout_ms=5000)
    with pytest.raises(CandidateIndexError, match="index_not_found") as caught:
        index.search(CandidateQuery(k=3, vector=np.ones(4, dtype=np.float32)))
    assert isinstance(caught.value.__cause__, NotFoundError)
    assert not isinstance(caught.value, CandidateIndexTimeout)
    with pytest.raises(CandidateIndexError, match="index_not_found"):
        index.similar("item-01", 3)


def test_a_slow_server_is_a_timeout_within_the_budget(
    es: ElasticsearchDouble, client: Elasticsearch
) -> None:
    name = published(client, es, make_artifact())
    es.delay_seconds = 2.0
    index = ElasticIndex(client, name, dim=4, timeout_ms=100)
    started = time.perf_counter()
    with pytest.raises(CandidateIndexTimeout, match="100 ms"):
        index.search(CandidateQuery(k=3, vector=np.ones(4, dtype=np.float32)))
    assert time.perf_counter() - started < 1.0
    # The double records a request in its own thread, which a busy machine may run only
    # after the client has given up: wait for the record, then count.
    deadline = time.monotonic() + 5
    while not es.calls("POST", "_search") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(es.calls("POST", "_search")) == 1  # no retry inside the budget


def test_connection_refused_is_an_error_at_once(closed_localhost_port: int) -> None:
    with Elasticsearch(f"http://127.0.0.1:{closed_localhost_port}") as client:
        index = ElasticIndex(client, f"{PREFIX}-{V1}", dim=4, timeout_ms=50)
        started = time.perf_counter()
        with pytest.raises(CandidateIndexError) as caught:
            index.search(CandidateQuery(k=3, vector=np.ones(4, dtype=np.float32)))
        assert not isinstance(caught.value, CandidateIndexTimeout)
        with pytest.raises(CandidateIndexError):
            index.popular(CandidateQuery(k=3))
        assert index.ping() is False
        assert time.perf_counter() - started < 1.0


# --- factories -----------------------------------------------------------------------


def test_factories_build_the_elasticsearch_backend_from_settings(
    es: ElasticsearchDouble, tmp_path
) -> None:
    settings = Settings(
        home=tmp_path,
        es_url=es.url,
        es_api_key="c2VjcmV0LWtleQ==",
        es_index_prefix="shop-items",
        store_timeout_ms=80,
    )
    artifact = make_artifact()
    publisher = open_publisher(settings.stores)
    assert isinstance(publisher, ElasticPublisher)
    name = publisher.publish(artifact)
    assert name == f"shop-items-{V1}"

    index = open_index(settings, artifact)
    assert isinstance(index, ElasticIndex)
    assert (index.index_name, index.version, index.dim, index.timeout_ms) == (name, V1, 4, 80)
    assert index.search(CandidateQuery(k=3, vector=np.ones(4, dtype=np.float32)))
    assert {r.headers.get("authorization") for r in es.requests} == {"ApiKey c2VjcmV0LWtleQ=="}


def test_alias_swap_scenario_against_the_double(client: Elasticsearch) -> None:
    alias_swap_scenario(client, "scenario-items", exact=True)
