"""ctr_drop_sensor on synthetic CTR series in a real lake, evaluated against a real
Dagster instance: no trigger on noise, one trigger on a real drop (with the evidence in
its tags), none during the cool-down or while a repair is under way, and a cursor that
survives a daemon restart. The tick only requests runs; the ``monitoring_job`` run it
requests records the drop (decision log, alert, ``online_ctr`` metadata)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import orjson
import pytest
from monitoring_support import closed_loop_config, register_model, resources, write_feedback

from recsys_assets.monitoring import sensors
from recsys_assets.monitoring.assets import monitoring_job, online_ctr
from recsys_assets.monitoring.promotion import read_decisions
from recsys_assets.monitoring.sensors import DropCursor, build_ctr_drop_sensor, evaluate_drop
from recsys_serving.lake import LocalLake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.registry import ModelRegistry


@dg.op
def _stand_in() -> None:
    """The sensor only needs a job called retrain_job to target."""


@dg.job(name="retrain_job", tags={"recsys/pipeline": "retrain"})
def retrain_job() -> None:
    _stand_in()


sensor = build_ctr_drop_sensor(30, retrain_job=retrain_job)


def retrains(result: dg.SensorResult) -> list[dg.RunRequest]:
    return [r for r in result.run_requests if r.job_name == "retrain_job"]


@dg.job(name="weblogs_job")
def weblogs_job() -> None:
    _stand_in()


def weblogs_processed(instance: dg.DagsterInstance) -> None:
    """What the landing sensor's runs leave in the instance: a successful weblogs run,
    created (on the real clock) after the sensor's frozen now."""
    assert weblogs_job.execute_in_process(instance=instance).success


@pytest.fixture(autouse=True)
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """The sensor's clock, held still: a minute boundary falling between writing the
    feedback, a weblogs run and a tick must not move the sensor's windows."""
    now = datetime.now(UTC)
    monkeypatch.setattr(sensors, "_now", lambda: now)
    return now


class World:
    def __init__(self, root: Path, webhook_url: str | None = None, **config: Any) -> None:
        self.lake = LocalLake(root / "lake")
        self.registry = ModelRegistry(self.lake)
        self.v1 = register_model(self.registry, root, "v1")
        self.registry.set_alias(PRODUCTION, self.v1, reason="test")
        self.resources = resources(self.lake, webhook_url, **config)
        self.defs = dg.Definitions(
            assets=[online_ctr],
            sensors=[sensor],
            jobs=[retrain_job, weblogs_job, monitoring_job],
            resources=self.resources,
        )
        self.now = sensors._now()

    def feedback(self, ctrs: list[float], version: str | None = None, seed: int = 0) -> None:
        start = self.now - timedelta(minutes=len(ctrs))
        rng = np.random.default_rng(seed)
        write_feedback(self.lake, version or self.v1, start, len(ctrs), ctrs, rng)

    def tick(self, instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=instance, definitions=self.defs, resources=self.resources, cursor=cursor
        )
        return sensor.evaluate_tick(context)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def test_noise_does_not_trigger(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    world = World(tmp_path)
    world.feedback([0.08] * 45)
    result = world.tick(instance)
    assert not result.run_requests
    assert "no_drop" in (result.skip_message or "") or "small_drop" in (result.skip_message or "")
    assert DropCursor.parse(result.cursor).triggers == 0


def test_a_real_drop_launches_one_retraining_with_its_evidence(
    tmp_path: Path, instance: dg.DagsterInstance, alert_webhook_server: Any
) -> None:
    world = World(tmp_path, alert_webhook_server.url)
    world.feedback([0.08] * 33 + [0.03] * 12)
    # Confirmed, but the weblogs that show it are not processed yet: wait for them.
    waiting = world.tick(instance)
    assert not waiting.run_requests
    assert "waiting for weblogs processed after" in (waiting.skip_message or "")
    assert DropCursor.parse(waiting.cursor).pending_since is not None
    weblogs_processed(instance)
    result = world.tick(instance, waiting.cursor)
    assert len(retrains(result)) == 1
    assert DropCursor.parse(result.cursor).pending_since is None
    request, record = result.run_requests
    assert request.job_name == "retrain_job"
    tags = request.tags
    assert request.run_key.startswith(f"ctr-drop-{world.v1}-")
    assert tags["recsys/pipeline"] == "retrain" and tags["recsys/trigger"] == "ctr_drop"
    assert request.run_config == {"execution": {"config": {"in_process": {}}}}
    assert tags["recsys/drop/model_version"] == world.v1
    assert float(tags["recsys/drop/p_value"]) < 0.01
    assert float(tags["recsys/drop/recent_ctr"]) < float(tags["recsys/drop/baseline_ctr"])
    assert ".." in tags["recsys/drop/recent_window"] and "/" in tags["recsys/drop/impressions"]

    # The tick itself wrote nothing: the drop is recorded by the run it requested.
    assert not result.asset_events and read_decisions(world.lake) == []
    assert not alert_webhook_server.requests
    assert record.job_name == "monitoring_job" and record.run_key == f"{request.run_key}-recorded"
    assert record.tags["recsys/drop/p_value"] == tags["recsys/drop/p_value"]
    assert "recsys/trigger" not in record.tags  # not a retraining
    assert record.tags["recsys/pipeline"] == "monitoring"
    recorded = world.defs.resolve_job_def("monitoring_job").execute_in_process(
        run_config=record.run_config, tags=record.tags, instance=instance
    )
    assert recorded.success

    # The evidence is visible in the UI, the lake's decision log and the alert.
    (observation,) = recorded.asset_materializations_for_node("online_ctr")
    assert observation.metadata["event"].value == "ctr_drop"
    assert observation.metadata["run_key"].value == request.run_key
    assert observation.metadata["evidence"].value["p_value"] < 0.01
    (decision,) = read_decisions(world.lake)
    assert decision["action"] == "drop_detected" and decision["evidence"]["run_key"]
    (posted,) = alert_webhook_server.requests
    assert "retraining launched" in posted["text"]

    # Cool-down: the next ticks see the same drop and do nothing.
    again = world.tick(instance, result.cursor)
    assert not again.run_requests and "cool-down" in (again.skip_message or "")

    # A daemon restart: the cursor Dagster stored is all a new process has.
    with dg.instance_for_test() as restarted:
        stored = orjson.loads(result.cursor or "")
        assert stored["last_run_key"] == request.run_key and stored["triggers"] == 1
        after_restart = world.tick(restarted, result.cursor)
        assert not after_restart.run_requests
        assert "cool-down" in (after_restart.skip_message or "")

    # A cursor about a model this lake never had (a fresh lake) imposes no cool-down.
    foreign = DropCursor.parse(result.cursor)
    foreign.last_version = "v20200101000000-00000000"
    weblogs_processed(instance)
    assert len(retrains(world.tick(instance, foreign.dump()))) == 1

    # Once the cool-down is over a drop that is still there may retrain again.
    expired = DropCursor.parse(result.cursor)
    expired.last_trigger_at = (world.now - timedelta(minutes=31)).isoformat()
    weblogs_processed(instance)
    later = world.tick(instance, expired.dump())
    assert len(retrains(later)) == 1

    # A lost cursor at the same moment gives the same run key: the daemon would not
    # launch that retraining twice.
    config = world.resources["closed_loop"]
    now = datetime.now(UTC)
    keys = {
        evaluate_drop(world.lake, config, DropCursor(), now, running_retrain=None).run_key
        for _ in range(2)
    }
    assert len(keys) == 1 and None not in keys


def test_holds_while_a_retraining_runs_or_a_canary_is_judged(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path)
    world.feedback([0.08] * 33 + [0.03] * 12)
    run = instance.create_run_for_job(retrain_job, tags={"recsys/pipeline": "retrain"})
    result = world.tick(instance)
    assert not result.run_requests
    assert f"retraining run {run.run_id[:8]} is in progress" in (result.skip_message or "")

    instance.report_run_failed(run)
    v2 = register_model(world.registry, tmp_path, "v2")
    world.registry.set_alias(CANDIDATE, v2, share=0.1, reason="test canary")
    held = world.tick(instance)
    assert not held.run_requests and "canary" in (held.skip_message or "")
    world.registry.clear_alias(CANDIDATE, reason="test")
    weblogs_processed(instance)
    assert len(retrains(world.tick(instance))) == 1


def test_a_drop_whose_weblogs_never_get_processed_still_retrains_after_the_wait(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path)
    world.feedback([0.08] * 33 + [0.03] * 12)
    waiting = world.tick(instance)
    assert not waiting.run_requests
    stale = DropCursor.parse(waiting.cursor)
    stale.pending_since = (world.now - timedelta(minutes=6)).isoformat()
    assert len(retrains(world.tick(instance, stale.dump()))) == 1
    # A drop that goes away clears the pending state.
    calm = World(tmp_path / "calm")
    calm.feedback([0.08] * 45)
    assert DropCursor.parse(calm.tick(instance, waiting.cursor).cursor).pending_since is None


def test_a_newly_promoted_model_is_not_blamed_for_its_predecessor(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path)
    world.feedback([0.08] * 33 + [0.03] * 12)
    v2 = register_model(world.registry, tmp_path, "v2")
    world.registry.promote(v2, reason="test")
    world.feedback([0.03] * 8, version=v2, seed=1)
    result = world.tick(instance)
    assert not result.run_requests and "thin_evidence" in (result.skip_message or "")


def test_thin_traffic_never_triggers(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    world = World(tmp_path, ctr_min_impressions=5000)
    world.feedback([0.08] * 33 + [0.0] * 12)
    result = world.tick(instance)
    assert not result.run_requests and "thin_evidence" in (result.skip_message or "")


def test_code_location_wires_the_closed_loop(tmp_path: Path) -> None:
    from recsys_assets.definitions import make_definitions
    from recsys_serving.settings import Settings

    settings = Settings(home=tmp_path, nightly_retrain_enabled=False, closed_loop_tick_seconds=7)
    repo = make_definitions(settings).get_repository_def()
    drop = repo.get_sensor_def("ctr_drop_sensor")
    assert [t.job_name for t in drop.targets] == ["retrain_job", "monitoring_job"]
    assert drop.minimum_interval_seconds == 7
    assert drop.default_status == dg.DefaultSensorStatus.RUNNING
    promotion = repo.get_sensor_def("promotion_sensor")
    assert promotion.default_status == dg.DefaultSensorStatus.RUNNING
    assert [t.job_name for t in promotion.targets] == [
        "canary_job",
        "publish_job",
        "mlflow_sync_job",
    ]
    assert repo.get_job("canary_job").executor_def.name == "in_process"
    nightly = repo.get_schedule_def("nightly_retrain_schedule")
    assert nightly.job_name == "retrain_job"
    assert nightly.default_status == dg.DefaultScheduleStatus.STOPPED
    assert repo.get_schedule_def("online_ctr_schedule").job_name == "monitoring_job"
    assert repo.get_job("retrain_job").tags["recsys/pipeline"] == "retrain"


def test_a_confirmed_drop_still_retrains_once_both_windows_lie_after_it(
    tmp_path: Path,
) -> None:
    """While the weblogs are processed, the drop moves out of the baseline window: the
    test then compares low with low, yet CTR has not come back. The retraining still
    runs, on the evidence the drop was confirmed with; a recovery cancels it."""
    config = closed_loop_config()
    for ctr_after, launches in ((0.03, True), (0.08, False)):
        world = World(tmp_path / f"after-{ctr_after}")
        world.feedback([0.08] * 33 + [0.03] * 12)
        cursor = DropCursor()
        first = evaluate_drop(
            world.lake,
            config,
            cursor,
            world.now,
            running_retrain=None,
            weblogs_processed_since=lambda _t: False,
        )
        assert first.run_key is None and cursor.pending_since is not None
        later = world.now + timedelta(minutes=40)
        rng = np.random.default_rng(3)
        write_feedback(world.lake, world.v1, world.now, 40, ctr_after, rng)
        tick = evaluate_drop(
            world.lake,
            config,
            cursor,
            later,
            running_retrain=None,
            weblogs_processed_since=lambda _t: True,
        )
        assert tick.verdict is not None and not tick.verdict.dropped
        if launches:
            assert tick.run_key is not None
            assert tick.run_key.startswith(f"ctr-drop-{world.v1}-")
            assert float(tick.tags["recsys/drop/baseline_ctr"]) > 0.06
            assert float(tick.tags["recsys/drop/p_value"]) < 0.01
            assert tick.evidence["baseline"]["ctr"] > 0.06 and cursor.triggers == 1
        else:
            assert tick.run_key is None and "CTR is back" in (tick.skip_reason or "")
        assert cursor.pending_since is None
