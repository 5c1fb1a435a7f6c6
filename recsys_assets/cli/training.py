"""``recsys retrain``: process what has landed, then run the whole training graph.

The run is created in the project's Dagster instance (``$RECSYS_HOME/dagster``) from
the code location's ``retrain_job`` and executed by the job's own executor, with this
process as its run worker (:func:`recsys_assets.runs.execute_run`); the progress bar
follows the run's event log, as the UI does. It appears in the UI with its logs and
metadata like a run launched by a sensor.
"""

from __future__ import annotations

import contextlib
import time
from typing import Annotated, Any

import typer
from rich.markup import escape

from recsys_assets.cli import app
from recsys_assets.cli.common import console, fail, progress, summary


def unprocessed_days(lake: Any) -> list[str]:
    """Dates with sealed landing files newer than their weblogs partition (or without one)."""
    from recsys_serving.landing import list_sealed
    from recsys_serving.layout import WEBLOGS_AREA, partitions, weblogs_key

    newest: dict[str, int] = {}
    for f in list_sealed(lake):
        newest[f.date] = max(newest.get(f.date, 0), f.seal_ns)
    if not newest:
        return []
    processed = {day: obj.mtime for day, obj in partitions(lake, WEBLOGS_AREA).items()}
    days = []
    for day, seal_ns in sorted(newest.items()):
        done = processed.get(day)
        if done is None or seal_ns / 1e9 > done or not lake.exists(weblogs_key(day)):
            days.append(day)
    return days


@app.command()
def retrain(
    process: Annotated[
        bool, typer.Option(help="First process landed weblogs that are not processed yet.")
    ] = True,
) -> None:
    """Train, evaluate and register a model from the lake (the first becomes production).

    One retraining at a time: this takes the retraining lock (``training/exclusive.py``)
    before anything else and refuses at once, naming the holder, if a retraining (this
    command elsewhere, or a ``retrain_job`` run) holds it.
    """
    from recsys_assets.instance import get_instance
    from recsys_assets.training.exclusive import RetrainBusy, lock_path, retrain_lock
    from recsys_serving.lake import open_lake
    from recsys_serving.settings import Settings

    settings = Settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        try:
            # Re-entrant: the run this thread executes joins this hold (its executor
            # writes its run id into the lock) instead of waiting for it.
            held.enter_context(
                retrain_lock(
                    lock_path(settings, lake),
                    run_id=None,
                    trigger="recsys retrain",
                    reentrant=True,
                    # A retrain that has just started creates its run within seconds.
                    name_run_within=30.0,
                )
            )
        except RetrainBusy as exc:
            fail(str(exc))
        instance = get_instance(settings)
        _fail_dead_cli_runs(instance, lake)
        _retrain(settings, lake, instance, process, started)


def _fail_dead_cli_runs(instance: Any, lake: Any) -> None:
    """Mark failed the retrainings an earlier ``recsys retrain`` left "running" when its
    process died: we hold the lock now, so none of them is alive (a local lake's lock
    covers every process that can write it). Otherwise the instance would show them
    running for ever and the closed loop would wait for them before retraining."""
    import dagster as dg

    from recsys_serving.layout import RETRAIN_LOCK_KEY

    if lake.local_path(RETRAIN_LOCK_KEY) is None:
        return  # S3: the lock is per host, a run on another host may be alive
    alive = [
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
    ]
    tags = {"recsys/pipeline": "retrain", "recsys/trigger": "cli"}
    for run in instance.get_runs(filters=dg.RunsFilter(tags=tags, statuses=alive)):
        instance.report_run_failed(
            run, message="its recsys retrain process died (the retraining lock was free)"
        )
        console.print(f"marked retraining run {run.run_id[:8]} failed: its process had died")


def _retrain(settings: Any, lake: Any, instance: Any, process: bool, started: float) -> None:
    import dagster as dg

    from recsys_assets.monitoring.sensors import IN_PROCESS_RUN_CONFIG
    from recsys_assets.runs import CLI_RUN_CONFIG, execute_run, materialize_weblogs
    from recsys_assets.training.graph import RETRAIN_ASSETS
    from recsys_assets.training.jobs import RETRAIN_TAGS

    if process:
        from recsys_assets.cli.acquisition import seal_orphans

        seal_orphans(lake, settings)
        days = unprocessed_days(lake)
        if days:
            with console.status(f"processing weblogs {days[0]}..{days[-1]} ({len(days)} dates)"):
                outcome = materialize_weblogs(settings, days, instance=instance)
            if not outcome.success:
                fail(f"processing weblogs failed: {outcome.failure or 'see the Dagster UI'}")
            rows = outcome.materialized.get("weblogs", {}).get("dagster/row_count", 0)
            console.print(f"processed weblogs {days[0]}..{days[-1]}: {rows:,} rows")

    done: set[str] = set()
    # One process, as the sensor's retrainings; no Dagster stack traces on the console:
    # the failure is said in one line below.
    run_config = {**IN_PROCESS_RUN_CONFIG, **CLI_RUN_CONFIG}

    with progress() as bar:
        task = bar.add_task("retraining", total=len(RETRAIN_ASSETS))

        def started_run(run_id: str) -> None:
            bar.update(task, description=f"retraining (run {run_id[:8]})")

        def materialized(record: Any) -> None:
            key = record.dagster_event.asset_key.to_user_string()
            if key not in done:
                done.add(key)
                bar.update(task, completed=len(done), description=f"retraining: {key}")

        outcome = execute_run(
            "retrain_job",
            instance,
            tags={**RETRAIN_TAGS, "recsys/trigger": "cli"},
            run_config=run_config,
            on_event=materialized,
            of_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
            on_start=started_run,
        )
        bar.update(task, completed=len(outcome.materialized))
    run_id = outcome.run_id

    elapsed = time.perf_counter() - started
    if not outcome.success:
        failed = [c for c, ok in outcome.checks.items() if not ok]
        detail = f" (failed checks: {', '.join(failed)})" if failed else ""
        fail(
            f"retraining failed{detail}: {outcome.failure or 'see the Dagster UI'}; "
            f"nothing was registered (run {run_id[:8]})"
        )
    registered = outcome.materialized["registered_model"]
    evaluation = outcome.materialized["model_evaluation"]
    metrics = evaluation.get("metrics") or {}
    k = settings.training.eval_k
    ours = (metrics.get("challenger") or {}).get(f"ndcg@{k}")
    base = (metrics.get("popularity") or {}).get(f"ndcg@{k}")
    comparison = ""
    if isinstance(ours, int | float) and isinstance(base, int | float):
        lift = f" ({(ours - base) / base:+.0%})" if base else ""
        comparison = f"NDCG@{k} {ours:.4f} vs popularity {base:.4f}{lift}; "
    ours_pu = evaluation.get(f"per_user_challenger_ndcg@{k}")
    base_pu = evaluation.get(f"per_user_popularity_ndcg@{k}")
    if isinstance(ours_pu, int | float) and isinstance(base_pu, int | float):
        comparison += f"per-user NDCG@{k} {ours_pu:.4f} vs popularity {base_pu:.4f}; "
    if evaluation.get("warning"):
        console.print(f"[yellow]warning:[/] {escape(str(evaluation['warning']))}")
    if registered.get("mlflow_run_id"):
        console.print(
            f"MLflow run {registered['mlflow_run_id']} in {registered['mlflow_tracking_uri']}"
        )
    elif registered.get("mlflow") == "failed":
        console.print(
            f"[yellow]warning:[/] MLflow not updated ({escape(str(registered['mlflow_error']))}); "
            "`recsys models sync-mlflow` catches it up"
        )
    summary(
        f"retrained {registered['version']}: {comparison}decision {evaluation['decision']}; "
        f"registered as {registered['registered_as']}; run {run_id[:8]} in {elapsed:.1f}s"
    )
