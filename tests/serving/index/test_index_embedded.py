"""The in-process candidate index against a plain-Python reference of the same semantics."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_serving.index import (
    CandidateQuery,
    EmbeddedIndex,
    IndexArtifact,
    open_index,
    open_publisher,
)
from recsys_serving.settings import Settings

DAY = 86_400.0
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_artifact(n: int = 40, dim: int = 8, seed: int = 0, n_categories: int = 5) -> IndexArtifact:
    rng = np.random.default_rng(seed)
    published = T0.timestamp() + rng.integers(0, 30, n).astype(np.float64) * DAY
    published[::7] = np.nan  # every 7th item has no date
    return IndexArtifact(
        version="v20240101000000-0000abcd",
        # Ids out of row order, so tie-breaking by id differs from breaking by row.
        item_ids=[f"item-{i:03d}" for i in rng.permutation(n)],
        vectors=rng.normal(size=(n, dim)).astype(np.float32),
        categories=[[f"c{j}" for j in range(n_categories) if rng.random() < 0.3] for _ in range(n)],
        published_at=published,
        popularity=rng.integers(0, 10, n).astype(np.float32),  # many ties on purpose
        titles=[f"title {i}" for i in range(n)],
    )


def reference(
    artifact: IndexArtifact, scores: np.ndarray, query: CandidateQuery, never: set[str]
) -> list[tuple[str, float]]:
    """The semantics, one item at a time: filters, then (score desc, item id asc)."""
    after = query.published_after.timestamp() if query.published_after else None
    before = query.published_before.timestamp() if query.published_before else None
    rows = []
    for row, item_id in enumerate(artifact.item_ids):
        if item_id in query.exclude or item_id in never:
            continue
        if query.categories and not set(query.categories) & set(artifact.categories[row]):
            continue
        published = artifact.published_at[row]
        if after is not None and not (published >= after):
            continue
        if before is not None and not (published <= before):
            continue
        rows.append((item_id, float(scores[row])))
    rows.sort(key=lambda pair: (-pair[1], pair[0]))
    return rows[: query.k]


def pairs(candidates: list) -> list[tuple[str, float]]:
    return [(c.item_id, c.score) for c in candidates]


def assert_same(got: list, want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in pairs(got)] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in pairs(got)], [s for _, s in want], rtol=1e-5)


@pytest.fixture(scope="module")
def artifact() -> IndexArtifact:
    return make_artifact()


@pytest.fixture(scope="module")
def index(artifact: IndexArtifact) -> EmbeddedIndex:
    return EmbeddedIndex(artifact)


def test_search_returns_top_k_by_inner_product(
    artifact: IndexArtifact, index: EmbeddedIndex
) -> None:
    user = np.random.default_rng(1).normal(size=artifact.dim).astype(np.float32)
    got = index.search(CandidateQuery(k=5, vector=user))
    assert len(got) == 5
    assert {c.source for c in got} == {"knn"}
    assert_same(got, reference(artifact, artifact.vectors @ user, CandidateQuery(k=5), set()))
    best = int(np.argmax(artifact.vectors @ user))
    assert got[0].item_id == artifact.item_ids[best]


def test_exclude_categories_and_window_filter(
    artifact: IndexArtifact, index: EmbeddedIndex
) -> None:
    user = np.random.default_rng(2).normal(size=artifact.dim).astype(np.float32)
    unfiltered = index.search(CandidateQuery(k=3, vector=user))
    seen = frozenset(c.item_id for c in unfiltered) | {"not-in-catalog"}
    query = CandidateQuery(
        k=10,
        vector=user,
        exclude=seen,
        categories=("c1", "c3"),
        published_after=T0 + timedelta(days=5),
        published_before=T0 + timedelta(days=20),
    )
    got = index.search(query)
    assert got, "the filters should leave something in a 40-item catalogue"
    for c in got:
        row = artifact.item_ids.index(c.item_id)
        assert c.item_id not in seen
        assert {"c1", "c3"} & set(artifact.categories[row])
        assert T0.timestamp() + 5 * DAY <= artifact.published_at[row] <= T0.timestamp() + 20 * DAY
    assert_same(got, reference(artifact, artifact.vectors @ user, query, set()))


def test_window_is_inclusive_and_undated_items_pass_only_without_window() -> None:
    artifact = IndexArtifact(
        version="v1",
        item_ids=["early", "edge", "late", "undated"],
        vectors=np.ones((4, 2), dtype=np.float32),
        categories=[[], [], [], []],
        published_at=np.array(
            [T0.timestamp() - DAY, T0.timestamp(), T0.timestamp() + DAY, math.nan]
        ),
        popularity=np.array([4, 3, 2, 1], dtype=np.float32),
    )
    index = EmbeddedIndex(artifact)
    vector = np.ones(2, dtype=np.float32)
    assert [c.item_id for c in index.search(CandidateQuery(k=9, vector=vector))] == [
        "early",
        "edge",
        "late",
        "undated",
    ]
    on_the_edge = CandidateQuery(k=9, vector=vector, published_after=T0, published_before=T0)
    assert [c.item_id for c in index.search(on_the_edge)] == ["edge"]
    # A naive datetime is UTC; an aware one in another zone is converted.
    naive = CandidateQuery(k=9, vector=vector, published_after=T0.replace(tzinfo=None))
    assert [c.item_id for c in index.popular(naive)] == ["edge", "late"]
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    assert [c.item_id for c in index.popular(CandidateQuery(k=9, published_before=plus_two))] == [
        "early",
        "edge",
    ]


def test_ties_are_broken_by_item_id() -> None:
    artifact = IndexArtifact(
        version="v1",
        item_ids=["d", "b", "a", "c", "e"],
        vectors=np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32),
        categories=[[]] * 5,
        published_at=np.full(5, math.nan),
        popularity=np.array([1, 1, 1, 5, 1], dtype=np.float32),
    )
    index = EmbeddedIndex(artifact)
    got = index.search(CandidateQuery(k=3, vector=np.array([1, 0], dtype=np.float32)))
    assert [c.item_id for c in got] == ["a", "b", "d"]
    assert [c.item_id for c in index.popular(CandidateQuery(k=3))] == ["c", "a", "b"]
    assert [c.item_id for c in index.popular(CandidateQuery(k=3, exclude=frozenset("a")))] == [
        "c",
        "b",
        "d",
    ]


def test_popular_orders_by_popularity_with_filters(
    artifact: IndexArtifact, index: EmbeddedIndex
) -> None:
    for query in [
        CandidateQuery(k=7),
        CandidateQuery(k=7, exclude=frozenset(artifact.item_ids[:10])),
        CandidateQuery(k=7, categories=("c0",), exclude=frozenset(artifact.item_ids[::3])),
        CandidateQuery(k=100, published_after=T0 + timedelta(days=10)),
    ]:
        got = index.popular(query)
        assert {c.source for c in got} <= {"popular"}
        assert_same(got, reference(artifact, artifact.popularity, query, set()))


def test_similar_uses_the_item_vector_and_never_returns_the_item(
    artifact: IndexArtifact, index: EmbeddedIndex
) -> None:
    item = artifact.item_ids[4]
    got = index.similar(item, 6, exclude=frozenset({artifact.item_ids[5]}))
    assert item not in {c.item_id for c in got}
    assert {c.source for c in got} == {"similar"}
    scores = artifact.vectors @ artifact.vectors[4]
    want = reference(
        artifact, scores, CandidateQuery(k=6, exclude=frozenset({artifact.item_ids[5]})), {item}
    )
    assert_same(got, want)
    assert index.similar("unknown-item", 5) == []
    assert index.similar(item, 0) == []


def test_bad_queries_are_clear_value_errors(index: EmbeddedIndex) -> None:
    with pytest.raises(ValueError, match=r"expects \(8,\)"):
        index.search(CandidateQuery(k=3, vector=np.ones(7, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"expects \(8,\)"):
        index.search(CandidateQuery(k=3, vector=np.ones((1, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        index.search(CandidateQuery(k=3, vector=np.full(8, np.nan, dtype=np.float32)))
    with pytest.raises(ValueError, match="popular"):
        index.search(CandidateQuery(k=3))
    with pytest.raises(ValueError, match="non-negative"):
        index.popular(CandidateQuery(k=-1))
    assert index.search(CandidateQuery(k=0, vector=np.ones(8, dtype=np.float32))) == []


def test_bad_artifacts_are_refused() -> None:
    good = make_artifact(n=5, dim=3)
    with pytest.raises(ValueError, match="shape"):
        EmbeddedIndex(
            IndexArtifact(**{**good.__dict__, "vectors": good.vectors[:4]})  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = good.vectors.copy()
        bad[2, 1] = np.inf
        EmbeddedIndex(IndexArtifact(**{**good.__dict__, "vectors": bad}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not unique"):
        EmbeddedIndex(
            IndexArtifact(**{**good.__dict__, "item_ids": ["a", "b", "c", "d", "a"]})  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="popularity"):
        EmbeddedIndex(
            IndexArtifact(**{**good.__dict__, "popularity": good.popularity[:2]})  # type: ignore[arg-type]
        )


def test_empty_catalogue_answers_nothing() -> None:
    empty = IndexArtifact(
        version="v0",
        item_ids=[],
        vectors=np.zeros((0, 4), dtype=np.float32),
        categories=[],
        published_at=np.zeros(0),
        popularity=np.zeros(0, dtype=np.float32),
    )
    index = EmbeddedIndex(empty)
    assert index.search(CandidateQuery(k=5, vector=np.ones(4, dtype=np.float32))) == []
    assert index.popular(CandidateQuery(k=5)) == []
    assert index.ping() is True


def test_saved_artifact_round_trips_into_the_same_index(tmp_path, artifact: IndexArtifact) -> None:
    artifact.save(tmp_path / "index")
    loaded = EmbeddedIndex(IndexArtifact.load(tmp_path / "index"))
    user = np.random.default_rng(3).normal(size=artifact.dim).astype(np.float32)
    query = CandidateQuery(k=8, vector=user, categories=("c2",), exclude=frozenset({"item-001"}))
    assert loaded.search(query) == EmbeddedIndex(artifact).search(query)
    assert loaded.popular(query) == EmbeddedIndex(artifact).popular(query)


def test_factories_default_to_the_embedded_index(tmp_path, artifact: IndexArtifact) -> None:
    settings_ = Settings(home=tmp_path, es_url=None)
    index = open_index(settings_, artifact)
    assert isinstance(index, EmbeddedIndex)
    assert index.version == artifact.version
    assert open_publisher(settings_.stores) is None


# --- property: agrees with the brute-force reference for any query ---------------------

QUERY_ARTIFACT = make_artifact(n=60, dim=4, seed=7, n_categories=4)
QUERY_INDEX = EmbeddedIndex(QUERY_ARTIFACT)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(0, 70),
    vector=st.lists(st.integers(-3, 3), min_size=4, max_size=4),  # integers: exact ties
    exclude=st.sets(st.sampled_from([*QUERY_ARTIFACT.item_ids, "ghost"]), max_size=30),
    categories=st.none() | st.lists(st.sampled_from(["c0", "c1", "c2", "c3", "cx"]), max_size=3),
    after_days=st.none() | st.integers(-1, 31),
    span_days=st.none() | st.integers(0, 31),
    popular=st.booleans(),
)
def test_matches_brute_force_reference(
    k: int,
    vector: list[int],
    exclude: set[str],
    categories: list[str] | None,
    after_days: int | None,
    span_days: int | None,
    popular: bool,
) -> None:
    after = T0 + timedelta(days=after_days) if after_days is not None else None
    before = (after or T0) + timedelta(days=span_days) if span_days is not None else None
    query = CandidateQuery(
        k=k,
        vector=np.array(vector, dtype=np.float32),
        exclude=frozenset(exclude),
        categories=tuple(categories) if categories is not None else None,
        published_after=after,
        published_before=before,
    )
    if popular:
        got = QUERY_INDEX.popular(query)
        scores = QUERY_ARTIFACT.popularity
    else:
        got = QUERY_INDEX.search(query)
        scores = QUERY_ARTIFACT.vectors @ query.vector
    assert_same(got, reference(QUERY_ARTIFACT, scores, query, set()))
