"""The acceptance protocols of bench/protocols.py, and issue 11's bursty world.

The splits and the metric are checked on hand-made logs against the written protocol
(/work/shared/evaluation-protocols.md): a bench that measured something else would send
the model work in the wrong direction. The bursty world is checked for the regime it
exists to reproduce.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from bursty_support import bursty_dataset, bursty_world, land_split, protocols  # noqa: F401

from recsys_serving.lake import LocalLake
from recsys_serving.layout import weblogs_key


def _frame(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    """(user, item, ts) rows as a ratings dump has them: integer ids and seconds."""
    return pl.DataFrame(
        {
            "event_type": ["rating"] * len(rows),
            "user_id": [int(u[1:]) for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "ts": [t for _, _, t in rows],
            "value": [4] * len(rows),
        }
    )


def test_per_user_split_takes_each_users_last_fifth_by_ts_then_item() -> None:
    rows = [
        # u1: 5 events; two at ts 40 ordered by item id as a number (9 before 10).
        ("u1", 1, 10),
        ("u1", 2, 20),
        ("u1", 3, 30),
        ("u1", 10, 40),
        ("u1", 9, 40),
        # u2: 3 events -> floor(2.4) = 2 train; its test item 5 was seen in training.
        ("u2", 5, 100),
        ("u2", 6, 5),
        ("u2", 5, 200),
        # u3: one event, no training history -> not a test user.
        ("u3", 7, 50),
        # u4: 10 events -> 8 train, the last two (items 18, 19) are positives.
        *[("u4", 10 + k, 1000 + k) for k in range(10)],
    ]
    sp = protocols.split_per_user(_frame(rows))
    assert sp.cut is None
    assert sp.truth == {"1": {"10"}, "4": {"18", "19"}}
    train = {(u, i) for u, i in sp.train.select("user_id", "item_id").iter_rows()}
    assert ("1", "9") in train and ("1", "10") not in train
    assert {("2", "5"), ("2", "6")} <= train
    assert not any(u == "3" for u, _ in train)
    assert sp.train.height == 4 + 2 + 0 + 8


def test_global_split_cuts_at_the_80_percent_quantile_of_timestamps() -> None:
    rows = [(f"u{k % 3}", k, 10 * k) for k in range(10)]  # ts 0..90, quantile 72
    rows += [("u9", 99, 95)]  # only after the cut: no history, not a test user
    sp = protocols.split_global(_frame(rows))
    ts = [t for _, _, t in rows]
    assert sp.cut == pytest.approx(float(np.quantile(ts, 0.8)))
    assert sp.train["ts"].max() < sp.cut
    # Events at ts 80 and 90 (items 8, 9 of users u2, u0) are the test.
    assert sp.truth == {"2": {"8"}, "0": {"9"}}


def test_metrics_are_binary_ndcg_over_min_positives_and_10() -> None:
    truth = {"a": {"x", "y"}, "b": {"z"}, "c": {"w"}}
    lists = {"a": ["y", "q", "x"], "b": ["q", "q2", "z"]}  # "c" unanswered: scores 0
    m = protocols.metrics(lists, truth)
    ideal_a = 1 + 1 / math.log2(3)
    ndcg_a = (1 + 1 / math.log2(4)) / ideal_a
    ndcg_b = (1 / math.log2(4)) / 1.0
    assert m["ndcg@10"] == pytest.approx((ndcg_a + ndcg_b) / 3)
    assert m["recall@10"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert m["hit_rate@10"] == pytest.approx(2 / 3)
    assert m["precision@10"] == pytest.approx((2 / 10 + 1 / 10) / 3)


def test_baselines_never_return_a_training_item() -> None:
    ds = bursty_dataset(seed=0)
    sp = protocols.split(ds.events, "per-user")
    m = protocols.interactions(sp.train)
    users = sorted(sp.truth)[:50]
    seen = {u: set(sp.train.filter(pl.col("user_id") == u)["item_id"]) for u in users}
    for name in ("ease", "rp3beta", "popularity", "user_recent_popularity"):
        grid = protocols.QUICK_GRIDS[name][:1]
        for _cfg, lists in protocols.FITTERS[name](m, users, grid):
            for u in users:
                assert len(lists[u]) == 10
                assert not set(lists[u]) & seen[u], name


def test_bursty_world_rewards_taste_per_user_and_recency_globally() -> None:
    """The regime of issue 11: under a per-user split a taste model (EASE) clearly beats
    popularity; under a global split recent popularity clearly beats all-time popularity."""
    ds = bursty_dataset(seed=0)
    events = ds.events
    assert set(events["event_type"]) == {"rating"}
    assert events["ts"].dtype == pl.Int64 and set(events["value"]) <= {1, 2, 3, 4, 5}
    # Users are active in bursts: the median user's events span a small part of the log.
    span = events["ts"].max() - events["ts"].min()  # type: ignore[operator]
    per_user = events.group_by("user_id").agg((pl.col("ts").max() - pl.col("ts").min()).alias("s"))
    assert per_user["s"].median() < 0.5 * span  # type: ignore[operator]
    # Items are released over the whole period, and nobody rates an unreleased item.
    released = ds.items.select(pl.col("item_id"), pl.col("published_at").str.to_date().alias("day"))
    first = events.group_by("item_id").agg(pl.col("ts").min().alias("first"))
    joined = first.join(released, on="item_id").with_columns(
        pl.from_epoch("first", time_unit="s").dt.date().alias("first_day")
    )
    assert (joined["first_day"] >= joined["day"]).all()
    log_start = datetime.fromtimestamp(int(events["ts"].min()), UTC).date()  # type: ignore[arg-type]
    assert (released["day"] > log_start).mean() > 0.5

    per_user_split = protocols.run_baselines(
        protocols.split(events, "per-user"), quick=True, names=["ease", "popularity"]
    )
    assert per_user_split["ease"]["ndcg@10"] > 1.1 * per_user_split["popularity"]["ndcg@10"]
    global_split = protocols.run_baselines(
        protocols.split(events, "global"), quick=True, names=["popularity", "recent_popularity"]
    )
    assert (
        global_split["recent_popularity"]["ndcg@10"] > 1.3 * global_split["popularity"]["ndcg@10"]
    )


def test_bursty_fixture_lands_every_rating_in_the_lake(bursty_world) -> None:  # noqa: F811
    lake: LocalLake = bursty_world.lake
    keys = [weblogs_key(day) for day in bursty_world.days]
    landed = pl.concat([pl.read_parquet(Path(lake.root) / key) for key in keys])
    assert landed.height == bursty_world.events.height
    assert set(landed["event_type"]) == {"rating"}
    assert (Path(lake.root) / "catalog" / "items.parquet").exists()


def test_land_split_lands_only_the_training_events(tmp_path: Path) -> None:
    ds = bursty_dataset(seed=1, n_users=60, n_items=80, median_ratings=12, days=60)
    world, sp = land_split(tmp_path, ds, "per-user")
    keys = [weblogs_key(day) for day in world.days]
    landed = pl.concat([pl.read_parquet(Path(world.lake.root) / key) for key in keys])
    assert landed.height == sp.train.height < ds.events.height
    test_pairs = {(u, i) for u, items in sp.truth.items() for i in items}
    landed_pairs = set(landed.select("user_id", "item_id").iter_rows())
    assert not test_pairs & landed_pairs
