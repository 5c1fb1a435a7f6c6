"""promotion_sensor and canary_job: an offline "promote" becomes a canary, the canary
is judged on live CTR and ramped, promoted or rolled back, every decision is recorded
(a ``production_model`` materialization of a ``canary_job`` run, registry history,
lake log, alert), and nothing moves without a successful registration.

The sensor only requests runs (run key, evidence tags) and writes nothing; each test
tick executes the runs it requested against the same instance, as the daemon would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from monitoring_support import register_model, resources, write_feedback

from recsys_assets.monitoring.assets import canary_job, production_model
from recsys_assets.monitoring.promotion import read_decisions
from recsys_assets.monitoring.sensors import PromotionCursor, build_promotion_sensor
from recsys_serving.lake import LocalLake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.registry import ModelRegistry

sensor = build_promotion_sensor(30)


class Step:
    """One sensor tick and the canary_job runs it requested, executed in order."""

    def __init__(self, tick: dg.SensorResult, runs: list[dg.ExecuteInProcessResult]) -> None:
        self.tick = tick
        self.runs = runs
        self.run_requests = tick.run_requests
        self.cursor = tick.cursor
        self.skip_message = tick.skip_message
        # Decisions only: a run that found nothing to do records "wait" or "none".
        self.asset_events = [
            mat
            for run in runs
            for mat in run.asset_materializations_for_node("production_model")
            if mat.metadata["action"].value not in ("wait", "none")
        ]


class World:
    def __init__(
        self,
        root: Path,
        instance: dg.DagsterInstance,
        sensor_def: dg.SensorDefinition = sensor,
        jobs: list[Any] | None = None,
        **config: Any,
    ) -> None:
        self.root = root
        self.sensor = sensor_def
        self.instance = instance
        self.lake = LocalLake(root / "lake")
        self.registry = ModelRegistry(self.lake)
        self.v1 = register_model(self.registry, root, "v1")
        self.registry.set_alias(PRODUCTION, self.v1, reason="first model")
        self.webhook: Any = config.pop("webhook", None)
        self.resources = resources(self.lake, self.webhook.url if self.webhook else None, **config)
        self.defs = dg.Definitions(
            assets=[
                dg.AssetSpec("model_evaluation"),
                dg.AssetSpec("registered_model"),
                production_model,
            ],
            sensors=[sensor_def],
            jobs=[canary_job, *(jobs or [])],
            resources=self.resources,
        )
        self.cursor: str | None = None
        self.launched: set[str | None] = set()

    def trained(self, tag: str, decision: str = "promote", register: bool = True) -> str:
        """What a retraining run leaves behind: an evaluation, then (maybe) a registration."""
        version = register_model(self.registry, self.root, tag)
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "model_evaluation",
                metadata={
                    "challenger_version": version,
                    "production_version": self.v1,
                    "decision": decision,
                    "decision_reason": f"ndcg@10 +12% ({decision})",
                    "metrics": dg.MetadataValue.json({"challenger": {"ndcg@10": 0.3}}),
                },
            )
        )
        if register:
            self.instance.report_runless_asset_event(
                dg.AssetMaterialization("registered_model", metadata={"version": version})
            )
        return version

    def sense(self, cursor: str | None = None) -> dg.SensorResult:
        """The sensor's tick alone (what the daemon evaluates)."""
        context = dg.build_sensor_context(
            instance=self.instance,
            definitions=self.defs,
            resources=self.resources,
            cursor=cursor if cursor is not None else self.cursor,
        )
        result = self.sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return result

    def execute(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        """Run a requested canary_job run as the daemon would launch it."""
        result = self.defs.resolve_job_def("canary_job").execute_in_process(
            run_config=request.run_config, tags=request.tags, instance=self.instance
        )
        assert result.success
        return result

    def tick(self, cursor: str | None = None) -> Step:
        """A tick and the canary_job runs it requested, launched as the daemon does:
        once per run key."""
        result = self.sense(cursor)
        runs = []
        for request in result.run_requests:
            if request.job_name == "canary_job" and request.run_key not in self.launched:
                self.launched.add(request.run_key)
                runs.append(self.execute(request))
        return Step(result, runs)

    def canary_running_since(self, version: str, minutes: int, share: float) -> None:
        """Set the candidate as if its current step had begun ``minutes`` ago."""
        started = datetime.now(UTC) - timedelta(minutes=minutes)
        past = ModelRegistry(self.lake, clock=lambda: started)
        evidence = {"canary_started_at": started.isoformat(), "offline": {"decision": "promote"}}
        past.set_alias(CANDIDATE, version, share=share, reason="test step", evidence=evidence)

    def traffic(self, version: str, minutes: int, ctr: float, per_minute: int, seed: int) -> None:
        start = datetime.now(UTC) - timedelta(minutes=minutes)
        rng = np.random.default_rng(seed)
        write_feedback(self.lake, version, start, minutes, ctr, rng, per_minute=per_minute)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def actions(result: Step) -> list[str]:
    return [event.metadata["action"].value for event in result.asset_events]


def test_promote_decision_starts_a_canary_then_ramps_and_promotes(
    tmp_path: Path, instance: dg.DagsterInstance, alert_webhook_server: Any
) -> None:
    world = World(tmp_path, instance, webhook=alert_webhook_server)
    v2 = world.trained("v2")
    started = world.tick()
    assert actions(started) == ["canary_started"]
    candidate = world.registry.alias(CANDIDATE)
    assert candidate is not None and candidate.version == v2 and candidate.share == 0.1
    assert candidate.evidence["offline"]["decision"] == "promote"
    meta = started.asset_events[0].metadata
    assert meta["model_version"].value == v2 and meta["candidate_share"].value == 0.1
    assert meta["evidence"].value["offline"]["reason"] == "ndcg@10 +12% (promote)"
    assert meta["alert_webhook"].value == "delivered"

    # Processed: a second tick (or a lost cursor) does not restart the canary.
    assert world.tick().asset_events == []
    assert world.tick(cursor="").asset_events == []
    assert world.registry.alias(CANDIDATE).share == 0.1  # type: ignore[union-attr]

    # 12 minutes of live traffic: the candidate is clearly better -> next share.
    world.canary_running_since(v2, 12, 0.1)
    world.traffic(v2, 12, 0.10, per_minute=100, seed=1)
    world.traffic(world.v1, 12, 0.05, per_minute=900, seed=2)
    ramped = world.tick()
    assert actions(ramped) == ["ramp"]
    assert world.registry.alias(CANDIDATE).share == 0.5  # type: ignore[union-attr]
    meta = ramped.asset_events[0].metadata
    assert meta["candidate_ctr"].value > meta["production_ctr"].value
    assert meta["p_not_worse"].value < 0.05

    world.canary_running_since(v2, 12, 0.5)
    promoted = world.tick()
    assert actions(promoted) == ["promote"]
    assert world.registry.alias(PRODUCTION).version == v2  # type: ignore[union-attr]
    assert world.registry.alias(CANDIDATE) is None
    evidence = promoted.asset_events[0].metadata["evidence"].value
    assert evidence["offline"]["decision"] == "promote"
    assert evidence["online"]["action"] == "promote"

    history = world.registry.history(alias=PRODUCTION)
    assert history[0].version == v2 and history[0].evidence["online"]["candidate"]["impressions"]
    logged = [d["action"] for d in read_decisions(world.lake)]
    assert logged == ["canary_started", "ramp", "promote"]
    titles = [r["text"].splitlines()[0] for r in alert_webhook_server.requests]
    assert len(titles) == 3 and "promoted to production" in titles[-1]


def test_worse_candidate_is_rolled_back_and_production_keeps_serving(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path, instance)
    v2 = world.trained("v2")
    world.tick()
    world.canary_running_since(v2, 12, 0.1)
    world.traffic(v2, 12, 0.03, per_minute=150, seed=3)
    world.traffic(world.v1, 12, 0.08, per_minute=900, seed=4)
    result = world.tick()
    assert actions(result) == ["rollback"]
    assert result.asset_events[0].metadata["p_worse"].value < 0.05
    assert world.registry.alias(CANDIDATE) is None
    assert world.registry.alias(PRODUCTION).version == world.v1  # type: ignore[union-attr]


def test_thin_evidence_waits_and_a_stale_canary_times_out(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path, instance, canary_max_minutes=30)
    v2 = world.trained("v2")
    world.tick()
    world.canary_running_since(v2, 10, 0.1)
    world.traffic(v2, 10, 0.2, per_minute=20, seed=5)
    world.traffic(world.v1, 10, 0.05, per_minute=180, seed=6)
    waiting = world.tick()
    assert waiting.asset_events == [] and "thin_evidence" in (waiting.skip_message or "")
    assert world.registry.alias(CANDIDATE).version == v2  # type: ignore[union-attr]

    world.canary_running_since(v2, 31, 0.1)
    timed_out = world.tick()
    assert actions(timed_out) == ["rollback"]
    assert "timeout" in timed_out.asset_events[0].metadata["reason"].value


def test_rejected_challenger_and_failed_registration_move_nothing(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path, instance)
    world.trained("v2", decision="reject")
    result = world.tick()
    assert actions(result) == ["rejected"]
    world.trained("v3", register=False)  # evaluation said promote, registration failed
    assert world.tick().asset_events == []
    assert world.registry.alias(CANDIDATE) is None
    assert world.registry.alias(PRODUCTION).version == world.v1  # type: ignore[union-attr]
    assert PromotionCursor.parse(world.cursor).registered_after is not None


def test_newer_challenger_supersedes_a_running_canary(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path, instance)
    v2 = world.trained("v2")
    world.tick()
    assert world.registry.alias(CANDIDATE).version == v2  # type: ignore[union-attr]
    v3 = world.trained("v3")
    result = world.tick()
    assert actions(result) == ["canary_started"]
    candidate = world.registry.alias(CANDIDATE)
    assert candidate is not None and candidate.version == v3
    assert candidate.evidence["superseded"] == v2


def test_every_move_of_production_runs_publish_job_once(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    @dg.op
    def _stand_in() -> None:
        """The sensor only needs a job called publish_job to target."""

    @dg.job(name="publish_job")
    def publish_job() -> None:
        _stand_in()

    publishing = build_promotion_sensor(30, publish_job=publish_job)

    def published(result: Step) -> list[tuple[str, str]]:
        return [
            (r.tags["recsys/model_version"], r.tags["recsys/trigger"])
            for r in result.run_requests
            if r.job_name == "publish_job"
        ]

    world = World(tmp_path, instance, sensor_def=publishing, jobs=[publish_job])
    # The production model in place was never published by this deployment: it is now.
    first = world.tick()
    assert published(first) == [(world.v1, "production_changed")]
    assert not actions(first)
    assert not world.tick().run_requests  # nothing moved since

    v2 = world.trained("v2")
    started = world.tick()
    assert actions(started) == ["canary_started"] and not published(started)
    world.canary_running_since(v2, 12, 0.1)
    world.traffic(v2, 12, 0.10, per_minute=100, seed=1)
    world.traffic(world.v1, 12, 0.05, per_minute=900, seed=2)
    ramped = world.tick()
    assert actions(ramped) == ["ramp"] and not published(ramped)  # a canary is not production
    world.canary_running_since(v2, 12, 0.5)
    promoted = world.tick()
    assert actions(promoted) == ["promote"]
    # The canary_job run moved production after the tick: the next tick publishes it.
    moved = world.tick()
    assert published(moved) == [(v2, "production_changed")]
    (request,) = moved.run_requests
    assert request.run_key.startswith(f"publish-{v2}-")
    assert not world.tick().run_requests

    # A move by hand (what `recsys models rollback` does) is published too, under a new
    # key although v1 was published before: the artifact follows production back.
    world.registry.rollback(reason="test: by hand")
    rolled_back = world.tick()
    assert published(rolled_back) == [(world.v1, "production_changed")]
    assert rolled_back.run_requests[0].run_key != first.run_requests[0].run_key
    # A lost cursor asks again with the same keys, which Dagster launches only once
    # (so v2, rolled back, is not phased in again).
    again = world.tick(cursor="")
    assert [r.run_key for r in again.run_requests] == [
        f"canary-start-{v2}",
        rolled_back.run_requests[0].run_key,
    ]
    assert not again.runs

    # Without a publish job (RECSYS_PUBLISH_ON_PROMOTION=false) nothing is published.
    assert [t.job_name for t in sensor.targets] == ["canary_job"]
    assert [t.job_name for t in publishing.targets] == ["canary_job", "publish_job"]
    quiet = World(tmp_path / "quiet", instance)
    assert not quiet.tick().run_requests


def test_a_damaged_challenger_is_never_phased_in_and_a_damaged_candidate_never_promoted(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    world = World(tmp_path, instance)
    v2 = world.trained("v2")
    ranker = world.lake.local_path(world.registry.model_key(v2, "ranker.txt"))
    ranker.write_text("model XX\n")  # damaged after registration, same size
    rejected = world.tick()
    assert actions(rejected) == ["rejected"]
    reason = rejected.asset_events[0].metadata["reason"].value
    assert f"{v2} fails verification" in reason and "ranker.txt" in reason
    assert world.registry.alias(CANDIDATE) is None
    assert world.registry.alias(PRODUCTION).version == world.v1  # type: ignore[union-attr]
    assert world.tick().asset_events == []  # decided once; the cursor moved on

    # A canary whose bundle goes bad while it runs ends without reaching production.
    v3 = world.trained("v3")
    assert actions(world.tick()) == ["canary_started"]
    world.canary_running_since(v3, 12, 0.5)
    world.traffic(v3, 12, 0.10, per_minute=200, seed=7)
    world.traffic(world.v1, 12, 0.05, per_minute=400, seed=8)
    ranker = world.lake.local_path(world.registry.model_key(v3, "ranker.txt"))
    ranker.write_text("model XX\n")
    ended = world.tick()
    assert actions(ended) == ["rollback"]
    assert "candidate bundle fails verification" in ended.asset_events[0].metadata["reason"].value
    assert world.registry.alias(CANDIDATE) is None
    assert world.registry.alias(PRODUCTION).version == world.v1  # type: ignore[union-attr]


def test_the_sensor_only_requests_runs_and_each_run_records_its_decision(
    tmp_path: Path, instance: dg.DagsterInstance, alert_webhook_server: Any
) -> None:
    world = World(tmp_path, instance, webhook=alert_webhook_server)
    v2 = world.trained("v2")
    moves = len(world.registry.history())
    tick = world.sense()
    (start,) = tick.run_requests
    assert start.job_name == "canary_job" and start.run_key == f"canary-start-{v2}"
    assert start.tags["recsys/pipeline"] == "canary"
    assert start.tags["recsys/model_version"] == v2
    assert start.tags["recsys/evaluation/decision"] == "promote"
    assert start.tags["recsys/evaluation/reason"] == "ndcg@10 +12% (promote)"
    # The tick wrote nothing: no alias moved, no decision logged, nobody alerted.
    assert world.registry.alias(CANDIDATE) is None and len(world.registry.history()) == moves
    assert read_decisions(world.lake) == [] and not alert_webhook_server.requests
    assert not tick.asset_events

    run = world.execute(start)
    (mat,) = run.asset_materializations_for_node("production_model")
    assert mat.metadata["action"].value == "canary_started"
    assert instance.get_run_by_id(run.run_id).tags["recsys/model_version"] == v2  # type: ignore[union-attr]
    assert [d["action"] for d in read_decisions(world.lake)] == ["canary_started"]

    world.canary_running_since(v2, 12, 0.1)
    world.traffic(v2, 12, 0.10, per_minute=100, seed=1)
    world.traffic(world.v1, 12, 0.05, per_minute=900, seed=2)
    (judge,) = world.sense().run_requests
    assert judge.job_name == "canary_job" and judge.run_key.startswith(f"canary-{v2}-")
    assert judge.tags["recsys/canary/action"] == "ramp"
    assert float(judge.tags["recsys/canary/p_not_worse"]) < 0.05
    assert float(judge.tags["recsys/canary/candidate_ctr"]) > float(
        judge.tags["recsys/canary/production_ctr"]
    )
    assert world.registry.alias(CANDIDATE).share == 0.1  # type: ignore[union-attr]
    assert len(read_decisions(world.lake)) == 1

    # While a canary_job run is queued or running, the sensor asks for nothing more.
    queued = instance.create_run_for_job(
        world.defs.resolve_job_def("canary_job"), tags=judge.tags, run_config=judge.run_config
    )
    waiting = world.sense()
    assert not waiting.run_requests and queued.run_id[:8] in (waiting.skip_message or "")
    instance.delete_run(queued.run_id)

    run = world.execute(judge)
    (mat,) = run.asset_materializations_for_node("production_model")
    assert mat.metadata["action"].value == "ramp" and mat.metadata["candidate_share"].value == 0.5
    assert mat.metadata["p_not_worse"].value < 0.05
    assert world.registry.alias(CANDIDATE).share == 0.5  # type: ignore[union-attr]

    # Re-executing that run (the UI's button) judges the same moment again: the step it
    # judged is over, so nothing moves twice.
    again = world.execute(judge)
    (mat,) = again.asset_materializations_for_node("production_model")
    assert mat.metadata["action"].value == "wait"
    assert world.registry.alias(CANDIDATE).share == 0.5  # type: ignore[union-attr]
    assert [d["action"] for d in read_decisions(world.lake)] == ["canary_started", "ramp"]
