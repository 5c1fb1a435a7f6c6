"""Offline model quality: the two-stage recommender vs tuned single-stage baselines.

The protocol mirrors the project's acceptance test: a history is ingested, the model
is trained on it (``train_bundle``, the code ``recsys retrain`` runs), and each user's
NEXT items (positive interactions after the split time, not seen before) are compared
with the model's top 10. The same split feeds two baselines, each tuned honestly on a
validation split carved out of the training period (the last ``VALID_SHARE`` of it),
then refitted on the whole training period:

* implicit ALS (grid over factors, regularization, alpha, BM25 vs log weighting);
* item-kNN (implicit's cosine / BM25 / TF-IDF item-item with K neighbours).

Users unknown to a baseline get its most popular unseen items (the same fallback the
two-stage model has). Worlds come from the project simulator, in three flavours:

* ``weblogs``: the full simulated clickstream (impressions, clicks, funnel, ratings);
* ``ratings``: one rating per (user, item) with no impressions and no sessions, the
  shape of a public ratings dataset such as MovieLens;
* ``organic``: users choose what they rate by taste (no logging policy), the regime
  where collaborative baselines are strong (see :func:`organic`).

Usage::

    .venv/bin/python bench/quality.py                 # default grid of worlds and seeds
    .venv/bin/python bench/quality.py --quick         # one small world, one seed
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
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from recsys_assets.simulation.history import simulate_history  # noqa: E402
from recsys_assets.training.metrics import aggregate  # noqa: E402
from recsys_assets.training.params import TrainingParams  # noqa: E402
from recsys_assets.training.pipeline import train_bundle  # noqa: E402
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA, partition_key, sessionize  # noqa: E402
from recsys_serving.lake import LocalLake, write_parquet  # noqa: E402
from recsys_serving.model.recommender import Recommender  # noqa: E402

K = 10
TEST_SHARE = 0.1  # the last 10% of the period is the "next items"
VALID_SHARE = 0.1  # baselines tune on the last 10% of the training period
END = datetime(2024, 6, 1, tzinfo=UTC)
WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 6.0}
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
@dataclass
class Split:
    train: pl.DataFrame
    truth: dict[str, set[str]]
    split_ts: float


def split(events: pl.DataFrame, share: float, by: str = "time") -> Split:
    """Train on events before the cut; truth = next new items.

    ``by="time"`` cuts the last ``share`` of the time span, ``by="events"`` the instant
    before which ``1 - share`` of the (non-impression) events happened.
    """
    ts = events["ts"].dt.epoch("us").cast(pl.Float64) / 1e6
    lo, hi = float(ts.min()), float(ts.max())
    cut = hi - share * (hi - lo)
    if by == "events":
        positive = events.filter(pl.col("event_type") != "impression")["ts"]
        cut = float(np.quantile((positive.dt.epoch("us") / 1e6).to_numpy(), 1.0 - share))
    epoch = pl.col("ts").dt.epoch("us").cast(pl.Float64) / 1e6
    train = events.filter(epoch < cut)
    test = events.filter((epoch >= cut) & (pl.col("event_type") != "impression"))
    seen = train.filter(pl.col("event_type") != "impression").select("user_id", "item_id").unique()
    new = (
        test.select("user_id", "item_id").unique().join(seen, on=["user_id", "item_id"], how="anti")
    )
    truth: dict[str, set[str]] = {}
    for user, item in new.iter_rows():
        truth.setdefault(user, set()).add(item)
    return Split(train, truth, cut)


# ------------------------------------------------------------------- two-stage
def run_two_stage(
    sp_: Split, items: pl.DataFrame, workdir: Path, overrides: dict[str, Any]
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    lake = LocalLake(workdir / "lake")
    frame = sp_.train.with_columns(pl.col("ts").alias("_ts"))
    frame = sessionize(frame, 30.0).drop("_ts")
    frame = frame.with_columns(pl.col("ts").dt.date().cast(pl.String).alias("_day"))
    for (day,), part in frame.partition_by("_day", as_dict=True).items():
        write_parquet(
            lake, partition_key(str(day)), part.select(list(WEBLOGS_SCHEMA)).cast(WEBLOGS_SCHEMA)
        )
    write_parquet(lake, "catalog/items.parquet", items)
    params = TrainingParams.create(**{"threads": 0, "seed": 7, **overrides})
    started = time.perf_counter()
    outcome = train_bundle(lake, params, workdir / "bundles")
    fit_seconds = time.perf_counter() - started
    model = Recommender.load(outcome.bundle_path)
    lists = {u: [r.item_id for r in model.recommend(u, K)] for u in sp_.truth}
    info = {
        "fit_seconds": round(fit_seconds, 1),
        "internal_holdout": {k: v for k, v in outcome.metrics.items() if "@" in k},
        "ranker_iterations": outcome.manifest["components"]["ranker"]["best_iteration"],
        "candidate_recall": outcome.manifest["components"]["ranking_dataset"]["candidate_recall"],
    }
    return lists, info


# -------------------------------------------------------------------- baselines
@dataclass
class Matrix:
    users: dict[str, int]
    items: list[str]
    weights: sp.csr_matrix  # users x items, summed event weights
    popular: list[int]  # item columns by interaction count


def matrix(train: pl.DataFrame) -> Matrix:
    pos = train.filter(pl.col("event_type") != "impression")
    weight = (
        pl.when(pl.col("event_type") == "rating")
        .then(pl.col("value").fill_null(3.0))
        .otherwise(pl.col("event_type").replace_strict(WEIGHTS, default=1.0))
    )
    agg = pos.with_columns(weight.alias("w")).group_by("user_id", "item_id").agg(pl.col("w").sum())
    users = sorted(agg["user_id"].unique().to_list())
    items = sorted(agg["item_id"].unique().to_list())
    u_index = {u: i for i, u in enumerate(users)}
    i_index = {it: i for i, it in enumerate(items)}
    rows = np.asarray([u_index[u] for u in agg["user_id"].to_list()])
    cols = np.asarray([i_index[i] for i in agg["item_id"].to_list()])
    weights = sp.csr_matrix(
        (agg["w"].to_numpy().astype(np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    counts = np.bincount(cols, minlength=len(items))
    popular = np.argsort(-counts, kind="stable").tolist()
    return Matrix(u_index, items, weights, popular)


def _confidence(weights: sp.csr_matrix, scheme: str) -> sp.csr_matrix:
    from implicit.nearest_neighbours import bm25_weight

    if scheme == "bm25":
        return bm25_weight(weights, K1=1.2, B=0.75).tocsr().astype(np.float32)
    out = weights.copy()
    out.data = np.log1p(out.data).astype(np.float32)
    return out


def _lists(model: Any, m: Matrix, users: list[str], conf: sp.csr_matrix) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    known = [u for u in users if u in m.users]
    if known:
        rows = np.asarray([m.users[u] for u in known])
        ids, _ = model.recommend(rows, conf[rows], N=K, filter_already_liked_items=True)
        for u, row in zip(known, ids, strict=True):
            out[u] = [m.items[i] for i in row if i >= 0]
    for u in users:
        if u not in out:
            out[u] = [m.items[i] for i in m.popular[:K]]
    return out


def fit_als(m: Matrix, cfg: dict[str, Any]) -> tuple[Any, sp.csr_matrix]:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    conf = _confidence(m.weights, cfg["weighting"])
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=cfg["factors"],
            regularization=cfg["regularization"],
            alpha=cfg["alpha"],
            iterations=15,
            random_state=7,
        )
        model.fit(conf, show_progress=False)
    return model, conf


def fit_knn(m: Matrix, cfg: dict[str, Any]) -> tuple[Any, sp.csr_matrix]:
    from implicit.nearest_neighbours import (
        BM25Recommender,
        CosineRecommender,
        TFIDFRecommender,
    )

    cls = {"cosine": CosineRecommender, "bm25": BM25Recommender, "tfidf": TFIDFRecommender}
    conf = _confidence(m.weights, "log")
    model = cls[cfg["similarity"]](K=cfg["k"])
    model.fit(conf, show_progress=False)
    return model, conf


ALS_GRID = [
    {"factors": f, "regularization": r, "alpha": a, "weighting": w}
    for f, r, a, w in itertools.product(
        (32, 64, 128), (0.01, 0.1), (1.0, 10.0, 40.0), ("bm25", "log")
    )
]
KNN_GRID = [
    {"similarity": s, "k": k}
    for s, k in itertools.product(("cosine", "bm25", "tfidf"), (20, 50, 100, 200))
]


def tuned(
    name: str, fit: Any, grid: list[dict[str, Any]], sp_: Split, quick: bool, by: str = "time"
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Pick the config with the best validation NDCG, refit on all training data."""
    inner = split(sp_.train, VALID_SHARE, by)
    inner_m = matrix(inner.train)
    users = sorted(inner.truth)
    best: tuple[float, dict[str, Any]] | None = None
    for cfg in grid[:4] if quick else grid:
        model, conf = fit(inner_m, cfg)
        score = aggregate(_lists(model, inner_m, users, conf), inner.truth, K, len(inner_m.items))
        if best is None or score[f"ndcg@{K}"] > best[0]:
            best = (score[f"ndcg@{K}"], cfg)
    assert best is not None
    m = matrix(sp_.train)
    model, conf = fit(m, best[1])
    return _lists(model, m, sorted(sp_.truth), conf), {"config": best[1], "valid_ndcg": best[0]}


def popularity(sp_: Split) -> dict[str, list[str]]:
    m = matrix(sp_.train)
    out = {}
    for u in sp_.truth:
        row = m.users.get(u)
        seen = set(m.weights[row].indices.tolist()) if row is not None else set()
        out[u] = [m.items[i] for i in m.popular if i not in seen][:K]
    return out


# ------------------------------------------------------------------------- main
def run_world(
    world: World, workdir: Path, quick: bool, overrides: dict[str, Any]
) -> dict[str, Any]:
    sp_ = split(world.events, TEST_SHARE)
    n_items = world.items.height
    row: dict[str, Any] = {
        "world": world.name,
        "events": world.events.height,
        "train_events": sp_.train.height,
        "test_users": len(sp_.truth),
    }
    lists, info = run_two_stage(sp_, world.items, workdir / world.name, overrides)
    row["two_stage"] = {**aggregate(lists, sp_.truth, K, n_items), **info}
    als_lists, als_info = tuned("als", fit_als, ALS_GRID, sp_, quick)
    row["als"] = {**aggregate(als_lists, sp_.truth, K, n_items), **als_info}
    knn_lists, knn_info = tuned("item_knn", fit_knn, KNN_GRID, sp_, quick)
    row["item_knn"] = {**aggregate(knn_lists, sp_.truth, K, n_items), **knn_info}
    row["popularity"] = aggregate(popularity(sp_), sp_.truth, K, n_items)
    best = max(row["als"][f"ndcg@{K}"], row["item_knn"][f"ndcg@{K}"])
    row["lift_over_best_baseline"] = row["two_stage"][f"ndcg@{K}"] / best - 1.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small world, one seed")
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--flavours", default="weblogs,ratings,organic")
    parser.add_argument("--params", default="{}", help="TrainingParams overrides (JSON)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = ["small"] if args.quick else args.sizes.split(",")
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    flavours = args.flavours.split(",")
    overrides = json.loads(args.params)
    rows = []
    workroot = Path(tempfile.mkdtemp(prefix="recsys-quality-"))
    try:
        for size, seed in itertools.product(sizes, seeds):
            base = None
            for flavour in flavours:
                if flavour == "organic":
                    world = organic(size, seed)
                else:
                    base = base or simulate(size, seed, workroot / f"{size}-{seed}")
                    world = base if flavour == "weblogs" else as_ratings(base)
                started = time.perf_counter()
                row = run_world(world, workroot, args.quick, overrides)
                row["seconds"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(
                    f"{row['world']:<24} two-stage {row['two_stage']['ndcg@10']:.4f}  "
                    f"als {row['als']['ndcg@10']:.4f}  item-knn {row['item_knn']['ndcg@10']:.4f}  "
                    f"popular {row['popularity']['ndcg@10']:.4f}  "
                    f"lift {row['lift_over_best_baseline']:+.1%}  ({row['seconds']}s)",
                    flush=True,
                )
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
