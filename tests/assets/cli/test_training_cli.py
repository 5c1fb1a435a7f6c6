"""``recsys retrain`` end to end through the CLI and the project's Dagster instance."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import orjson
import pytest
from model_support import build_tiny_world
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.cli.training import unprocessed_days
from recsys_assets.definitions import make_definitions
from recsys_assets.instance import get_instance
from recsys_assets.training.exclusive import lock_path, retrain_lock
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings

runner = CliRunner()
SMALL = {"als_factors": 16, "als_iterations": 8, "lgb_rounds": 60, "lgb_min_data_in_leaf": 20}


def _env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    monkeypatch.delenv("RECSYS_MONGO_URI", raising=False)
    monkeypatch.delenv("RECSYS_ES_URL", raising=False)
    monkeypatch.setenv("RECSYS_HOLDOUT_DAYS", "0.5")
    monkeypatch.setenv("RECSYS_LABEL_DAYS", "0.75")
    monkeypatch.setenv("RECSYS_THREADS", "1")
    monkeypatch.setenv("RECSYS_CANDIDATE_POOL", "100")
    monkeypatch.setenv("RECSYS_TRAIN_PARAMS", json.dumps(SMALL))


@pytest.mark.slow
def test_retrain_processes_landed_logs_then_trains_and_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = build_tiny_world(tmp_path / "world")
    home = world.settings.lake.home
    _env(monkeypatch, home)
    sim = world.summary
    loaded = runner.invoke(
        app, ["catalog", "load", "--items", str(sim.items_path), "--users", str(sim.users_path)]
    )
    assert loaded.exit_code == 0, loaded.output
    # Late events for a day nobody processed yet: retrain must process them first.
    late = tmp_path / "late.ndjson"
    late.write_bytes(
        b"\n".join(
            orjson.dumps(
                {
                    "event_id": f"late-{n}",
                    "event_type": "view",
                    "user_id": f"u{n:06d}",
                    "item_id": f"i{n:05d}",
                    "ts": "2024-06-01T00:30:00Z",
                }
            )
            for n in range(5)
        )
    )
    landed = runner.invoke(app, ["ingest", str(late), "--no-process"])
    assert landed.exit_code == 0, landed.output
    lake = LocalLake(home / "lake")
    assert unprocessed_days(lake) == ["2024-06-01"]

    result = runner.invoke(app, ["retrain"])
    assert result.exit_code == 0, result.output
    assert "processed weblogs 2024-06-01..2024-06-01: 5 rows" in result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("retrained v")
    assert "NDCG@10" in last and "vs popularity" in last
    assert "decision first_model; registered as production" in last
    assert unprocessed_days(lake) == []

    registry = ModelRegistry(lake)
    production = registry.alias(PRODUCTION)
    assert production is not None and production.version in last
    manifest = registry.get(production.version).manifest
    assert "2024-06-01" in manifest["data"]["partitions"]
    assert manifest["data"]["vocabulary"]["categories"] == sim.n_categories

    instance = dg.DagsterInstance.get()  # DAGSTER_HOME is the project's instance
    try:
        runs = instance.get_runs(dg.RunsFilter(tags={"recsys/pipeline": "retrain"}))
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
    finally:
        instance.dispose()


def test_retrain_on_an_empty_lake_fails_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _env(monkeypatch, home)
    result = runner.invoke(app, ["retrain"])
    assert result.exit_code == 1
    assert "no interactions in the training window" in result.output
    assert "nothing was registered" in result.output
    assert ModelRegistry(LocalLake(home / "lake")).version_ids() == []


def test_retrain_refuses_while_another_retraining_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _env(monkeypatch, home)
    settings = Settings()
    path = lock_path(settings)
    assert path == home / "lake" / "training" / ".retrain.lock"
    with retrain_lock(path, run_id="0123456789abcdef", trigger="retrain_job (ctr_drop)"):
        result = runner.invoke(app, ["retrain"])
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: another retraining is running (run 01234567, ")
    assert "retrain_job (ctr_drop), pid " in line
    # Released (as the kernel releases it when its holder dies): the next one goes
    # ahead, and here fails on the empty lake, past the guard.
    result = runner.invoke(app, ["retrain"])
    assert "no interactions in the training window" in result.output


def test_retrain_marks_failed_the_run_of_a_retrain_that_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _env(monkeypatch, home)
    settings = Settings()
    instance = get_instance(settings)
    try:
        job = make_definitions(settings).resolve_job_def("retrain_job")
        dead = instance.create_run_for_job(
            job,
            tags={"recsys/pipeline": "retrain", "recsys/trigger": "cli"},
            status=dg.DagsterRunStatus.STARTED,
        )
    finally:
        instance.dispose()
    # The lock is free, so its process is gone: this retraining goes ahead (and fails
    # on the empty lake) and records the dead one as failed.
    result = runner.invoke(app, ["retrain"])
    assert f"marked retraining run {dead.run_id[:8]} failed" in result.output
    assert "no interactions in the training window" in result.output
    instance = get_instance(settings)
    try:
        run = instance.get_run_by_id(dead.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
    finally:
        instance.dispose()
