"""Issue 11's regime as a test fixture: a small bursty ratings world, landed in a lake.

The world is ``bench/datasets.py``'s ``bursty`` shape (users rate in short bursts at
their own times over months, items released over the whole period, rating events only,
a hidden taste model) at a size a test can train on in seconds. The generator is the
benchmark's own, so a test and ``bench/blackbox.py`` see the same regime.

Usage::

    from bursty_support import bursty_world  # noqa: F401  (session-scoped pytest fixture)

    def test_something(bursty_world: BurstyWorld) -> None:
        split = protocols.split(bursty_world.events, "per-user")

Or call the builders directly:

* ``bursty_dataset(seed=0, **sizes) -> Dataset``: the generated frames (``events``:
  ``event_id``, ``event_type`` = ``rating``, ``user_id``, ``item_id`` (integers),
  ``ts`` (integer epoch seconds), ``value`` 1..5; ``items`` with ``published_at``;
  ``users``), ``BURSTY_TINY`` sizes by default (200 users, 240 items, ~6k ratings,
  120 days);
* ``land_bursty(root, events, items, users) -> BurstyWorld``: lands the events through
  the real intake into ``root/home/lake``, processes them with the real business rules
  and writes the catalogue snapshots, as ``recsys catalog load`` + ``recsys ingest``
  would (pass the training rows of a split to train on them only);
* ``land_split(root, dataset, protocol) -> (BurstyWorld, ProtocolSplit)``: lands only
  the training events of acceptance's ``per-user`` or ``global`` split; the split's
  ``truth`` is what a served list is scored against (``protocols.metrics``);
* ``bursty_params(settings)``: small ``TrainingParams`` (small ALS, few boosting rounds)
  on the settings' windows, which are the defaults acceptance retrains with.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from recsys_assets.training.params import TrainingParams
from recsys_serving.lake import LocalLake, write_parquet
from recsys_serving.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import datasets
import protocols
from model_support import land_and_process

BURSTY_TINY: dict[str, Any] = {
    "n_users": 200,
    "n_items": 240,
    "median_ratings": 20,
    "days": 120,
}
END = datasets.BURSTY_END


@dataclass
class BurstyWorld:
    root: Path
    settings: Settings
    lake: LocalLake
    events: pl.DataFrame  # the events that were landed (bench/datasets.py columns)
    items: pl.DataFrame
    users: pl.DataFrame
    days: list[str]


def bursty_dataset(seed: int = 0, **sizes: Any) -> datasets.Dataset:
    shape = {**BURSTY_TINY, **sizes}
    return datasets.bursty_world(
        shape["n_users"], shape["n_items"], shape["median_ratings"], shape["days"], seed
    )


def bursty_settings(root: Path, seed: int = 0, **overrides: Any) -> Settings:
    """The default training windows (acceptance retrains with defaults), one thread."""
    return Settings(**{"home": root / "home", "seed": seed, "threads": 1, **overrides})


def bursty_params(settings: Settings, seed: int = 0, **overrides: Any) -> TrainingParams:
    small = {
        "als_factors": 16,
        "als_iterations": 8,
        "lgb_rounds": 60,
        "lgb_min_data_in_leaf": 20,
        "candidate_pool": 100,
        "eval_max_users": 300,
        "seed": seed,
        "threads": 1,
    }
    return TrainingParams.create(**{**settings.training.as_dict(), **small, **overrides})


def _write_catalog(lake: LocalLake, items: pl.DataFrame, users: pl.DataFrame) -> None:
    """Catalogue snapshots as ``recsys catalog load`` + ``item_catalog`` write them."""
    write_parquet(
        lake,
        "catalog/items.parquet",
        items.select(
            pl.col("item_id").cast(pl.String),
            pl.col("title").cast(pl.String),
            pl.col("categories").cast(pl.List(pl.String)),
            pl.col("published_at").str.to_datetime(time_unit="us", time_zone="UTC"),
            pl.lit("{}").alias("attributes"),
        ),
    )
    attrs = [c for c in users.columns if c != "user_id"]
    write_parquet(
        lake,
        "catalog/users.parquet",
        pl.DataFrame(
            {
                "user_id": users["user_id"].cast(pl.String),
                "attributes": [
                    orjson.dumps({k: row[k] for k in attrs}).decode()
                    for row in users.iter_rows(named=True)
                ],
            }
        ),
    )


def land_bursty(
    root: Path,
    events: pl.DataFrame,
    items: pl.DataFrame,
    users: pl.DataFrame,
    seed: int = 0,
) -> BurstyWorld:
    """Land ``events`` (NDJSON lines, as a dump converter writes them) and the catalogue."""
    root.mkdir(parents=True, exist_ok=True)
    settings = bursty_settings(root, seed)
    lake = LocalLake(settings.resolved_lake_uri)
    path = root / "events.ndjson"
    columns = ["event_id", "event_type", "user_id", "item_id", "ts", "value"]
    events.select(columns).write_ndjson(path)
    days = land_and_process(lake, settings, [path])
    _write_catalog(lake, items, users)
    return BurstyWorld(root, settings, lake, events, items, users, days)


def build_bursty_world(root: Path, seed: int = 0, **sizes: Any) -> BurstyWorld:
    ds = bursty_dataset(seed, **sizes)
    assert ds.users is not None
    return land_bursty(root, ds.events, ds.items, ds.users, seed)


def land_split(
    root: Path, ds: datasets.Dataset, protocol: str, seed: int = 0
) -> tuple[BurstyWorld, protocols.ProtocolSplit]:
    """Land only the training events of an acceptance split (``per-user`` or ``global``,
    ``bench/protocols.py``), as acceptance ingests them; the split holds the test truth."""
    assert ds.users is not None
    sp = protocols.split(ds.events, protocol)
    rows = ds.events.with_row_index("n").join(sp.train.select("n"), on="n", how="semi")
    return land_bursty(root, rows.drop("n"), ds.items, ds.users, seed), sp


@pytest.fixture(scope="session")
def bursty_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BurstyWorld]:
    """The whole tiny bursty log, landed (tests split ``events`` themselves as needed)."""
    yield build_bursty_world(tmp_path_factory.mktemp("bursty-world"))


__all__ = ["END", "BurstyWorld", "build_bursty_world", "bursty_world", "datasets", "protocols"]
