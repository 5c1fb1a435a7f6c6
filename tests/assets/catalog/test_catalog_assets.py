"""``item_catalog`` / ``user_profiles``: the store's snapshots, with the exact columns."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import mongomock
import orjson
import polars as pl
import pytest

from recsys_assets.catalog.assets import item_catalog, user_profiles
from recsys_assets.catalog.resources import DocStoreResource
from recsys_assets.definitions import make_definitions
from recsys_assets.resources import LakeResource
from recsys_serving.lake import LocalLake, read_parquet
from recsys_serving.settings import Settings
from recsys_serving.stores.catalog import (
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    to_document,
    write_items_snapshot,
)
from recsys_serving.stores.docstore import DocStore, open_docstore

T = datetime(2024, 5, 1, 8, 0, 0, 250000, tzinfo=UTC)

ITEMS_IN = [
    {
        "item_id": "b",
        "title": "Bee",
        "categories": ["x", "y"],
        "published_at": "2024-05-01T08:00:00.25Z",
        "price": 9.5,
        "specs": {"size": "L", "tags": ["t1"]},
    },
    {"item_id": 7, "categories": "x"},
    {"item_id": "a", "title": "Ay", "categories": ["y"], "published_at": 1714550400},
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", mongo_uri=None
    )  # embedded even if the env names a server


def _materialize(settings: Settings) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [item_catalog, user_profiles],
        resources={
            "docstore": DocStoreResource.from_settings(settings),
            "lake": LakeResource.from_settings(settings),
        },
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)
    ]
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def test_snapshots_have_the_contract_columns(settings: Settings) -> None:
    store = open_docstore(settings, refresh_seconds=0)
    store.upsert_items(to_document("items", o) for o in ITEMS_IN)
    store.upsert_users(
        to_document("users", o)
        for o in [{"user_id": "u2", "country": "DE"}, {"user_id": "u1", "vip": True, "n": 3}]
    )

    result = _materialize(settings)
    assert result.success
    lake = LocalLake(settings.resolved_lake_uri)
    items = read_parquet(lake, "catalog/items.parquet")
    assert items.schema == pl.Schema(ITEMS_SCHEMA)
    assert items.to_dicts() == [
        {
            "item_id": "7",
            "title": None,
            "categories": ["x"],
            "published_at": None,
            "attributes": "{}",
        },
        {
            "item_id": "a",
            "title": "Ay",
            "categories": ["y"],
            "published_at": datetime(2024, 5, 1, 8, tzinfo=UTC),
            "attributes": "{}",
        },
        {
            "item_id": "b",
            "title": "Bee",
            "categories": ["x", "y"],
            "published_at": T,
            "attributes": '{"price":9.5,"specs":{"size":"L","tags":["t1"]}}',
        },
    ]
    users = read_parquet(lake, "catalog/users.parquet")
    assert users.schema == pl.Schema(USERS_SCHEMA)
    assert users.to_dicts() == [
        {"user_id": "u1", "attributes": '{"n":3,"vip":true}'},
        {"user_id": "u2", "attributes": '{"country":"DE"}'},
    ]

    meta = _metadata(result, "item_catalog")
    assert meta["dagster/row_count"] == 3 and meta["categories"] == 2
    assert meta["top_categories"].splitlines() == [
        "| category | items |",
        "| --- | ---: |",
        "| x | 2 |",
        "| y | 2 |",
    ]
    assert meta["store"] == settings.docstore_path.as_uri()
    assert meta["path"] == str(lake.local_path("catalog/items.parquet"))
    assert [c.name for c in meta["dagster/column_schema"].columns] == list(ITEMS_SCHEMA)
    assert _metadata(result, "user_profiles")["dagster/row_count"] == 2

    # Same store, same hash; any change to a document, a new hash.
    first = meta["content_hash"]
    assert _metadata(_materialize(settings), "item_catalog")["content_hash"] == first
    store.upsert_items([to_document("items", {**ITEMS_IN[2], "title": "Ay!"})])
    assert _metadata(_materialize(settings), "item_catalog")["content_hash"] != first


def test_empty_store_gives_empty_snapshots_with_the_schema(settings: Settings) -> None:
    result = _materialize(settings)
    assert result.success
    lake = LocalLake(settings.resolved_lake_uri)
    items = read_parquet(lake, "catalog/items.parquet")
    assert items.height == 0 and items.schema == pl.Schema(ITEMS_SCHEMA)
    assert read_parquet(lake, "catalog/users.parquet").schema == pl.Schema(USERS_SCHEMA)
    assert _metadata(result, "item_catalog")["dagster/row_count"] == 0


def test_documents_written_by_other_tools_are_repaired_and_counted(
    settings: Settings, tmp_path: Path
) -> None:
    store = open_docstore(settings, refresh_seconds=0)
    store.upsert_items(
        [
            {"item_id": "p", "title": 12, "categories": "solo", "published_at": "not a date"},
            {"item_id": "q", "categories": [3, {"no": 1}], "published_at": datetime(2024, 1, 2)},
        ]
    )
    result = _materialize(settings)
    items = read_parquet(LocalLake(settings.resolved_lake_uri), "catalog/items.parquet")
    assert items.to_dicts() == [
        {
            "item_id": "p",
            "title": "12",
            "categories": ["solo"],
            "published_at": None,
            "attributes": "{}",
        },
        {
            "item_id": "q",
            "title": None,
            "categories": [],
            "published_at": datetime(2024, 1, 2, tzinfo=UTC),
            "attributes": "{}",
        },
    ]
    repaired = _metadata(result, "item_catalog")["repaired_fields"]
    assert repaired == {"title": 1, "published_at": 1, "categories": 1}


def test_snapshot_streams_in_batches_through_the_pymongo_path(
    mongomock_bulk_compat: None, tmp_path: Path
) -> None:
    store = DocStore.from_client(mongomock.MongoClient(tz_aware=True), "recsys", uri="mongodb://h")
    docs = [
        to_document("items", {"item_id": f"i{n:02d}", "categories": [f"c{n % 3}"], "n": n})
        for n in range(23)
    ]
    store.upsert_items(docs)
    lake = LocalLake(tmp_path / "lake")
    snap = write_items_snapshot(store, lake, batch_size=5)
    frame = read_parquet(lake, "catalog/items.parquet")
    assert snap.rows == frame.height == 23
    assert frame["item_id"].to_list() == [f"i{n:02d}" for n in range(23)]
    assert [orjson.loads(a)["n"] for a in frame["attributes"]] == list(range(23))
    assert snap.category_counts == {"c0": 8, "c1": 8, "c2": 7}


def test_assets_are_in_the_code_location(settings: Settings) -> None:
    defs = make_definitions(settings)
    for name in ("item_catalog", "user_profiles"):
        spec = defs.resolve_assets_def(name).specs_by_key[dg.AssetKey(name)]
        assert spec.group_name == "catalog" and spec.kinds == {"mongodb", "parquet"}
