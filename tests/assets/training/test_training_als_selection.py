"""Per-dataset choice of the ALS settings: on the newest label window before the
holdout, by ALS-alone NDCG, with the configured settings first and winning ties."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import TinyWorld, tiny_outcome, tiny_params, tiny_world

from recsys_assets.training import artifacts as art
from recsys_assets.training import steps
from recsys_assets.training.als_selection import (
    grid_configs,
    retrieval_ndcg,
    select_als,
    validation_users,
)
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.pipeline import TrainOutcome
from recsys_serving.lake import LocalLake

__all__ = ["tiny_outcome", "tiny_world"]  # fixtures

# A regularization this strong shrinks every factor to nothing: ALS then ranks items
# arbitrarily, far below a sensible setting on any data.
CRUSHING = 1e7


@pytest.fixture(scope="module")
def prepared(tiny_world: TinyWorld, tiny_outcome: TrainOutcome) -> steps.Prepared:
    return steps.load_prepared(tiny_world.lake)  # what the tiny world's training prepared


def test_grid_lists_the_configured_settings_first_and_each_setting_once() -> None:
    params = TrainingParams(als_alpha=5.0, als_bm25=True)
    configs = grid_configs(params)
    assert configs[0] == {"als_alpha": 5.0, "als_bm25": True}
    assert len(configs) == 1 + 4
    on_grid = grid_configs(TrainingParams(als_alpha=10.0, als_bm25=True))
    assert len(on_grid) == 4 and on_grid[0] == {"als_alpha": 10.0, "als_bm25": True}
    assert len({tuple(sorted(c.items())) for c in on_grid}) == 4
    # The number of factors is not chosen by default (see the module's docstring).
    assert all("als_factors" not in c for c in configs)


def test_a_grid_naming_anything_but_als_settings_is_refused() -> None:
    with pytest.raises(ValueError, match="als_grid"):
        TrainingParams.create(als_grid={"lgb_rounds": [10]})
    with pytest.raises(ValueError, match="als_grid"):
        TrainingParams.create(als_grid={"als_factors": []})
    with pytest.raises(ValueError, match="als_select_margin"):
        TrainingParams.create(als_select_margin=-0.1)


def test_the_better_setting_wins_whichever_side_it_is_on(prepared: steps.Prepared) -> None:
    good = tiny_params(als_select=True, als_grid={"als_regularization": [CRUSHING]})
    chosen, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, good)
    assert chosen.als_regularization == good.als_regularization
    scores = [r["ndcg@10"] for r in evidence["results"]]
    assert scores[0] > scores[1] + 0.05, evidence

    bad = tiny_params(
        als_select=True, als_regularization=CRUSHING, als_grid={"als_regularization": [0.05]}
    )
    chosen, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, bad)
    assert chosen.als_regularization == 0.05
    assert evidence["selected"] == {"als_regularization": 0.05}
    # The evidence is what the choice was made on: rescoring gives the same figure.
    window = prepared.window
    val = validation_users(
        prepared.enc, prepared.vocab, window.cutoffs[0], window.label_end(window.cutoffs[0]), bad
    )
    again = retrieval_ndcg(prepared.enc, prepared.vocab, window.cutoffs[0], val, chosen)
    assert again == pytest.approx(evidence["results"][1]["ndcg@10"], abs=1e-6)
    # A margin no setting can clear keeps the configured one, however poor.
    stubborn = bad.replace(als_select_margin=1e9)
    chosen, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, stubborn)
    assert chosen.als_regularization == CRUSHING
    assert evidence["selected"] == {"als_regularization": CRUSHING}


def test_the_choice_never_looks_at_the_holdout(prepared: steps.Prepared) -> None:
    always = tiny_params(als_select=True)
    _, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, always)
    assert evidence["validation"]["end"] <= prepared.window.holdout_start
    assert evidence["validation"]["users"] >= 20
    val = validation_users(
        prepared.enc,
        prepared.vocab,
        prepared.window.cutoffs[0],
        prepared.window.holdout_start,
        tiny_params(),
    )
    assert val.users.size == len(val.relevant) and np.all(np.diff(val.users) > 0)
    assert all(val.relevant)  # every validation user has new items to find
    # Each user's history rows are theirs, and none of their new items is in them.
    assert val.history.shape[0] == val.users.size
    for row, new in enumerate(val.relevant):
        seen = set(val.history.indices[val.history.indptr[row] : val.history.indptr[row + 1]])
        assert seen and not seen & new


def test_too_few_validation_users_or_switched_off_keeps_the_configured_settings(
    prepared: steps.Prepared,
) -> None:
    thin = tiny_params(als_select=True, als_select_min_users=10**6)
    chosen, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, thin)
    assert chosen == thin and "kept the configured settings" in evidence["skipped"]
    off = tiny_params(als_select=False)
    chosen, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, off)
    assert chosen == off and evidence["skipped"] == "selection switched off"


def test_the_bundle_records_the_choice_and_is_fitted_with_it(
    tiny_outcome: TrainOutcome,
) -> None:
    # The tiny world is a simulated clickstream: by default its logged impressions
    # keep the configured settings (ALS alone is a misleading judge there).
    selection = tiny_outcome.manifest["components"]["als_selection"]
    assert "logged impressions" in selection["skipped"]
    assert selection["selected"] == {"als_alpha": 10.0, "als_bm25": True}
    assert tiny_outcome.steps[steps.RETRIEVAL].als_selection == selection
    for snapshot, fit in tiny_outcome.manifest["components"]["als"].items():
        assert fit["alpha"] == 10.0 and fit["bm25"] is True, snapshot


def test_by_default_the_choice_is_made_for_logs_without_impressions(
    prepared: steps.Prepared,
) -> None:
    assert prepared.enc.imp_ts.size > 0
    no_impressions = dataclasses.replace(
        prepared.enc,
        **{
            name: getattr(prepared.enc, name)[:0]
            for name in (
                "imp_user",
                "imp_item",
                "imp_ts",
                "imp_clicked",
                "imp_position",
                "imp_request",
            )
        },
    )
    params = tiny_params()
    assert params.als_select is None
    _, evidence = select_als(no_impressions, prepared.vocab, prepared.window, params)
    assert "skipped" not in evidence and len(evidence["results"]) == 4
    _, evidence = select_als(prepared.enc, prepared.vocab, prepared.window, params)
    assert "logged impressions" in evidence["skipped"]


def test_retrieval_fits_every_snapshot_with_the_chosen_settings(
    tiny_world: TinyWorld, tiny_outcome: TrainOutcome, tmp_path: Path
) -> None:
    lake_root = tmp_path / "lake"
    shutil.copytree(
        tiny_world.lake.root / "training" / "interactions", lake_root / "training" / "interactions"
    )
    lake = LocalLake(lake_root)
    bad = tiny_params(
        als_select=True, als_regularization=CRUSHING, als_grid={"als_regularization": [0.05]}
    )
    result = steps.run_retrieval(lake, bad)
    assert result.als_selection["selected"] == {"als_regularization": 0.05}
    assert {fit["regularization"] for fit in result.als.values()} == {0.05}
    assert (
        art.get_json(lake, art.key(steps.RETRIEVAL, "als_selection.json")) == result.als_selection
    )


def test_scoring_in_chunks_of_users_changes_nothing(
    prepared: steps.Prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys_assets.training import als_selection

    window, params = prepared.window, tiny_params()
    cut = window.cutoffs[0]
    val = validation_users(prepared.enc, prepared.vocab, cut, window.label_end(cut), params)
    whole = retrieval_ndcg(prepared.enc, prepared.vocab, cut, val, params)
    assert val.users.size > 7
    monkeypatch.setattr(als_selection, "SCORE_CHUNK", 7)
    chunked = retrieval_ndcg(prepared.enc, prepared.vocab, cut, val, params)
    assert chunked == pytest.approx(whole, abs=1e-9)
