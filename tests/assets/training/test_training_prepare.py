"""The streaming ``interactions`` path (prepare.py) produces exactly what the in-memory
path (read_weblogs + build_interactions + build_vocabulary + encode) produces."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from model_support import TinyWorld, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training import artifacts as art
from recsys_assets.training import steps
from recsys_assets.training.data import (
    Encoded,
    Vocabulary,
    build_interactions,
    build_vocabulary,
    encode,
    read_catalog,
    read_weblogs,
)
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.pipeline import TrainOutcome
from recsys_assets.training.prepare import prepare_interactions, scan_weblogs
from recsys_assets.training.ranking import build_ranking_dataset, label_table
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA
from recsys_serving.lake import Lake, LocalLake, write_parquet
from recsys_serving.layout import partition_days, weblogs_key

__all__ = ["tiny_outcome", "tiny_world"]  # fixtures used below


def _assert_same(lake: Lake, params: TrainingParams) -> None:
    weblogs = read_weblogs(lake)
    old = build_interactions(weblogs, params)
    items = read_catalog(lake)[0]
    old_vocab = build_vocabulary(old, items)
    old_enc = encode(old, old_vocab)
    with scan_weblogs(lake, partition_days(lake)) as scanned:
        new = prepare_interactions(scanned, items, params)
    _same_vocab(old_vocab, new.vocab)
    _same_enc(old_enc, new.enc)
    assert new.window == old.window
    assert new.data == old.data
    assert new.event_types == dict(
        old.events.group_by("event_type").len().sort("event_type").iter_rows()
    )
    assert new.impressions_clicked == int(old.impressions["clicked"].sum() or 0)


def _same_vocab(old: Vocabulary, new: Vocabulary) -> None:
    for name, value in old.to_arrays().items():
        np.testing.assert_array_equal(new.to_arrays()[name], value, err_msg=name)


def _same_enc(old: Encoded, new: Encoded) -> None:
    for name, value in old.to_arrays().items():
        got = new.to_arrays()[name]
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)  # NaN == NaN here


def test_the_streaming_path_matches_the_in_memory_path_on_a_simulated_world(
    tiny_world: TinyWorld,
) -> None:
    params = tiny_params(0, tiny_world.settings)
    _assert_same(tiny_world.lake, params)
    _assert_same(tiny_world.lake, params.replace(train_window_days=1.5))


def _event(kind: str, user: str, item: str, minute: int, **extra: object) -> dict[str, object]:
    return {
        "event_id": f"{kind}-{user}-{item}-{minute}",
        "event_type": kind,
        "user_id": user,
        "item_id": item,
        "ts": datetime(2024, 3, 1 + minute // 1440, tzinfo=UTC).timestamp() + 60 * (minute % 1440),
        "session_id": extra.get("session"),
        "session_inferred": False,
        "request_id": extra.get("request"),
        "position": extra.get("position"),
        "value": extra.get("value"),
        "model_version": None,
        "context": None,
    }


def test_edge_cases_match_too(tmp_path: Path) -> None:
    """Null sessions and requests, impression-only users, ties, non-ASCII ids, a click
    whose request id equals a user id, ratings: row for row the same encoding."""
    lake = LocalLake(tmp_path / "lake")
    rng = np.random.default_rng(3)
    users = ["u1", "u2", "ü3", "u10", "zed", "ghost"]
    items = [f"i{k}" for k in range(12)] + ["é"]
    rows: list[dict[str, object]] = []
    for n in range(900):
        user = users[int(rng.integers(len(users)))]
        item = items[int(rng.integers(len(items)))]
        minute = int(rng.integers(0, 3 * 1440)) // 7 * 7  # many equal timestamps
        request = None if n % 5 == 0 else f"r{n % 40}"
        if user == "ghost" or n % 3 == 0:
            rows.append(_event("impression", user, item, minute, request=request, position=n % 8))
        elif n % 11 == 0:
            rows.append(_event("rating", user, item, minute, value=float(n % 5 + 1)))
        else:
            kind = ["click", "view", "add_to_cart", "purchase"][n % 4]
            session = None if n % 4 == 1 else f"s{n % 9}"
            rows.append(_event(kind, user, item, minute, session=session, request=request))
    rows.append(_event("click", "u1", "i1", 5, request="u2"))  # request id = a user id
    rows.append(_event("impression", "u2", "i1", 5, request=None, position=0))
    frame = pl.DataFrame(rows).with_columns(
        pl.from_epoch(pl.col("ts"), time_unit="s").dt.replace_time_zone("UTC").alias("ts")
    )
    frame = frame.select(list(WEBLOGS_SCHEMA)).cast(WEBLOGS_SCHEMA)  # type: ignore[arg-type]
    for (day,), part in frame.group_by(pl.col("ts").dt.date().cast(pl.String)):
        write_parquet(lake, weblogs_key(str(day)), part)
    params = TrainingParams.create(
        threads=1, holdout_days=0.5, label_days=0.5, min_events=10, min_users=2, min_items=2
    )
    _assert_same(lake, params)


def test_run_interactions_reads_only_the_window_partitions(tiny_world: TinyWorld) -> None:
    params = tiny_params(0, tiny_world.settings)
    out = steps.run_interactions(tiny_world.lake, params)
    assert out.data["partitions"] == tiny_world.days
    assert sum(out.data["rows"].values()) == read_weblogs(tiny_world.lake).frame.height
    arrays = art.get_arrays(tiny_world.lake, art.key(steps.INTERACTIONS, "prepared.npz"))
    assert arrays["enc/user"].size == out.data["events"]


@pytest.mark.parametrize("window_days", [None, 1.0])
def test_an_empty_window_explains_itself(tmp_path: Path, window_days: float | None) -> None:
    lake = LocalLake(tmp_path / "lake")
    frame = pl.DataFrame([_event("impression", "u1", "i1", 3, request="r")])
    frame = frame.with_columns(
        pl.from_epoch(pl.col("ts"), time_unit="s").dt.replace_time_zone("UTC").alias("ts")
    )
    write_parquet(
        lake,
        weblogs_key("2024-03-01"),
        frame.select(list(WEBLOGS_SCHEMA)).cast(WEBLOGS_SCHEMA),  # type: ignore[arg-type]
    )
    params = TrainingParams.create(threads=1, train_window_days=window_days)
    with pytest.raises(ValueError, match="the weblogs hold 1 events in 1 partition"):
        steps.run_interactions(lake, params)


def test_arrays_are_written_to_a_local_lake_in_place(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.linspace(0, 1, 7)}
    size = art.put_arrays(lake, "training/x/y.npz", arrays)
    path = lake.local_path("training/x/y.npz")
    assert size == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["y.npz"]  # no temporary left
    back = art.get_arrays(lake, "training/x/y.npz")
    for name, value in arrays.items():
        np.testing.assert_array_equal(back[name], value)


def test_the_ranking_dataset_is_the_same_with_shown_items_of_sampled_users_only(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome
) -> None:
    """build_ranking_dataset looks up shown items for its sampled users only; given every
    user's (label_table, as before) it builds the same rows."""
    params = tiny_params(0, tiny_world.settings, ranking_max_users=40)
    prep = steps.load_prepared(tiny_world.lake)
    state = steps.load_state(tiny_world.lake, prep, "rank0", params)
    end = prep.window.label_end(prep.window.cutoff)
    full = label_table(prep.enc, state.as_of, end)
    assert len(full[0]) > 40  # the sample is a strict subset of the labelled users
    before = build_ranking_dataset(state, prep.enc, end, params, labels=full)
    after = build_ranking_dataset(state, prep.enc, end, params)
    for name in ("features", "labels", "groups", "users", "items"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name), err_msg=name)
