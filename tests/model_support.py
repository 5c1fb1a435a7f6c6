"""A tiny simulated world and a real trained bundle, for any test that needs a model.

Usage from a test module (the fixtures are session-scoped: the world is simulated,
landed, processed and trained once per test session, in a few seconds)::

    from model_support import tiny_bundle, tiny_world  # noqa: F401  (pytest fixtures)

    def test_something(tiny_bundle: Path) -> None:
        model = Recommender.load(tiny_bundle)

Or call the builders directly (e.g. into your own ``tmp_path``):

* ``build_tiny_world(root, seed=0, end=END, **sizes) -> TinyWorld``: simulates
  ``recsys_assets.simulation.history.simulate_history`` (300 users, 200 items,
  8 categories, 4 days, 40k events by default), lands every line through the real
  intake into a local lake under ``root/home/lake``, processes the weblogs partitions
  with the real business rules, and writes the catalogue snapshots
  (``catalog/items.parquet``, ``catalog/users.parquet``) in the document-store
  contract's schema. ``TinyWorld.settings`` points ``RECSYS_HOME`` at ``root/home``
  with windows sized for the world (holdout 0.5 day, labels 0.75 day).
* ``build_tiny_bundle(root, seed=0) -> Path``: the world above plus
  ``recsys_assets.training.pipeline.train_bundle``; returns the bundle directory
  (``root/bundles/<version>``), loadable with ``Recommender.load``.
* ``tiny_params(seed)``: the ``TrainingParams`` used (small ALS, few boosting rounds).

The world's ground truth (``TinyWorld.summary.truth_path``) is saved alongside, so a
test can check recommendations against what users really prefer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from recsys_assets.simulation.history import SimulationSummary, simulate_history
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.pipeline import TrainOutcome, train_bundle
from recsys_assets.weblogs.processing import Rules, process_partitions
from recsys_serving.events.intake import EventIntake, RawEvent
from recsys_serving.lake import LocalLake, write_parquet
from recsys_serving.settings import Settings

END = datetime(2024, 6, 1, tzinfo=UTC)
TINY: dict[str, Any] = {
    "n_users": 300,
    "n_items": 200,
    "n_categories": 8,
    "days": 4.0,
    "n_events": 40_000,
}


@dataclass
class TinyWorld:
    root: Path
    settings: Settings
    lake: LocalLake
    summary: SimulationSummary
    days: list[str]


def tiny_settings(root: Path, seed: int = 0) -> Settings:
    return Settings(
        home=root / "home",
        holdout_days=0.5,
        label_days=0.75,
        seed=seed,
        threads=1,
        candidate_pool=100,
    )


def tiny_params(
    seed: int = 0, settings: Settings | None = None, **overrides: Any
) -> TrainingParams:
    base = settings or Settings(holdout_days=0.5, label_days=0.75, seed=seed, threads=1)
    small = {
        "als_factors": 16,
        "als_iterations": 8,
        "lgb_rounds": 60,
        "lgb_min_data_in_leaf": 20,
        "candidate_pool": 100,
        "eval_max_users": 300,
        "seed": seed,
        "threads": 1,
        # Serving and compilation tests need the LightGBM ranker whatever the gate
        # decides on a tiny world; the gate has its own tests (test_model_ease_gate.py).
        "ranker_gate": False,
    }
    return TrainingParams.create(**{**base.training.as_dict(), **small, **overrides})


def land_and_process(lake: LocalLake, settings: Settings, paths: list[Path]) -> list[str]:
    """Land NDJSON files through the real intake, then process every touched day."""
    intake = EventIntake(lake, settings)
    days: set[str] = set()
    try:
        for path in paths:
            batch = [
                RawEvent(f"{path.name}:{n}", line)
                for n, line in enumerate(path.read_bytes().splitlines(), 1)
                if line.strip()
            ]
            for start in range(0, len(batch), 20_000):
                result = intake.submit(batch[start : start + 20_000], "test")
                days.update(result.days)
    finally:
        intake.close()
    ordered = sorted(days)
    rules = Rules(catalog_epoch=date(1995, 1, 1), now=datetime.now(UTC))
    process_partitions(lake, ordered, rules)
    return ordered


def write_catalog(lake: LocalLake, summary: SimulationSummary) -> None:
    """Catalogue snapshots as the ``item_catalog`` / ``user_profiles`` assets write them."""
    items = [orjson.loads(line) for line in summary.items_path.read_bytes().splitlines()]
    users = [orjson.loads(line) for line in summary.users_path.read_bytes().splitlines()]
    core = {"item_id", "title", "categories", "published_at"}
    write_parquet(
        lake,
        "catalog/items.parquet",
        pl.DataFrame(
            {
                "item_id": [i["item_id"] for i in items],
                "title": [i.get("title") for i in items],
                "categories": [i.get("categories") or [] for i in items],
                "published_at": [i.get("published_at") for i in items],
                "attributes": [
                    orjson.dumps({k: v for k, v in i.items() if k not in core}).decode()
                    for i in items
                ],
            },
            schema={
                "item_id": pl.String,
                "title": pl.String,
                "categories": pl.List(pl.String),
                "published_at": pl.String,
                "attributes": pl.String,
            },
        ).with_columns(pl.col("published_at").str.to_datetime(time_unit="us", time_zone="UTC")),
    )
    write_parquet(
        lake,
        "catalog/users.parquet",
        pl.DataFrame(
            {
                "user_id": [u["user_id"] for u in users],
                "attributes": [
                    orjson.dumps({k: v for k, v in u.items() if k != "user_id"}).decode()
                    for u in users
                ],
            }
        ),
    )


def build_tiny_world(
    root: Path, seed: int = 0, end: datetime | None = END, **sizes: Any
) -> TinyWorld:
    root.mkdir(parents=True, exist_ok=True)
    settings = tiny_settings(root, seed)
    lake = LocalLake(settings.resolved_lake_uri)
    summary = simulate_history(root / "sim", seed=seed, end=end, **{**TINY, **sizes})
    days = land_and_process(lake, settings, summary.weblog_paths)
    write_catalog(lake, summary)
    return TinyWorld(root, settings, lake, summary, days)


def train_tiny(world: TinyWorld, seed: int = 0, **overrides: Any) -> TrainOutcome:
    params = tiny_params(seed, world.settings, **overrides)
    return train_bundle(world.lake, params, world.root / "bundles")


def build_tiny_bundle(root: Path, seed: int = 0) -> Path:
    return train_tiny(build_tiny_world(root, seed), seed).bundle_path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyWorld]:
    yield build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_outcome(tiny_world: TinyWorld) -> TrainOutcome:
    return train_tiny(tiny_world)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_outcome: TrainOutcome) -> Path:
    """A real bundle trained on the tiny world (do not modify it: copy it first)."""
    return tiny_outcome.bundle_path
