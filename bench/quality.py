"""Offline model quality: the two-stage recommender vs tuned single-stage baselines.

The protocols are the acceptance test's (``bench/protocols.py``): a per-user time split
(each user's last 20% of events are the test) and a global one (everything at or after
the 80% quantile of the timestamps). Per protocol the model is trained on the training
events (``train_bundle``, the code ``recsys retrain`` runs) and each test user's top 10
is compared with their positives (test items not seen in training). The same split
feeds the baselines of ``bench/protocols.py`` (EASE, implicit ALS, item-kNN, RP3beta,
all-time and recent popularity), each at the best point of its grid on the split.
Worlds come from the project simulator and ``bench/datasets.py``:

* ``weblogs``: the full simulated clickstream (impressions, clicks, funnel, ratings);
* ``ratings``: one rating per (user, item) with no impressions and no sessions, the
  shape of a public ratings dataset such as MovieLens;
* ``organic``: users choose what they rate by taste (no logging policy), the regime
  where collaborative baselines are strong (see :func:`organic`);
* ``bursty``: issue 11's regime (users active in short bursts over months, items
  released over the period, ratings only).

Usage::

    .venv/bin/python bench/quality.py                 # default grid of worlds and seeds
    .venv/bin/python bench/quality.py --quick         # one small world, one seed
    .venv/bin/python bench/quality.py --flavours bursty --sizes small --seeds 1
    .venv/bin/python bench/quality.py --out bench/results/quality.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import protocols  # noqa: E402

from recsys_assets.simulation.history import simulate_history  # noqa: E402
from recsys_assets.training.params import TrainingParams  # noqa: E402
from recsys_assets.training.pipeline import train_bundle  # noqa: E402
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA, sessionize  # noqa: E402
from recsys_serving.lake import LocalLake, write_parquet  # noqa: E402
from recsys_serving.layout import CATALOG_ITEMS_KEY, weblogs_key  # noqa: E402
from recsys_serving.model.recommender import Recommender  # noqa: E402

K = 10
END = datetime(2024, 6, 1, tzinfo=UTC)
SIZES = {
    "small": {
        "n_users": 2_000,
        "n_items": 800,
        "n_categories": 16,
        "days": 14,
        "n_events": 300_000,
    },
    "medium": {
        "n_users": 8_000,
        "n_items": 3_000,
        "n_categories": 24,
        "days": 21,
        "n_events": 1_000_000,
    },
}


# ---------------------------------------------------------------------- worlds
@dataclass
class World:
    name: str
    events: pl.DataFrame  # weblogs columns, ts as datetime[us, UTC]
    items: pl.DataFrame  # catalogue snapshot


def simulate(size: str, seed: int, workdir: Path) -> World:
    summary = simulate_history(workdir / "sim", seed=seed, end=END, **SIZES[size])
    rows = []
    for path in summary.weblog_paths:
        for line in path.read_bytes().splitlines():
            rows.append(orjson.loads(line))
    events = pl.DataFrame(
        {
            "event_id": [r["event_id"] for r in rows],
            "event_type": [r["event_type"] for r in rows],
            "user_id": [r["user_id"] for r in rows],
            "item_id": [r["item_id"] for r in rows],
            "ts": [_ts(r["ts"]) for r in rows],
            "session_id": [r.get("session_id") for r in rows],
            "request_id": [r.get("request_id") for r in rows],
            "position": [r.get("position") for r in rows],
            "value": [float(r["value"]) if "value" in r else None for r in rows],
            "model_version": [r.get("model_version") for r in rows],
        },
        schema_overrides={"position": pl.Int32, "value": pl.Float64},
    ).with_columns(
        (pl.col("ts") * 1e6).cast(pl.Int64).cast(pl.Datetime("us", "UTC")),
        pl.lit(None, dtype=pl.String).alias("context"),
    )
    items_raw = [orjson.loads(line) for line in summary.items_path.read_bytes().splitlines()]
    items = pl.DataFrame(
        {
            "item_id": [i["item_id"] for i in items_raw],
            "title": [i["title"] for i in items_raw],
            "categories": [i["categories"] for i in items_raw],
            "published_at": [i["published_at"] for i in items_raw],
            "attributes": ["{}"] * len(items_raw),
        }
    ).with_columns(pl.col("published_at").str.to_datetime(time_unit="us", time_zone="UTC"))
    return World(f"weblogs-{size}-s{seed}", events, items)


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def organic(size: str, seed: int) -> World:
    """Users choose what to rate themselves, by taste (``bench/datasets.py`` generates
    the world, which it also writes as a dataset directory for ``bench/blackbox.py``)."""
    import datasets

    events, items, _truth = datasets.organic_frames(size, seed)
    n = events.height
    events = (
        events.select(
            pl.Series("event_id", [f"o{k}" for k in range(n)]),
            pl.lit("rating").alias("event_type"),
            "user_id",
            "item_id",
            pl.Series("ts", (events["ts"].to_numpy() * 1e6).astype(np.int64)).cast(
                pl.Datetime("us", "UTC")
            ),
            pl.lit(None, pl.String).alias("session_id"),
            pl.lit(None, pl.String).alias("request_id"),
            pl.lit(None, pl.Int32).alias("position"),
            "value",
            pl.lit(None, pl.String).alias("model_version"),
            pl.lit(None, pl.String).alias("context"),
        )
    ).sort("ts", "event_id")
    items = items.with_columns(
        pl.lit(None, pl.Datetime("us", "UTC")).alias("published_at"),
        pl.lit("{}").alias("attributes"),
    )
    return World(f"organic-{size}-s{seed}", events, items)


def bursty(size: str, seed: int) -> World:
    """Issue 11's regime (``bench/datasets.py``): short bursts, releases over the log."""
    import datasets

    ds = datasets.bursty(size, seed)
    events = ds.events.select(
        "event_id",
        "event_type",
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        (pl.col("ts") * 1_000_000).cast(pl.Datetime("us", "UTC")).alias("ts"),
        pl.lit(None, pl.String).alias("session_id"),
        pl.lit(None, pl.String).alias("request_id"),
        pl.lit(None, pl.Int32).alias("position"),
        pl.col("value").cast(pl.Float64),
        pl.lit(None, pl.String).alias("model_version"),
        pl.lit(None, pl.String).alias("context"),
    )
    items = ds.items.select(
        pl.col("item_id").cast(pl.String),
        "title",
        "categories",
        pl.col("published_at").str.to_datetime(time_unit="us", time_zone="UTC"),
        pl.lit("{}").alias("attributes"),
    )
    return World(f"bursty-{size}-s{seed}", events, items)


def as_ratings(world: World) -> World:
    """One rating per (user, item) at its first positive interaction; no impressions."""
    grade = (
        pl.when(pl.col("event_type") == "rating")
        .then(pl.col("value"))
        .when(pl.col("event_type") == "purchase")
        .then(5.0)
        .when(pl.col("event_type") == "add_to_cart")
        .then(4.0)
        .otherwise(3.0)
    )
    ratings = (
        world.events.filter(pl.col("event_type") != "impression")
        .with_columns(grade.alias("g"))
        .group_by("user_id", "item_id")
        .agg(pl.col("ts").min(), pl.col("g").max().alias("value"), pl.col("event_id").first())
        .with_columns(
            pl.lit("rating").alias("event_type"),
            pl.lit(None, dtype=pl.String).alias("session_id"),
            pl.lit(None, dtype=pl.String).alias("request_id"),
            pl.lit(None, dtype=pl.Int32).alias("position"),
            pl.lit(None, dtype=pl.String).alias("model_version"),
            pl.lit(None, dtype=pl.String).alias("context"),
        )
        .select(world.events.columns)
        .sort("ts", "event_id")
    )
    return World(world.name.replace("weblogs", "ratings"), ratings, world.items)


# ----------------------------------------------------------------------- split
def split(world: World, protocol: str) -> tuple[pl.DataFrame, protocols.ProtocolSplit]:
    """The world's training events (weblogs columns) and the protocol's split."""
    sp_ = protocols.split(world.events, protocol)
    keep = sp_.train.select("n")
    train = world.events.with_row_index("n").join(keep, on="n", how="semi").drop("n")
    return train, sp_


# ------------------------------------------------------------------- two-stage
def run_two_stage(
    train: pl.DataFrame,
    users: list[str],
    items: pl.DataFrame,
    workdir: Path,
    overrides: dict[str, Any],
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    lake = LocalLake(workdir / "lake")
    frame = train.with_columns(pl.col("ts").alias("_ts"))
    frame = sessionize(frame, 30.0).drop("_ts")
    frame = frame.with_columns(pl.col("ts").dt.date().cast(pl.String).alias("_day"))
    for (day,), part in frame.partition_by("_day", as_dict=True).items():
        write_parquet(
            lake, weblogs_key(str(day)), part.select(list(WEBLOGS_SCHEMA)).cast(WEBLOGS_SCHEMA)
        )
    write_parquet(lake, CATALOG_ITEMS_KEY, items)
    params = TrainingParams.create(**{"threads": 0, "seed": 7, **overrides})
    started = time.perf_counter()
    outcome = train_bundle(lake, params, workdir / "bundles")
    fit_seconds = time.perf_counter() - started
    model = Recommender.load(outcome.bundle_path)
    lists = {u: [r.item_id for r in model.recommend(u, K)] for u in users}
    info = {
        "fit_seconds": round(fit_seconds, 1),
        "internal_holdout": {k: v for k, v in outcome.metrics.items() if "@" in k},
        "ranker_iterations": outcome.manifest["components"]["ranker"]["best_iteration"],
        "candidate_recall": outcome.manifest["components"]["ranking_dataset"]["candidate_recall"],
    }
    return lists, info


# ------------------------------------------------------------------------- main
def run_world(
    world: World,
    workdir: Path,
    quick: bool,
    overrides: dict[str, Any],
    which: tuple[str, ...] = protocols.PROTOCOLS,
) -> list[dict[str, Any]]:
    """One row per protocol: the two-stage model and every tuned baseline on its split."""
    rows = []
    for protocol in which:
        train, sp_ = split(world, protocol)
        row: dict[str, Any] = {
            "world": world.name,
            "protocol": protocol,
            "events": world.events.height,
            "train_events": train.height,
            "test_users": len(sp_.truth),
        }
        lists, info = run_two_stage(
            train, sorted(sp_.truth), world.items, workdir / f"{world.name}-{protocol}", overrides
        )
        row["two_stage"] = {**protocols.metrics(lists, sp_.truth, K), **info}
        row["baselines"] = protocols.run_baselines(sp_, quick)
        row["best_baseline"], best = protocols.best_baseline(row["baselines"])
        row["lift_over_best_baseline"] = protocols.lift(row["two_stage"]["ndcg@10"], best)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small world, one seed")
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--flavours", default="weblogs,ratings,organic,bursty")
    parser.add_argument("--protocol", choices=("per-user", "global", "both"), default="both")
    parser.add_argument("--params", default="{}", help="TrainingParams overrides (JSON)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = ["small"] if args.quick else args.sizes.split(",")
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    flavours = args.flavours.split(",")
    overrides = json.loads(args.params)
    which = protocols.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    rows = []
    workroot = Path(tempfile.mkdtemp(prefix="recsys-quality-"))
    try:
        for size, seed in itertools.product(sizes, seeds):
            base = None
            for flavour in flavours:
                if flavour == "organic":
                    world = organic(size, seed)
                elif flavour == "bursty":
                    world = bursty(size, seed)
                else:
                    base = base or simulate(size, seed, workroot / f"{size}-{seed}")
                    world = base if flavour == "weblogs" else as_ratings(base)
                started = time.perf_counter()
                for row in run_world(world, workroot, args.quick, overrides, which):
                    row["seconds"] = round(time.perf_counter() - started, 1)
                    rows.append(row)
                    best = row["baselines"][row["best_baseline"]]["ndcg@10"]
                    lift = row["lift_over_best_baseline"]
                    print(
                        f"{row['world']:<24} {row['protocol']:<9} two-stage "
                        f"{row['two_stage']['ndcg@10']:.4f}  "
                        + "  ".join(f"{n} {r['ndcg@10']:.4f}" for n, r in row["baselines"].items())
                        + f"  best {row['best_baseline']} {best:.4f}"
                        + (f"  lift {lift:+.1%}" if lift is not None else "")
                        + f"  ({row['seconds']}s)",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
