"""The steps that scan every impression do it one slice at a time (bounded temporaries
at 100M events): the results are exactly those of one whole-array pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from model_support import TinyWorld, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training import data, steps
from recsys_assets.training.evaluation import build_holdout, per_user_split
from recsys_assets.training.pipeline import TrainOutcome
from recsys_assets.training.ranking import shown_items
from recsys_assets.training.snapshot import impression_counts, item_snapshot, user_snapshot

__all__ = ["tiny_outcome", "tiny_world"]  # fixtures used below

WHOLE = 1 << 40  # one slice: the whole-array computation


def _both(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()`` with one slice, then with slices of 7 rows (many, the last partial)."""
    monkeypatch.setattr(data, "IMPRESSION_SLICE", WHOLE)
    whole = run()
    monkeypatch.setattr(data, "IMPRESSION_SLICE", 7)
    sliced = run()
    return whole, sliced


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert b[name].dtype == value.dtype, name
        np.testing.assert_array_equal(b[name], value, err_msg=name)


def test_slices_cover_every_row_once() -> None:
    for n, size in ((0, 3), (1, 3), (6, 3), (7, 3), (10, 1)):
        rows = [i for part in data.impression_slices(n, size) for i in range(n)[part]]
        assert rows == list(range(n))


def test_impression_counts_are_exact(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, monkeypatch: pytest.MonkeyPatch
) -> None:
    prep = steps.load_prepared(tiny_world.lake)
    enc, as_of = prep.enc, prep.window.holdout_start
    assert enc.imp_ts.size > 7 * 10  # many slices
    n = prep.vocab.item_ids.size
    monkeypatch.setattr(data, "IMPRESSION_SLICE", 7)
    shown, clicked = impression_counts(enc, enc.imp_item, as_of, n)
    before = (enc.imp_ts < as_of) & (enc.imp_item >= 0)
    expected = np.zeros(n)
    np.add.at(expected, enc.imp_item[before], 1.0)
    expected_clicks = np.zeros(n)
    np.add.at(expected_clicks, enc.imp_item[before & enc.imp_clicked], 1.0)
    np.testing.assert_array_equal(shown, expected)
    np.testing.assert_array_equal(clicked, expected_clicks)
    assert 0 < clicked.sum() < shown.sum() < enc.imp_ts.size  # the mask matters


def test_feature_snapshots_are_the_same_sliced(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(0, tiny_world.settings)
    prep = steps.load_prepared(tiny_world.lake)
    for snap in ("rank0", "eval"):
        as_of = prep.as_of(snap)
        items = _both(
            monkeypatch,
            lambda as_of=as_of: item_snapshot(prep.enc, prep.vocab, as_of, params).to_arrays(),
        )
        _same_arrays(*items)
        users = _both(
            monkeypatch,
            lambda as_of=as_of: user_snapshot(prep.enc, prep.vocab, as_of, params).to_arrays(),
        )
        _same_arrays(*users)


def test_holdout_split_and_shown_items_are_the_same_sliced(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(0, tiny_world.settings)
    prep = steps.load_prepared(tiny_world.lake)
    state = steps.load_state(tiny_world.lake, prep, "eval", params)
    whole, sliced = _both(
        monkeypatch, lambda: build_holdout(state, prep.enc, prep.window.end, params)
    )
    assert sliced.stats == whole.stats and whole.stats["impressions"] > 0
    assert sliced.truth == whole.truth
    assert sliced.imp_users == whole.imp_users and sliced.imp_items == whole.imp_items
    np.testing.assert_array_equal(sliced.imp_positions, whole.imp_positions)
    np.testing.assert_array_equal(sliced.imp_clicked, whole.imp_clicked)

    ids = (prep.vocab.user_ids, prep.vocab.item_ids)
    whole_split, sliced_split = _both(
        monkeypatch, lambda: per_user_split(prep.enc, *ids, params.replace(eval_per_user_users=50))
    )
    assert whole_split is not None and sliced_split is not None
    assert sliced_split.truth == whole_split.truth
    assert sliced_split.stats == whole_split.stats
    _same_arrays(whole_split.train.to_arrays(), sliced_split.train.to_arrays())
    assert whole_split.train.imp_ts.size < prep.enc.imp_ts.size  # impressions were dropped

    start, end = prep.window.cutoff, prep.window.holdout_start
    users = np.unique(prep.enc.user[prep.enc.ts >= start])[::3]
    for chosen in (None, users):
        before, after = _both(monkeypatch, lambda c=chosen: shown_items(prep.enc, start, end, c))
        assert after == before and before
