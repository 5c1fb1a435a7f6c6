"""Owners, code versions and column schemas of every asset, applied in one place.

Declared here rather than on each decorator so that no asset can be added without them
(``with_attributes`` refuses an asset whose group has no package below) and the
declarations stay in one table, as Dagster's "add attributes to a folder of assets"
pattern does.

``code_version`` is a digest of the source of the package that computes the asset
(``recsys_assets/<package>/*.py``): it changes exactly when that code changes, the same in
an editable checkout, a wheel or an image, so Dagster can tell code-stale assets from
fresh ones. The shared runtime in ``recsys_serving`` is versioned by the bundle
manifest's ``code_sha`` instead.

``dagster/column_schema`` is declared for every asset that writes a Parquet table, from
the very polars schema the writer casts to, so the catalogue shows what is on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path

import dagster as dg
import polars as pl

from recsys_assets.monitoring.ctr import SERIES_SCHEMA
from recsys_assets.training.ranking import RANKING_DATASET_SCHEMA
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA
from recsys_serving.stores.catalog import ITEMS_SCHEMA, USERS_SCHEMA

OWNERS: tuple[str, ...] = ("team:recsys",)

# The package under recsys_assets/ whose code computes each asset group.
PACKAGE_OF_GROUP: Mapping[str, str] = {
    "acquisition": "weblogs",
    "catalog": "catalog",
    "training": "training",
    "closed_loop": "monitoring",
    "deployment": "packaging",
}

# Assets that write a Parquet table: the polars schema of what they write.
PARQUET_SCHEMAS: Mapping[str, Mapping[str, pl.DataType]] = {
    "weblogs": WEBLOGS_SCHEMA,
    "item_catalog": ITEMS_SCHEMA,
    "user_profiles": USERS_SCHEMA,
    "online_ctr": SERIES_SCHEMA,
    "ranking_dataset": RANKING_DATASET_SCHEMA,
}

_ROOT = Path(__file__).resolve().parent


def _type_name(dtype: pl.DataType) -> str:
    """A column type as Arrow spells it (what a Parquet reader shows)."""
    if isinstance(dtype, pl.List):
        return f"list[{_type_name(dtype.inner)}]"
    if isinstance(dtype, pl.Datetime):
        zone = f", {dtype.time_zone}" if dtype.time_zone else ""
        return f"timestamp[{dtype.time_unit}{zone}]"
    if dtype == pl.String:
        return "string"
    if dtype == pl.Boolean:
        return "bool"
    return str(dtype).lower()


def table_schema(schema: Mapping[str, pl.DataType]) -> dg.TableSchema:
    """The ``dagster/column_schema`` of a table written with this polars schema."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name, _type_name(dtype)) for name, dtype in schema.items()]
    )


@cache
def package_code_version(package: str) -> str:
    """A digest of ``recsys_assets/<package>/**/*.py`` (paths and bytes, in path order)."""
    root = _ROOT / package
    files = sorted(root.rglob("*.py"))
    if not files:
        raise ValueError(f"recsys_assets/{package} holds no Python source")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _attributes(spec: dg.AssetSpec) -> dg.AssetSpec:
    group = spec.group_name or "default"
    if group not in PACKAGE_OF_GROUP:
        raise ValueError(
            f"asset {spec.key.to_user_string()} is in group {group!r}, which has no package "
            "in recsys_assets.attributes.PACKAGE_OF_GROUP"
        )
    spec = spec.replace_attributes(
        owners=list(OWNERS),
        code_version=package_code_version(PACKAGE_OF_GROUP[group]),
    )
    schema = PARQUET_SCHEMAS.get(spec.key.to_user_string())
    if schema is not None:
        spec = spec.merge_attributes(metadata={"dagster/column_schema": table_schema(schema)})
    return spec


def with_attributes(
    assets: Iterable[dg.AssetsDefinition | dg.AssetSpec],
) -> Sequence[dg.AssetsDefinition | dg.AssetSpec]:
    """The assets with owners, code version and, for Parquet tables, the column schema."""
    return dg.map_asset_specs(_attributes, assets)
