"""One retraining at a time, for real, and no mixed model even if two ran.

* the retraining lock is atomic: of two takers released by one barrier, exactly one
  wins, every time; a holder killed with SIGKILL releases it at once;
* two trainings on one lake at the same time (different ALS sizes) each register an
  internally consistent bundle: each run reads only its own run directory;
* two real ``recsys retrain`` started at the same instant: one is refused with one
  line, the other registers a bundle whose manifest matches its components.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from model_support import TinyWorld, build_tiny_world, tiny_params, tiny_world  # noqa: F401
from typer.testing import CliRunner

from recsys_assets.training import artifacts as art
from recsys_assets.training.exclusive import RetrainBusy, lock_path, read_holder, retrain_lock
from recsys_assets.training.pipeline import train_bundle
from recsys_serving.lake import LocalLake
from recsys_serving.model.bundle import verify_bundle
from recsys_serving.model.recommender import Recommender
from recsys_serving.registry import ModelRegistry

ROUNDS = 200


def assert_consistent(bundle: Path) -> int:
    """The manifest's ALS size is the size of every ALS component in the bundle."""
    manifest = verify_bundle(bundle)
    factors = manifest["params"]["als_factors"]
    model = Recommender.load(bundle)
    assert model.state.item_factors.shape[1] == factors, (manifest["version"], factors)
    assert {fit["factors"] for fit in manifest["components"]["als"].values()} == {factors}
    index = json.loads((bundle / "index" / "index.json").read_text())
    assert index.get("dim", factors) == factors
    return int(factors)


def test_two_takers_at_the_same_instant_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "lake" / "training" / ".retrain.lock"
    start = threading.Barrier(2)
    tried = threading.Barrier(2)
    outcomes: list[list[str]] = [[] for _ in range(ROUNDS)]

    def taker(name: str) -> None:
        for n in range(ROUNDS):
            start.wait(timeout=30)
            try:
                with retrain_lock(path, run_id=None, trigger=name):
                    outcomes[n].append(f"won:{name}")
                    tried.wait(timeout=30)  # hold it until the other one has tried
            except RetrainBusy as exc:
                outcomes[n].append(f"refused:{exc}")
                tried.wait(timeout=30)

    threads = [threading.Thread(target=taker, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for n, outcome in enumerate(outcomes):
        assert sorted(o.split(":")[0] for o in outcome) == ["refused", "won"], (n, outcome)
        (refusal,) = [o for o in outcome if o.startswith("refused")]
        winner = next(o for o in outcome if o.startswith("won")).split(":")[1]
        assert f"another retraining is running ({winner}, pid {os.getpid()}" in refusal


HOLDER = """
import sys
from pathlib import Path
from recsys_assets.training.exclusive import retrain_lock

with retrain_lock(Path(sys.argv[1]), run_id="feedc0de-run", trigger="recsys retrain"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_killed_holder_releases_the_lock_at_once(tmp_path: Path) -> None:
    path = tmp_path / "retrain.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert any(line.strip() == "held" for line in iter(proc.stdout.readline, ""))
        holder = read_holder(path)
        assert holder is not None and holder.pid == proc.pid
        busy = rf"run feedc0de, recsys retrain, pid {proc.pid}"
        with pytest.raises(RetrainBusy, match=busy), retrain_lock(path, run_id=None, trigger="t"):
            pass
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait(timeout=30)
    with retrain_lock(path, run_id="next", trigger="test") as holder:
        assert holder.pid == os.getpid()


def test_the_lock_is_in_the_lake_when_the_lake_is_local(tmp_path: Path) -> None:
    from recsys_serving.settings import Settings

    settings = Settings(home=tmp_path / "home")
    assert lock_path(settings) == tmp_path / "home" / "lake" / "training" / ".retrain.lock"


def _lake_copy(world: TinyWorld, root: Path) -> LocalLake:
    shutil.copytree(
        world.lake.root, root, ignore=lambda d, names: {"training", "registry"} & set(names)
    )
    return LocalLake(root)


@pytest.mark.slow
def test_two_trainings_at_once_on_one_lake_never_mix(
    tiny_world: TinyWorld,  # noqa: F811
    tmp_path: Path,
) -> None:
    lake = _lake_copy(tiny_world, tmp_path / "lake")
    start = threading.Barrier(2)
    bundles: dict[int, Path] = {}
    errors: list[BaseException] = []

    def train(factors: int) -> None:
        try:
            params = tiny_params(0, tiny_world.settings, als_factors=factors)
            start.wait(timeout=60)
            outcome = train_bundle(lake, params, tmp_path / f"out{factors}", run=f"r{factors}")
            bundles[factors] = outcome.bundle_path
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(f,)) for f in (8, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert {f: assert_consistent(b) for f, b in bundles.items()} == {8: 8, 12: 12}
    runs = {o.key.split("/")[2] for o in lake.list(f"{art.RUNS}/")}
    assert runs == {"r8", "r12"}
    assert not lake.exists("training/interactions/prepared.npz")  # nothing shared


def test_old_run_directories_are_pruned_but_never_the_latest_hand_over(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    for n in range(6):
        with art.run_scope(lake, f"run{n}", "interactions"):
            art.put_json(lake, art.key("interactions", "window.json"), {"n": n})
        os.utime(lake.root / art.RUNS / f"run{n}" / "interactions" / "window.json", (n, n))
        os.utime(lake.root / art.RUNS / f"run{n}" / "interactions" / art.DONE, (n, n))
    # run0 is still the latest hand-over of an asset only it produced.
    with art.run_scope(lake, "run0", "ranking_model"):
        art.put_json(lake, art.key("ranking_model", "ranker.json"), {})
    os.utime(lake.root / art.RUNS / "run0" / "ranking_model" / "ranker.json", (0, 0))
    os.utime(lake.root / art.RUNS / "run0" / "ranking_model" / art.DONE, (0, 0))
    removed = art.prune_runs(lake, current="run6", keep=3)
    assert sorted(removed) == ["run1", "run2"]
    left = sorted(p.name for p in (lake.root / art.RUNS).iterdir())
    assert left == ["run0", "run3", "run4", "run5"]
    # A run that made only some assets reads the others from the run that made them last.
    with art.run_scope(lake, "run7", "model_evaluation"):
        assert art.key("ranking_model", "ranker.json").startswith(f"{art.RUNS}/run0/")
        assert art.key("interactions", "x").startswith(f"{art.RUNS}/run5/")
        assert art.key("model_evaluation", "x").startswith(f"{art.RUNS}/run7/")


def test_a_re_execution_reads_and_writes_its_root_runs_directory(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from recsys_assets.training.assets import _in_run

    lake = LocalLake(tmp_path / "lake")
    with art.run_scope(lake, "root-run", "ranking_dataset"):  # the failed parent run's output
        art.put_json(lake, art.key("ranking_dataset", "stats.json"), {"rows": 1})
    with art.run_scope(lake, "other-run", "ranking_dataset"):  # a later, unrelated run
        art.put_json(lake, art.key("ranking_dataset", "stats.json"), {"rows": 2})
    seen: list[Any] = []

    def ranking_model(context: Any, lake: Any, training: Any) -> str:
        seen.append(art.key("ranking_model", "ranker.txt"))
        seen.append(art.get_json(lake.get(), art.key("ranking_dataset", "stats.json")))
        return "materialized"

    retry = SimpleNamespace(run=SimpleNamespace(root_run_id="root-run"), run_id="retry-run")
    resource = SimpleNamespace(get=lambda: lake)
    assert _in_run(ranking_model)(retry, resource, None) == "materialized"
    assert seen == [f"{art.RUNS}/root-run/ranking_model/ranker.txt", {"rows": 1}]
    assert lake.exists(f"{art.RUNS}/root-run/ranking_model/{art.DONE}")


# ------------------------------------------------------------ two real `recsys retrain`
SMALL = {"als_iterations": 6, "lgb_rounds": 40, "lgb_min_data_in_leaf": 20}


def _retrain_child(env: dict[str, str], barrier: Any, results: Any, factors: int) -> None:
    os.environ.update(env)
    os.environ["RECSYS_TRAIN_PARAMS"] = json.dumps({**SMALL, "als_factors": factors})
    import recsys_assets.definitions  # noqa: F401  (imports done before the start line)
    from recsys_assets.cli import app

    barrier.wait(timeout=120)
    result = CliRunner().invoke(app, ["retrain", "--no-process"])
    results.put((factors, result.exit_code, result.output))


@pytest.mark.slow
def test_two_retrains_started_at_the_same_instant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = build_tiny_world(tmp_path / "world")
    home = world.settings.lake.home
    env = {
        "RECSYS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "RECSYS_HOLDOUT_DAYS": "0.5",
        "RECSYS_LABEL_DAYS": "0.75",
        "RECSYS_THREADS": "1",
        "RECSYS_CANDIDATE_POOL": "100",
        "OPENBLAS_NUM_THREADS": "1",
    }
    for name in ("RECSYS_LAKE_URI", "RECSYS_MONGO_URI", "RECSYS_ES_URL", "RECSYS_TRAIN_PARAMS"):
        monkeypatch.delenv(name, raising=False)  # the children inherit this environment
    registry = ModelRegistry(world.lake)
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(2):
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        children = [
            ctx.Process(target=_retrain_child, args=(env, barrier, results, f))
            for f in (8 + round_, 12 + round_)
        ]
        before = set(registry.version_ids())
        for child in children:
            child.start()
        outcomes = sorted(results.get(timeout=600) for _ in children)
        for child in children:
            child.join(timeout=60)
        codes = sorted(code for _, code, _ in outcomes)
        assert codes == [0, 1], outcomes
        (winner,) = [f for f, code, _ in outcomes if code == 0]
        (refused,) = [out for _, code, out in outcomes if code == 1]
        lines = [line for line in refused.splitlines() if line.strip()]
        assert len(lines) == 1 and "another retraining is running (run " in lines[0], refused
        (new,) = set(registry.version_ids()) - before
        bundle = registry.fetch(new, tmp_path / "cache")
        assert assert_consistent(bundle) == winner


# ------------------------------------------------- retrain_job runs launched by Dagster
class _Inner:
    """Stands for Dagster's executor: records whether the lock was held while it ran."""

    retries = None
    step_dependency_config = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ran_locked: bool | None = None

    def execute(self, plan_context: Any, execution_plan: Any) -> Any:
        try:
            with retrain_lock(self.path, run_id=None, trigger="probe"):
                self.ran_locked = False
        except RetrainBusy:
            self.ran_locked = True
        yield "step events"


def test_a_retrain_job_run_waits_for_the_lock_and_holds_it_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from recsys_assets.definitions import make_definitions
    from recsys_assets.training.exclusive import ExclusiveExecutor
    from recsys_serving.settings import Settings

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    settings = Settings()
    job = make_definitions(settings).resolve_job_def("retrain_job")
    assert job.executor_def.name == "retrain_exclusive"

    path = lock_path(settings)
    waiting = threading.Event()
    messages: list[str] = []

    def info(message: str) -> None:
        messages.append(message)
        waiting.set()

    context = SimpleNamespace(
        dagster_run=SimpleNamespace(run_id="run-of-the-daemon", tags={"recsys/trigger": "ctr"}),
        log=SimpleNamespace(info=info),
    )
    inner = _Inner(path)
    events: list[Any] = []
    with retrain_lock(path, run_id="cli-run-1234", trigger="recsys retrain"):
        runner_thread = threading.Thread(
            target=lambda: events.extend(ExclusiveExecutor(inner).execute(context, None))
        )
        runner_thread.start()
        assert waiting.wait(timeout=30)
        assert inner.ran_locked is None  # queued behind the holder, not running
    runner_thread.join(timeout=30)
    assert events == ["step events"]
    assert inner.ran_locked is True
    (message,) = messages
    assert message.startswith(
        f"waiting for the retraining lock, held by run cli-run-, recsys retrain, pid {os.getpid()}"
    )


def _retrain_job() -> Any:
    """retrain_job as the daemon's run worker loads it (from the environment)."""
    from recsys_assets.definitions import make_definitions
    from recsys_serving.settings import Settings

    return make_definitions(Settings()).resolve_job_def("retrain_job")


@pytest.mark.slow
def test_a_launched_retrain_job_run_waits_while_recsys_retrain_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    from recsys_assets.monitoring.sensors import IN_PROCESS_RUN_CONFIG

    home = tmp_path / "home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    from recsys_serving.settings import Settings

    path = lock_path(Settings())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    results: list[Any] = []
    with dg.instance_for_test() as instance:
        try:
            assert holder.stdout is not None
            assert any(line.strip() == "held" for line in iter(holder.stdout.readline, ""))
            runner_thread = threading.Thread(
                target=lambda: results.append(
                    dg.execute_job(
                        dg.reconstructable(_retrain_job),
                        instance=instance,
                        run_config=IN_PROCESS_RUN_CONFIG,
                        tags={"recsys/pipeline": "retrain", "recsys/trigger": "test"},
                        raise_on_error=False,
                    )
                )
            )
            runner_thread.start()

            def waiting() -> bool:
                runs = instance.get_runs()
                return bool(runs) and any(
                    "waiting for the retraining lock, held by run feedc0de" in (r.message or "")
                    for r in instance.all_logs(runs[0].run_id)
                )

            from serving_support import wait_for

            wait_for(waiting, 60, "the run to wait for the lock")
            assert not any(
                r.dagster_event is not None and r.dagster_event.is_step_start
                for r in instance.all_logs(instance.get_runs()[0].run_id)
            )  # no step started while recsys retrain holds the lock
        finally:
            holder.kill()  # the holder dies: the waiting run goes ahead
            holder.wait(timeout=30)
        runner_thread.join(timeout=300)
        (result,) = results
        # Past the lock it ran, and failed as a retraining on an empty lake fails.
        assert not result.success
        failures = [
            r.dagster_event.event_specific_data.error.message  # type: ignore[union-attr]
            for r in instance.all_logs(result.run_id)
            if r.dagster_event is not None and r.dagster_event.is_step_failure
        ]
        assert len(failures) == 1 and "no interactions in the training window" in failures[0]
