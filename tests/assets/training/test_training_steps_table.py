"""The training graph is declared once (``training/graph.py``): the Dagster assets,
``retrain_job``, the CLI's progress list and ``train_bundle`` all follow the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
import pytest
from model_support import tiny_outcome, tiny_world

from recsys_assets.definitions import make_definitions
from recsys_assets.training import graph
from recsys_assets.training.assets import TRAINING_ASSETS
from recsys_assets.training.names import RECOMMENDER
from recsys_assets.training.outputs import Bundle
from recsys_assets.training.pipeline import TrainOutcome
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings

__all__ = ["tiny_outcome", "tiny_world"]  # fixtures


def _is_topological(order: list[str]) -> bool:
    position = {name: n for n, name in enumerate(order)}
    return all(
        position[i] < position[step.name]
        for step in graph.STEPS
        if step.name in position
        for i in graph.upstream_steps(step)
    )


def test_the_assets_are_the_table() -> None:
    assert [a.key.to_user_string() for a in TRAINING_ASSETS] == list(graph.NAMES)
    for asset, step in zip(TRAINING_ASSETS, graph.STEPS, strict=True):
        spec = next(iter(asset.specs))
        assert {d.asset_key.to_user_string() for d in spec.deps} == set(step.inputs)
        assert spec.description == step.description
        assert spec.group_name == step.group == "training"
        assert set(spec.kinds) == set(step.kinds)
        assert {(c.name, c.blocking) for c in asset.check_specs} == {
            (c.name, True) for c in step.checks
        }


def test_retrain_job_and_the_cli_list_are_the_table(tmp_path: Path) -> None:
    defs = make_definitions(Settings(home=tmp_path / "home"))
    job = defs.resolve_job_def("retrain_job")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert keys == set(graph.RETRAIN_ASSETS)
    # What the CLI's progress bar counts: the catalogue snapshots, then the table.
    assert (*graph.REFRESHED_BY_RETRAIN, *graph.NAMES) == graph.RETRAIN_ASSETS
    asset_graph = defs.resolve_asset_graph()
    for name in graph.NAMES:
        parents = {p.to_user_string() for p in asset_graph.get(dg.AssetKey(name)).parent_keys}
        assert parents == set(graph.BY_NAME[name].inputs)


def test_a_table_out_of_order_is_refused() -> None:
    graph.check_order(graph.STEPS)
    with pytest.raises(ValueError, match="listed before its inputs"):
        graph.check_order(tuple(reversed(graph.STEPS)))


def test_train_bundle_runs_the_tables_steps_in_a_topological_order(
    tiny_outcome: TrainOutcome,
) -> None:
    ran = list(tiny_outcome.timings)
    assert ran == [s.name for s in graph.until(RECOMMENDER)]
    assert set(ran) == {RECOMMENDER} | _ancestors(RECOMMENDER)
    assert _is_topological(ran)
    for name, record in tiny_outcome.steps.items():
        assert isinstance(record, graph.BY_NAME[name].output)
        assert dataclasses.is_dataclass(record)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, dataclasses.fields(record)[0].name, None)


def _ancestors(name: str) -> set[str]:
    found: set[str] = set()
    todo = [name]
    while todo:
        for parent in graph.upstream_steps(graph.BY_NAME[todo.pop()]):
            if parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


def test_each_record_is_handed_over_through_the_lake_unchanged(
    tiny_outcome: TrainOutcome, tmp_path: Path
) -> None:
    """What a step in another process is handed is what the step returned."""
    lake = LocalLake(tmp_path / "lake")
    for name, record in tiny_outcome.steps.items():
        graph.save_output(lake, graph.BY_NAME[name], record)
    upstream = graph.LakeOutputs(lake)
    for name, record in tiny_outcome.steps.items():
        assert type(upstream[name]) is type(record)
        assert upstream[name].to_json() == record.to_json()
    bundle = upstream[RECOMMENDER]
    assert isinstance(bundle, Bundle)
    assert bundle.version == tiny_outcome.manifest["version"]
    assert bundle.path == tiny_outcome.bundle_path
