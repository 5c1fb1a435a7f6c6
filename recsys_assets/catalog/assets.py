"""``item_catalog`` and ``user_profiles``: the document store, snapshotted to the lake.

Training reads these Parquet files, never the live store, so a run records exactly which
catalogue it saw (row counts and a content hash in the metadata).
"""

# No `from __future__ import annotations`: Dagster inspects the context annotation.
from collections import Counter
from collections.abc import Mapping

import dagster as dg
import polars as pl

from recsys_assets.attributes import table_schema
from recsys_assets.catalog.resources import DocStoreResource
from recsys_assets.resources import LakeResource
from recsys_serving.stores.catalog import (
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Snapshot,
    write_items_snapshot,
    write_users_snapshot,
)

TOP_CATEGORIES = 20


def category_table(counts: Counter[str], top: int = TOP_CATEGORIES) -> str:
    """The most common categories as a markdown table (how the UI shows the catalogue)."""
    lines = ["| category | items |", "| --- | ---: |"]
    lines += [f"| {name} | {n:,} |" for name, n in counts.most_common(top)]
    return "\n".join(lines)


def _metadata(
    snap: Snapshot, store_uri: str, columns: Mapping[str, pl.DataType]
) -> dict[str, object]:
    meta: dict[str, object] = {
        "dagster/row_count": snap.rows,
        "dagster/column_schema": table_schema(columns),
        "path": dg.MetadataValue.path(snap.uri),
        "size_bytes": snap.size_bytes,
        "content_hash": snap.content_hash,
        "store": store_uri,
    }
    if snap.repaired:
        meta["repaired_fields"] = dg.MetadataValue.json(dict(snap.repaired))
    return meta


@dg.asset(
    group_name="catalog",
    kinds={"mongodb", "parquet"},
    description="Items of the document store as catalog/items.parquet "
    "(item_id, title, categories, published_at, attributes as JSON).",
)
def item_catalog(
    context: dg.AssetExecutionContext, docstore: DocStoreResource, lake: LakeResource
) -> dg.MaterializeResult:
    with docstore.open() as store:
        snap = write_items_snapshot(store, lake.get())
        uri = store.uri
    if snap.rows == 0:
        context.log.warning("the document store holds no items; run `recsys catalog load`")
    meta = _metadata(snap, uri, ITEMS_SCHEMA)
    meta["categories"] = len(snap.category_counts)
    meta["top_categories"] = dg.MetadataValue.md(category_table(snap.category_counts))
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    group_name="catalog",
    kinds={"mongodb", "parquet"},
    description="Users of the document store as catalog/users.parquet "
    "(user_id, attributes as JSON).",
)
def user_profiles(
    context: dg.AssetExecutionContext, docstore: DocStoreResource, lake: LakeResource
) -> dg.MaterializeResult:
    with docstore.open() as store:
        snap = write_users_snapshot(store, lake.get())
        uri = store.uri
    if snap.rows == 0:
        context.log.warning("the document store holds no users; run `recsys catalog load`")
    return dg.MaterializeResult(metadata=_metadata(snap, uri, USERS_SCHEMA))
