"""Every asset has owners and a code version; every Parquet asset declares the column
schema of the table it really writes (read back from the files, not from the constants)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from model_support import TinyWorld, tiny_outcome, tiny_world  # noqa: F401  (fixtures)

from recsys_assets import attributes
from recsys_assets.attributes import OWNERS, PARQUET_SCHEMAS, package_code_version, table_schema
from recsys_assets.definitions import make_definitions
from recsys_assets.monitoring.ctr import load_ctr_series
from recsys_assets.training import artifacts as art
from recsys_assets.training.pipeline import TrainOutcome
from recsys_serving.lake import LocalLake, write_parquet
from recsys_serving.layout import CATALOG_ITEMS_KEY, CATALOG_USERS_KEY, weblogs_key
from recsys_serving.settings import Settings
from recsys_serving.stores.catalog import write_items_snapshot, write_users_snapshot
from recsys_serving.stores.docstore import open_docstore


def _specs(tmp_path: Path) -> dict[str, dg.AssetSpec]:
    defs = make_definitions(Settings(home=tmp_path / "home", mongo_uri=None))
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): graph.get(key).to_asset_spec() for key in graph.get_all_asset_keys()
    }


def _declared(spec: dg.AssetSpec) -> dg.TableSchema:
    return spec.metadata["dagster/column_schema"]


def _written(path: Path | None) -> dg.TableSchema:
    assert path is not None and path.is_file(), path
    return table_schema(dict(pl.read_parquet_schema(path)))


def test_every_asset_has_owners_and_a_code_version(tmp_path: Path) -> None:
    specs = _specs(tmp_path)
    assert len(specs) >= 17
    for name, spec in specs.items():
        assert list(spec.owners) == list(OWNERS), name
        assert spec.code_version is not None and len(spec.code_version) == 16, name


def test_every_parquet_asset_declares_a_column_schema(tmp_path: Path) -> None:
    specs = _specs(tmp_path)
    parquet = {name for name, spec in specs.items() if "parquet" in spec.kinds}
    assert parquet == set(PARQUET_SCHEMAS)
    for name in parquet:
        assert _declared(specs[name]) == table_schema(PARQUET_SCHEMAS[name])
    assert all("dagster/column_schema" not in specs[n].metadata for n in set(specs) - parquet)


def test_code_version_follows_the_package_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Assets computed by one package share its version; other packages differ.
    specs = _specs(tmp_path)
    assert specs["interactions"].code_version == specs["ranking_model"].code_version
    assert specs["weblogs"].code_version != specs["interactions"].code_version
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "steps.py"
    source.write_text("X = 1\n")
    monkeypatch.setattr(attributes, "_ROOT", tmp_path)
    package_code_version.cache_clear()
    try:
        before = package_code_version("pkg")
        package_code_version.cache_clear()
        assert package_code_version("pkg") == before  # deterministic
        source.write_text("X = 2\n")
        package_code_version.cache_clear()
        assert package_code_version("pkg") != before
    finally:
        package_code_version.cache_clear()


def test_weblogs_catalog_and_ctr_tables_match_their_declared_schema(
    tmp_path: Path,
    tiny_world: TinyWorld,  # noqa: F811
) -> None:
    specs = _specs(tmp_path)
    lake = tiny_world.lake
    assert _written(lake.local_path(weblogs_key(tiny_world.days[0]))) == _declared(specs["weblogs"])

    own = LocalLake(tmp_path / "lake")
    store = open_docstore(Settings(home=tmp_path / "home", mongo_uri=None))
    store.upsert_items(
        [{"item_id": "a", "title": "A", "categories": ["x"], "published_at": 1714550400}]
    )
    store.upsert_users([{"user_id": "u", "age": 3}])
    write_items_snapshot(store, own)
    write_users_snapshot(store, own)
    store.close()
    assert _written(own.local_path(CATALOG_ITEMS_KEY)) == _declared(specs["item_catalog"])
    assert _written(own.local_path(CATALOG_USERS_KEY)) == _declared(specs["user_profiles"])

    series, _ = load_ctr_series(
        lake, tiny_world.summary.end, lookback=timedelta(days=2), bucket_seconds=3600
    )
    assert series.height > 0  # a real series, not the empty frame's schema
    write_parquet(own, "ctr.parquet", series)  # what the online_ctr snapshot writes
    assert _written(own.local_path("ctr.parquet")) == _declared(specs["online_ctr"])


@pytest.mark.slow
def test_ranking_dataset_table_matches_its_declared_schema(
    tmp_path: Path,
    tiny_world: TinyWorld,  # noqa: F811
    tiny_outcome: TrainOutcome,  # noqa: F811
) -> None:
    specs = _specs(tmp_path)
    key = art.key("ranking_dataset", "dataset.parquet")  # outside a run: the pipeline's key
    assert _written(tiny_world.lake.local_path(key)) == _declared(specs["ranking_dataset"])
