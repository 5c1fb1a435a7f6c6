"""MLflow records every retraining and mirrors the lake registry, against a real
``mlflow server`` on 127.0.0.1; an unreachable MLflow never fails a retraining or a move."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import pytest
from mlflow import MlflowClient
from model_support import TinyWorld, build_tiny_world
from monitoring_support import register_model, resources
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.cli.demo import _mlflow_lines
from recsys_assets.definitions import build_resources
from recsys_assets.monitoring.sensors import (
    PromotionCursor,
    build_promotion_sensor,
    mlflow_sync_request,
)
from recsys_assets.tracking.jobs import mlflow_sync_job
from recsys_assets.tracking.mirror import (
    EXPERIMENT,
    MODEL_NAME,
    VERSION_TAG,
    MlflowMirror,
    mirror_for,
    mirror_registry,
    record_retraining,
)
from recsys_assets.tracking.resource import MlflowResource
from recsys_assets.training.assets import TRAINING_ASSETS
from recsys_assets.training.jobs import RETRAIN_TAGS
from recsys_serving.lake import LocalLake
from recsys_serving.layout import CANDIDATE, MLFLOW_STATUS_KEY, PRODUCTION
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings

pytestmark = pytest.mark.slow

SMALL = {
    "als_factors": 16,
    "als_iterations": 8,
    "lgb_rounds": 40,
    "lgb_min_data_in_leaf": 20,
    "eval_max_users": 300,
}


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen[bytes]

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free 127.0.0.1 port, SQLite backend and artifacts in a temp
    dir; started once for the module, waited for until /health answers, then stopped."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy: {(root / 'server.log').read_text()}")
            try:  # wakes at once if the server dies
                process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
        yield MlflowServer(url, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("mlflow-world"))


def _settings(world: TinyWorld, tracking_uri: str) -> Settings:
    return Settings(
        home=world.settings.lake.home,
        holdout_days=0.5,
        label_days=0.75,
        seed=0,
        threads=1,
        candidate_pool=100,
        train_params=SMALL,
        mlflow_tracking_uri=tracking_uri,
    )


def _retrain(settings: Settings) -> dict[str, Any]:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            TRAINING_ASSETS,
            resources=build_resources(settings),
            instance=instance,
            tags=RETRAIN_TAGS,
            raise_on_error=False,
        )
        assert result.success
        mats = result.asset_materializations_for_node("registered_model")
        return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


def _mlflow_versions(client: MlflowClient) -> dict[str, str]:
    return {
        mv.tags[VERSION_TAG]: str(mv.version)
        for mv in client.search_model_versions(f"name = '{MODEL_NAME}'")
        if VERSION_TAG in mv.tags
    }


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}


def test_a_retraining_is_an_mlflow_run_and_its_registration_a_model_version(
    world: TinyWorld, mlflow_server: MlflowServer
) -> None:
    meta = _retrain(_settings(world, mlflow_server.url))
    version = meta["version"]
    assert meta["mlflow"] == "ok", meta
    client = mlflow_server.client()
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name(EXPERIMENT).experiment_id
    manifest = ModelRegistry(world.lake).get(version).manifest
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    # Provenance: the code, the data, where the bundle is.
    assert tags[VERSION_TAG] == version
    assert tags["mlflow.source.git.commit"] == tags["code_sha"] == manifest["code_sha"]
    assert tags["lake_uri"] == ModelRegistry(world.lake).uri(version)
    assert tags["dagster_run_id"]
    assert params["data.version"] == tags["data_version"] and len(tags["data_version"]) == 16
    assert params["data.partitions"].endswith(f"({len(manifest['data']['partitions'])})")
    assert params["train.als_factors"] == "16" and params["seed"] == "0"
    # The evaluation: time holdout, per-user holdout, the first-model decision.
    assert tags["decision"] in ("first_model", "below_popularity")
    assert tags["first_model_rule.applies"] == "True"
    assert tags["answers"] in ("model", "popularity")
    assert "holdout/challenger/ndcg_at_10" in metrics
    assert "holdout/popularity/ndcg_at_10" in metrics
    assert "per_user/challenger/ndcg_at_10" in metrics
    assert "per_user/comparison/difference" in metrics
    # Per-step figures and durations.
    assert metrics["steps/interactions/events"] == manifest["data"]["events"]
    assert "steps/ranking_model/best_iteration" in metrics
    # The ranker's learning curve: validation NDCG per boosting round, as metric history.
    curve = client.get_metric_history(
        run.info.run_id, "steps/ranking_model/valid_ndcg_at_10_by_round"
    )
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2
    best = int(metrics["steps/ranking_model/best_iteration"])
    assert curve[best - 1].value == pytest.approx(metrics["steps/ranking_model/valid_ndcg"])
    assert {"steps/seconds/interactions", "steps/seconds/model_evaluation"} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert artifacts == {"bundle/manifest.json", "bundle/location.txt"}
    assert "evaluation.json" in {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")
    }
    # The registration: a model version linked to the run, production (the first model).
    mirrored = _mlflow_versions(client)
    mv = client.get_model_version(MODEL_NAME, mirrored[version])
    assert mv.run_id == run.info.run_id and mv.source == f"runs:/{run.info.run_id}/bundle"
    assert _aliases(client)[PRODUCTION] == mirrored[version]
    model_tags = client.get_registered_model(MODEL_NAME).tags
    assert any(k.startswith("move.production.") and version in v for k, v in model_tags.items())


def test_an_unreachable_mlflow_does_not_fail_a_retraining_and_sync_catches_up(
    world: TinyWorld, mlflow_server: MlflowServer, closed_localhost_port: int
) -> None:
    meta = _retrain(_settings(world, f"http://127.0.0.1:{closed_localhost_port}"))
    version = meta["version"]
    assert meta["mlflow"] == "failed" and "mlflow_run_id" not in meta
    assert ModelRegistry(world.lake).exists(version)  # registered all the same
    status = LocalLake(world.settings.resolved_lake_uri).get_bytes(MLFLOW_STATUS_KEY)
    assert b"Connection" in status or b"connect" in status
    env = {
        "RECSYS_HOME": str(world.settings.lake.home),
        "RECSYS_MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    result = CliRunner().invoke(app, ["models", "sync-mlflow"], env=env)
    assert result.exit_code == 0, result.output
    assert "last mirror failure" in result.output and "MLflow in sync" in result.output
    client = mlflow_server.client()
    mirrored = _mlflow_versions(client)
    run = client.get_run(client.get_model_version(MODEL_NAME, mirrored[version]).run_id)
    assert run.data.tags["backfilled"] == "true" and run.data.tags[VERSION_TAG] == version
    assert not world.lake.exists(MLFLOW_STATUS_KEY)
    production = ModelRegistry(world.lake).alias(PRODUCTION)
    assert production is not None
    assert _aliases(client)[PRODUCTION] == mirrored[production.version]
    again = CliRunner().invoke(app, ["models", "sync-mlflow"], env=env)
    assert again.exit_code == 0 and "0 version(s) created" in again.output  # idempotent


def test_manual_promotion_and_rollback_move_the_mlflow_aliases(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    home = tmp_path / "home"
    registry = ModelRegistry(LocalLake(home / "lake"))
    v1 = register_model(registry, tmp_path, "v1")
    v2 = register_model(registry, tmp_path, "v2")
    env = {"RECSYS_HOME": str(home), "RECSYS_MLFLOW_TRACKING_URI": mlflow_server.url}
    client = mlflow_server.client()

    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, ["models", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert "MLflow:" in cli("promote", v1)
    mirrored = _mlflow_versions(client)
    assert _aliases(client)[PRODUCTION] == mirrored[v1]
    cli("promote", v2, "--candidate", "--share", "0.25")
    assert _aliases(client)[CANDIDATE] == mirrored[v2]
    cli("promote", v2)  # the candidate is cleared as it becomes production
    aliases = _aliases(client)
    assert aliases[PRODUCTION] == mirrored[v2] and CANDIDATE not in aliases
    cli("rollback")
    assert _aliases(client)[PRODUCTION] == mirrored[v1]
    tags = client.get_registered_model(MODEL_NAME).tags
    moves = [tags[k] for k in sorted(tags) if k.startswith("move.production.")]
    assert "rolled back" in moves[-1] and f"{v2} -> {v1}" in moves[-1]
    assert any(f"-> {v2} (25%)" in tags[k] for k in tags if k.startswith("move.candidate."))


def test_the_promotion_sensor_mirrors_every_move_whoever_made_it(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    lake = LocalLake(tmp_path / "lake")
    registry = ModelRegistry(lake)
    v1 = register_model(registry, tmp_path, "s1")
    registry.set_alias(PRODUCTION, v1, reason="first model")
    v2 = register_model(registry, tmp_path, "s2")
    sensor = build_promotion_sensor(30, mlflow_sync=mlflow_sync_job)
    res = {**resources(lake), "mlflow": MlflowResource(tracking_uri=mlflow_server.url)}
    client = mlflow_server.client()
    with dg.instance_for_test() as instance:
        defs = dg.Definitions(
            assets=[dg.AssetSpec("model_evaluation"), dg.AssetSpec("registered_model")],
            jobs=[mlflow_sync_job],
            sensors=[sensor],
            resources=res,
        )

        def tick(cursor: str | None) -> tuple[str, list[dg.RunRequest]]:
            """One tick, then the runs it requested, as the daemon would run them."""
            context = dg.build_sensor_context(
                instance=instance, definitions=defs, resources=res, cursor=cursor
            )
            result = sensor.evaluate_tick(context)
            assert result.cursor is not None
            syncs = [r for r in result.run_requests or [] if r.job_name == "mlflow_sync_job"]
            for request in syncs:
                run = mlflow_sync_job.execute_in_process(
                    instance=instance,
                    resources={"lake": res["lake"], "mlflow": res["mlflow"]},
                    tags=request.tags,
                )
                assert run.success
            return result.cursor, syncs

        cursor, syncs = tick(None)  # catches up with what happened before the daemon started
        assert len(syncs) == 1 and syncs[0].run_key.startswith("mlflow-sync-")
        assert _aliases(client)[PRODUCTION] == _mlflow_versions(client)[v1]
        cursor, syncs = tick(cursor)
        assert syncs == []  # nothing moved: no run, MLflow untouched
        # A move made outside the loop (the admin API, serving's process) is mirrored too.
        registry.set_alias(CANDIDATE, v2, share=0.5, reason="admin API: phase in")
        cursor, syncs = tick(cursor)
        assert len(syncs) == 1
        assert _aliases(client)[CANDIDATE] == _mlflow_versions(client)[v2]
        registry.rollback(reason="admin API: stop the canary")
        cursor, syncs = tick(cursor)
        assert len(syncs) == 1
        assert CANDIDATE not in _aliases(client)
        assert PromotionCursor.parse(cursor).mlflow["requested"].startswith(f"production={v1}")


def test_the_loop_retries_an_unreachable_mlflow_later_not_every_tick(
    tmp_path: Path, closed_localhost_port: int
) -> None:
    lake = LocalLake(tmp_path / "lake")
    registry = ModelRegistry(lake)
    registry.set_alias(PRODUCTION, register_model(registry, tmp_path, "r1"), reason="first")
    res = {
        "lake": resources(lake)["lake"],
        "mlflow": MlflowResource(tracking_uri=f"http://127.0.0.1:{closed_localhost_port}"),
    }
    cursor = PromotionCursor()
    now = datetime.now(UTC)
    request = mlflow_sync_request(registry, lake, cursor, now, "mlflow_sync_job")
    assert request is not None
    with dg.instance_for_test() as instance:
        run = mlflow_sync_job.execute_in_process(
            instance=instance, resources=res, raise_on_error=False
        )
    assert not run.success  # the failed sync is a failed run, with MLflow's error in its log
    assert lake.exists(MLFLOW_STATUS_KEY)
    assert mlflow_sync_request(registry, lake, cursor, now, "mlflow_sync_job") is None
    later = datetime.fromtimestamp(now.timestamp() + 301, UTC)
    retry = mlflow_sync_request(registry, lake, cursor, later, "mlflow_sync_job")
    assert retry is not None and retry.run_key != request.run_key
    lake.delete(MLFLOW_STATUS_KEY)  # a later sync succeeded: nothing moved, nothing due
    assert mlflow_sync_request(registry, lake, cursor, later + timedelta(hours=1), "x") is None


def test_the_embedded_default_is_sqlite_under_the_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=None)
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    version = register_model(registry, tmp_path, "e1")
    registry.set_alias(PRODUCTION, version, reason="first")
    mirror = mirror_for(settings)
    assert mirror is not None
    assert mirror.tracking_uri == f"sqlite:///{settings.resolved_home / 'mlflow' / 'mlflow.db'}"
    outcome = mirror_registry(mirror, registry)
    assert outcome["mlflow"] == "ok", outcome
    client = MlflowClient(tracking_uri=mirror.tracking_uri, registry_uri=mirror.tracking_uri)
    assert client.get_registered_model(MODEL_NAME).aliases == {PRODUCTION: 1}
    run = client.get_run(client.get_model_version(MODEL_NAME, "1").run_id)
    artifacts = settings.resolved_home / "mlflow" / "artifacts"
    assert run.info.artifact_uri.startswith(artifacts.as_uri())
    assert (Path(urlparse(run.info.artifact_uri).path) / "bundle" / "manifest.json").is_file()
    assert mirror_for(Settings(home=tmp_path, mlflow_tracking_uri="OFF")) is None
    # What `recsys demo` prints at the end: the runs, the aliases, how to browse them.
    lines = "\n".join(_mlflow_lines(settings, registry.lake))
    assert "1 retraining run(s) in experiment recsys-training" in lines
    assert f"production -> version 1 ({version})" in lines and "1 alias move(s)" in lines
    assert f"mlflow ui --backend-store-uri {mirror.tracking_uri}" in lines


def test_a_long_registry_is_caught_up_in_batches_alias_targets_first(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    registry = ModelRegistry(LocalLake(tmp_path / "lake"))
    for i in range(3):
        register_model(registry, tmp_path, f"b{i}")
    old, middle, new = registry.version_ids()  # sortable: the registry's own order
    registry.set_alias(PRODUCTION, old, reason="the oldest serves")
    mirror = MlflowMirror(mlflow_server.url, model_name="recsys-batches")
    first = mirror.sync(registry, max_versions=1)
    assert first.versions_created == [old, new] and not first.complete
    client = mlflow_server.client()
    aliases = client.get_registered_model("recsys-batches").aliases
    assert {k: str(v) for k, v in aliases.items()} == {PRODUCTION: first.mlflow_versions[old]}
    second = mirror.sync(registry, max_versions=1)
    assert second.versions_created == [middle] and second.complete
    assert mirror.sync(registry).versions_created == []


def test_a_run_a_sync_backfilled_first_is_completed_in_place(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """The loop may sync between the lake registration and the retraining's own record
    (a first model moves production): the version keeps one run, with everything."""
    registry = ModelRegistry(LocalLake(tmp_path / "lake"))
    version = register_model(registry, tmp_path, "race")
    mirror = MlflowMirror(mlflow_server.url, model_name="recsys-race", lock_path=tmp_path / "l")
    assert mirror.sync(registry).runs_backfilled == [version]
    client = mlflow_server.client()
    linked = client.get_model_version("recsys-race", "1").run_id
    evaluation = {
        "k": 10,
        "decision": "first_model",
        "decision_reason": "no production yet",
        "metrics": {"challenger": {"ndcg@10": 0.25}, "popularity": {"ndcg@10": 0.2}},
        "first_model_rule": {"applies": True, "serve": True, "reason": "beats popularity"},
    }
    outcome = record_retraining(mirror, registry, version, evaluation=evaluation)
    assert outcome["mlflow"] == "ok" and outcome["run_id"] == linked
    run = client.get_run(linked)
    assert "backfilled" not in run.data.tags and run.data.tags["decision"] == "first_model"
    assert run.data.metrics["holdout/challenger/ndcg_at_10"] == 0.25
    runs = client.search_runs(
        [mirror.experiment_id()], filter_string=f"tags.`{VERSION_TAG}` = '{version}'"
    )
    assert [r.info.run_id for r in runs] == [linked]
