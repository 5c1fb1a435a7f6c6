"""Offline metrics on hand-made examples, the training window's guards, reproducibility."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from model_support import TinyWorld, build_tiny_world, tiny_params, tiny_world, train_tiny

from recsys_assets.training import steps
from recsys_assets.training.data import (
    DAY,
    TrainingDataError,
    WeblogData,
    build_interactions,
)
from recsys_assets.training.metrics import (
    aggregate,
    position_propensity,
    replay_ctr,
    user_metrics,
)
from recsys_assets.training.params import TrainingParams

__all__ = ["tiny_world"]  # fixture

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)


def test_metrics_of_one_list_by_hand() -> None:
    m = user_metrics(["a", "b", "c", "d"], {"b", "d"}, k=4)
    dcg = 1 / LOG2_3 + 1 / LOG2_5
    idcg = 1 + 1 / LOG2_3
    assert m["ndcg"] == pytest.approx(dcg / idcg)
    assert m["recall"] == 1.0
    assert m["hit_rate"] == 1.0
    assert m["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)

    one = user_metrics(["a", "x"], {"a", "b", "c"}, k=2)
    assert one["ndcg"] == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert one["recall"] == pytest.approx(1 / 3)
    assert one["map"] == pytest.approx(1 / 2)  # one hit at rank 1, over min(3, 2)

    miss = user_metrics(["x", "y"], {"a"}, k=2)
    assert miss == {"ndcg": 0.0, "recall": 0.0, "hit_rate": 0.0, "map": 0.0}
    # Only the top k count.
    assert user_metrics(["x", "a"], {"a"}, k=1)["hit_rate"] == 0.0
    with pytest.raises(ValueError):
        user_metrics(["a"], set(), k=1)


def test_aggregate_averages_users_and_counts_coverage() -> None:
    truth = {"u1": {"a"}, "u2": {"b"}, "u3": {"c"}}
    lists = {"u1": ["a", "b"], "u2": ["a", "b"]}  # u3 has no list: scores zero
    out = aggregate(lists, truth, k=2, n_candidates=10)
    assert out["ndcg@2"] == pytest.approx((1.0 + 1 / LOG2_3 + 0.0) / 3)
    assert out["hit_rate@2"] == pytest.approx(2 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["coverage@2"] == pytest.approx(2 / 10)
    assert out["users"] == 3


def test_position_propensity_and_replayed_ctr_by_hand() -> None:
    # Other users' traffic: 10 impressions per position, CTR 0.2 at 0 and 0.1 at 1.
    users = ["z"] * 20
    items = [f"o{n}" for n in range(20)]
    positions = [0] * 10 + [1] * 10
    clicked = [n < 2 for n in range(10)] + [n < 1 for n in range(10)]
    # u's impressions: i2 shown first and clicked, i1 shown second, not clicked.
    users += ["u", "u"]
    items += ["i2", "i1"]
    positions += [0, 1]
    clicked += [True, False]
    pos = np.asarray(positions)
    clk = np.asarray(clicked)
    prop = position_propensity(pos, clk, 2)
    # CTR 3/11 at position 0 and 1/11 at position 1: examination 1 and 1/3.
    np.testing.assert_allclose(prop, [1.0, 1 / 3])
    out = replay_ctr({"u": ["i1", "i2"]}, users, items, pos, clk, k=2, clip=10.0)
    # i2 (clicked at 0) moves to rank 1: weight 1/3; i1 (shown at 1) moves to rank 0: 3.
    assert out["ctr_matches"] == 2
    assert out["expected_ctr"] == pytest.approx((1 / 3) / (1 / 3 + 3))
    assert out["logged_ctr"] == pytest.approx(4 / 22)
    clipped = replay_ctr({"u": ["i1", "i2"]}, users, items, pos, clk, k=2, clip=2.0)
    assert clipped["expected_ctr"] == pytest.approx((1 / 3) / (1 / 3 + 2))


def _weblogs(n_events: int, days: float) -> WeblogData:
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    ts = start + np.linspace(0, days * DAY, n_events)
    frame = pl.DataFrame(
        {
            "event_type": ["click"] * n_events,
            "user_id": [f"u{n % 13}" for n in range(n_events)],
            "item_id": [f"i{n % 11}" for n in range(n_events)],
            "ts": ts,
            "session_id": [None] * n_events,
            "request_id": [None] * n_events,
            "position": [None] * n_events,
            "value": [None] * n_events,
        },
        schema_overrides={
            "session_id": pl.String,
            "request_id": pl.String,
            "position": pl.Int32,
            "value": pl.Float64,
        },
    )
    return WeblogData(frame, ["2024-01-01"], {"2024-01-01": n_events}, {})


def test_empty_and_tiny_windows_are_refused_with_the_counts() -> None:
    params = TrainingParams.create(holdout_days=0.5, label_days=0.5)
    with pytest.raises(TrainingDataError, match="no interactions in the training window"):
        build_interactions(_weblogs(0, 1.0), params)
    with pytest.raises(TrainingDataError) as info:
        build_interactions(_weblogs(150, 3.0), params)
    message = str(info.value)
    assert "too small to train a model" in message
    assert "events before the ranking cut-off (need 200)" in message
    assert "150 positive events in total" in message


def test_windows_widen_when_the_holdout_or_labels_are_too_sparse() -> None:
    # 3,000 events over 300 days: one day holds 10 events, far below the minimum shares.
    params = TrainingParams.create(holdout_days=1.0, label_days=1.0, rank_cutoffs=2)
    window = build_interactions(_weblogs(3_000, 300.0), params).window
    assert set(window.widened) == {"holdout", "label"}
    assert (window.end - window.holdout_start) / DAY == pytest.approx(6.0, rel=0.05)
    assert window.label_seconds / DAY == pytest.approx(30.0, rel=0.05)
    assert len(window.cutoffs) == 2
    assert window.cutoffs[0] - window.cutoffs[1] == pytest.approx(window.label_seconds)


def test_same_inputs_and_seed_give_the_same_metrics(tiny_world: TinyWorld, tmp_path: Path) -> None:
    # Two threads: parallel ALS, kNN and LightGBM must not make results depend on timing.
    first = train_tiny(tiny_world, seed=3, threads=2)
    second = train_tiny(tiny_world, seed=3, threads=2)
    assert first.manifest["version"] != second.manifest["version"]
    assert first.metrics == second.metrics
    assert first.manifest["metrics"] == second.manifest["metrics"]
    assert (
        first.manifest["components"]["ranker"]["best_iteration"]
        == second.manifest["components"]["ranker"]["best_iteration"]
    )


def test_a_training_window_reads_only_the_partitions_it_needs(tmp_path: Path) -> None:
    world = build_tiny_world(tmp_path / "world")
    assert world.days == ["2024-05-28", "2024-05-29", "2024-05-30", "2024-05-31"]
    params = tiny_params(
        0,
        world.settings,
        train_window_days=1.5,
        holdout_days=0.25,
        label_days=0.25,
        rank_cutoffs=1,
    )
    result = steps.run_interactions(world.lake, params)
    assert result.data["partitions"] == ["2024-05-29", "2024-05-30", "2024-05-31"]
    bounds = result.bounds
    assert bounds["end"] - bounds["start"] <= 1.5 * DAY + 1.0
