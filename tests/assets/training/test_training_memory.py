"""Bounded training memory at 100M events, with exactly the same results: the steps
scan every impression one slice at a time (the same values as one whole-array pass),
and the npz hand-over between steps is memory-mapped (the same arrays as np.load)."""

from __future__ import annotations

import gc
import io
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from model_support import TinyWorld, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training import artifacts as art
from recsys_assets.training import data, ease, steps
from recsys_assets.training.evaluation import build_holdout, per_user_split
from recsys_assets.training.names import RETRIEVAL
from recsys_assets.training.pipeline import TrainOutcome
from recsys_assets.training.ranking import shown_items
from recsys_assets.training.retrieval import als_matrix, fit_als, retrieval_snapshot
from recsys_assets.training.snapshot import (
    assemble_state,
    impression_counts,
    item_snapshot,
    user_snapshot,
)
from recsys_serving.lake import LocalLake
from recsys_serving.registry import PromotionRule

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


def test_large_npz_members_are_mapped_aligned_and_copy_on_write(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    rng = np.random.default_rng(0)
    arrays = {
        "enc/ts": rng.random(200_001),
        "enc/user": np.arange(300_001, dtype=np.int64),
        "vocab/user_ids": np.asarray([f"u{i}" for i in range(70_001)]),
        "enc/imp_clicked": rng.random(1_500_001) < 0.1,
        "fortran": np.asfortranarray(rng.random((513, 700)).astype(np.float32)),
        "small": np.arange(5, dtype=np.int32),
        "empty": np.zeros(0),
        "scalar": np.float64(3.5),
    }
    art.put_arrays(lake, "training/x/p.npz", arrays)
    path = lake.local_path("training/x/p.npz")
    back = art.get_arrays(lake, "training/x/p.npz")
    mapped = {n for n, v in back.items() if isinstance(v.base, np.memmap)}
    assert mapped == {"enc/ts", "enc/user", "vocab/user_ids", "enc/imp_clicked", "fortran"}
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].flags.aligned, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert back["fortran"].flags.f_contiguous
    with np.load(path) as npz:  # still a plain npz for numpy
        for name, value in arrays.items():
            np.testing.assert_array_equal(npz[name], value, err_msg=name)
    # Writing to a mapped array changes this process's copy only, never the file.
    back["enc/user"][:3] = -7
    assert art.get_arrays(lake, "training/x/p.npz")["enc/user"][:3].tolist() == [0, 1, 2]
    # A remote lake's bytes (npz_bytes) read back the same way.
    with np.load(io.BytesIO(art.npz_bytes(arrays))) as npz:
        np.testing.assert_array_equal(npz["enc/user"], arrays["enc/user"])


def test_npz_files_written_by_numpy_itself_still_load(tmp_path: Path) -> None:
    """Members at unaligned offsets (any npz numpy wrote) are read, not mapped."""
    lake = LocalLake(tmp_path / "lake")
    path = lake.local_path("training/x/old.npz")
    path.parent.mkdir(parents=True)
    arrays = {"a" + "x" * k: np.arange(300_000 + k, dtype=np.int64) for k in range(8)}
    np.savez(path, **arrays)
    back = art.get_arrays(lake, "training/x/old.npz")
    assert any(not isinstance(v.base, np.memmap) for v in back.values())  # some unaligned
    for name, value in arrays.items():
        assert back[name].flags.aligned
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_leave_last_out_encodings_are_the_same_sliced(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, monkeypatch: pytest.MonkeyPatch
) -> None:
    prep = steps.load_prepared(tiny_world.lake)
    assert prep.lastouts
    for lastout in prep.lastouts:
        whole, sliced = _both(monkeypatch, lambda lo=lastout: lo.kept(prep.enc).to_arrays())
        _same_arrays(whole, sliced)
        assert whole["imp_ts"].size < prep.enc.imp_ts.size  # impressions were dropped


def test_gram_by_blocks_is_the_whole_product() -> None:
    """EASE's gram computed a block of columns at a time is the whole sparse product bit
    for bit (scipy sums each entry over the users in the same order)."""
    rng = np.random.default_rng(3)
    matrix = sp.random(600, 90, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    matrix.data = np.log1p(rng.random(matrix.nnz) * 7.0).astype(np.float32)
    matrix = (matrix @ sp.diags(np.r_[np.ones(5), 0.0, np.ones(84)])).tocsr()
    matrix.eliminate_zeros()  # item 5 without interactions: not a gram column
    warm = np.flatnonzero(np.diff(matrix.tocsc().indptr) > 0)
    assert warm.size == 89
    sub = matrix[:, warm].astype(np.float64)
    whole = (sub.T @ sub).toarray()
    for block in (1, 7, 64, 1 << 20):
        got_warm, gram = ease._gram(matrix, block)
        np.testing.assert_array_equal(got_warm, warm)
        assert gram.dtype == np.float64 and gram.tobytes() == whole.tobytes(), block


def test_ease_weights_regularise_in_place_and_restore_the_gram() -> None:
    rng = np.random.default_rng(4)
    x = (rng.random((300, 40)) < 0.2) * rng.random((300, 40))
    gram = x.T @ x
    before = gram.copy()
    for lam in (0.5, 7.25):
        regularised = gram.copy()  # the closed form as it was computed before
        regularised[np.diag_indices_from(regularised)] += lam
        expected = np.linalg.inv(regularised)
        expected /= -np.diag(expected)[None, :]
        np.fill_diagonal(expected, 0.0)
        b = ease.ease_weights(gram, lam)
        assert b.tobytes() == expected.tobytes()
        assert gram.tobytes() == before.tobytes()  # the diagonal put back exactly


def test_evaluation_holds_one_state_at_a_time_and_drops_the_window(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """When the per-user state is built, neither the time holdout's state nor the
    loaded window is alive (only the split's copy of it), and the result is the one
    the same evaluation gives with everything kept (the previous order)."""
    params = tiny_params(0, tiny_world.settings)
    states: list[weakref.ref[Any]] = []
    windows: list[weakref.ref[Any]] = []
    alive: list[tuple[int, int]] = []
    real_load_state, real_load_prepared = steps.load_state, steps.load_prepared
    real_snapshot_state = steps.snapshot_state

    def load_state(*args: Any, **kwargs: Any) -> Any:
        state = real_load_state(*args, **kwargs)
        states.append(weakref.ref(state))
        return state

    def load_prepared(lake: Any) -> steps.Prepared:
        prep = real_load_prepared(lake)
        windows.append(weakref.ref(prep.enc))
        return prep

    def snapshot_state(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive.append((sum(r() is not None for r in states), sum(r() is not None for r in windows)))
        return real_snapshot_state(*args, **kwargs)

    monkeypatch.setattr(steps, "load_state", load_state)
    monkeypatch.setattr(steps, "load_prepared", load_prepared)
    monkeypatch.setattr(steps, "snapshot_state", snapshot_state)
    rule = PromotionRule(metric="ndcg@10", min_lift=0.0, guardrails={})
    version = tiny_outcome.bundle.version
    result = steps.run_model_evaluation(tiny_world.lake, params, rule, tmp_path / "c", version)
    assert len(states) == 1 and len(windows) == 1 and alive == [(0, 0)]
    assert result.per_user is not None and result.per_user["metrics"]["challenger"]

    assert result.metrics["popularity"]["users"] > 0


def test_snapshot_state_is_the_state_of_the_previous_order(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome
) -> None:
    """EASE's graph first, then the rest: the same state as EASE built inside the
    retrieval snapshot, after the feature snapshots and the ALS fit."""
    params = tiny_params(0, tiny_world.settings)
    prep = steps.load_prepared(tiny_world.lake)
    lam = art.get_json(tiny_world.lake, art.key(RETRIEVAL, "ease_selection.json"))["selected"]
    assert lam is not None
    as_of = prep.window.end
    new = steps.snapshot_state(prep.enc, prep.vocab, as_of, params, lam)
    items = item_snapshot(prep.enc, prep.vocab, as_of, params)
    users = user_snapshot(prep.enc, prep.vocab, as_of, params)
    matrix = als_matrix(prep.enc, prep.vocab, as_of, params)
    fit = fit_als(prep.enc, prep.vocab, as_of, params, matrix=matrix)
    retrieval = retrieval_snapshot(
        prep.enc, prep.vocab, as_of, fit.item_factors, params, matrix=matrix, ease_lambda=lam
    )
    old = assemble_state(prep.vocab, items, users, retrieval, params)
    assert new.ease.indices.size > 0
    timings = ("seconds",)  # EASE's stats carry its fit time
    for state in (new, old):
        state.params["ease"] = {k: v for k, v in state.params["ease"].items() if k not in timings}
    assert new.params == old.params
    for name in ("item_factors", "user_factors", "item_table", "user_table", "popular"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name), err_msg=name)
    for name in ("ease", "covisit", "item_knn", "seen", "recent", "user_affinity"):
        a, b = getattr(new, name), getattr(old, name)
        for part in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part), err_msg=name)
