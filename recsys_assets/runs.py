"""Runs the CLI starts, through the project's Dagster instance.

Runs started by hand (``recsys ingest``, ``recsys process``, ``recsys retrain``) are
ordinary Dagster runs: they show in the UI with their logs, metadata and check results.

``recsys retrain`` runs ``retrain_job`` with :func:`execute_run`: the run is created in
the instance from the code location's own job (:func:`resolve_job`, rebuilt by name as
a run worker does), executed by the job's executor (the retraining lock included) with
the CLI as its run worker, and followed through its event log. The CLI does not go
through the run queue: with the embedded default no daemon may be running to dequeue
it, and Dagster's public API offers no launch without a loaded workspace; the queue's
one-retraining limit is enforced for the CLI by the retraining lock instead
(:mod:`recsys_assets.training.exclusive`).

Weblogs processing runs in process (``execute_in_process``) because it takes the
caller's ``Settings`` object, which a run rebuilt from the environment would not see.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from recsys_assets.instance import get_instance
from recsys_assets.weblogs.quality import CLIENT_BEHAVIOUR_CHECKS as WARN_ONLY
from recsys_assets.weblogs.sensors import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    WEBLOGS_JOB,
)
from recsys_serving.settings import Settings

# Finds the run an execute_run call created (its id is known only once it exists).
REQUEST_TAG = "recsys/cli_request"


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    # One line per failed check: which, how many rows, two examples, what to do.
    check_failures: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    # The first failed step's own words: a ``dg.Failure``'s description, else its
    # innermost error (``failure`` adds where to read the stack trace).
    error: str | None = None


# Dagster's console logger prints a failed step and the failed run, each with a stack
# trace. The CLI says what failed itself (one line per failed check, or the error),
# and the full event log stays in the instance for the UI.
CLI_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def materialize_weblogs(
    settings: Settings, days: list[str], instance: dg.DagsterInstance | None = None
) -> RunOutcome:
    """Process a contiguous range of weblogs partitions in one run."""
    from recsys_assets.definitions import make_definitions

    defs = make_definitions(settings)
    instance = instance or get_instance(settings)
    start, end = min(days), max(days)
    job = defs.resolve_job_def(WEBLOGS_JOB)
    tags = {"recsys/trigger": "cli"}
    quiet = CLI_RUN_CONFIG
    if start == end:
        result = job.execute_in_process(
            instance=instance,
            partition_key=start,
            tags=tags,
            run_config=quiet,
            raise_on_error=False,
        )
    else:
        tags |= {PARTITION_RANGE_START_TAG: start, PARTITION_RANGE_END_TAG: end}
        result = job.execute_in_process(
            instance=instance, tags=tags, run_config=quiet, raise_on_error=False
        )
    return _outcome(result)


def resolve_job(job_name: str, request: str = "") -> dg.JobDefinition:
    """A job of the code location built from the environment's settings: what a run
    worker loads. Reconstructed by name, so no setting's value is stored with the run.

    ``request`` is unused here: it makes each run's pointer distinct, because Dagster
    caches a reconstructed definition per pointer, and the environment (the lake) may
    have changed since an earlier run in the same process (tests do that).
    """
    from recsys_assets.definitions import make_definitions

    return make_definitions(Settings()).resolve_job_def(job_name)


def execute_run(
    job_name: str,
    instance: dg.DagsterInstance,
    *,
    tags: Mapping[str, str],
    run_config: Mapping[str, Any] | None = None,
    on_event: Callable[[dg.EventLogRecord], None] | None = None,
    of_type: dg.DagsterEventType | None = None,
    on_start: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Create a run of ``job_name`` in ``instance``, execute it here and follow its events.

    ``on_start(run_id)`` is called once the run exists; ``on_event`` receives each of
    its event records (of ``of_type``) as the event log stores them, from a follower
    thread, the way the UI sees them.
    """
    request = uuid.uuid4().hex
    stop = threading.Event()

    def follow() -> None:
        run_id: str | None = None
        cursor: str | None = None
        while not stop.wait(0.5):
            try:
                if run_id is None:
                    runs = instance.get_runs(dg.RunsFilter(tags={REQUEST_TAG: request}), limit=1)
                    if not runs:
                        continue
                    run_id = runs[0].run_id
                    if on_start is not None:
                        on_start(run_id)
                if on_event is None:
                    continue
                page = instance.get_records_for_run(run_id, cursor=cursor, of_type=of_type)
                cursor = page.cursor
                for record in page.records:
                    on_event(record)
            except Exception:  # a busy SQLite file: the next poll reads it
                continue

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        job = dg.build_reconstructable_job(
            "recsys_assets.runs", "resolve_job", reconstructable_args=(job_name, request)
        )
        result = dg.execute_job(
            job,
            instance=instance,
            run_config=dict(run_config or {}),
            tags={**tags, REQUEST_TAG: request},
            raise_on_error=False,
        )
    finally:
        stop.set()
        follower.join(timeout=5)
    return _outcome(result)


def _outcome(result: dg.ExecuteInProcessResult | Any) -> RunOutcome:
    outcome = RunOutcome(run_id=result.run_id, success=result.success)
    step_error: str | None = None
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization  # type: ignore[union-attr]
            outcome.materialized[mat.asset_key.to_user_string()] = {
                k: getattr(v, "value", v) for k, v in mat.metadata.items()
            }
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            outcome.checks[ev.check_name] = bool(ev.passed)  # type: ignore[union-attr]
            if not ev.passed:  # type: ignore[union-attr]
                line = ev.metadata.get("failure")  # type: ignore[union-attr]
                outcome.check_failures[ev.check_name] = str(  # type: ignore[union-attr]
                    getattr(line, "value", None) or f"check {ev.check_name} failed"  # type: ignore[union-attr]
                )
        elif event.event_type_value == "STEP_FAILURE" and step_error is None:
            data = event.event_specific_data
            user = getattr(data, "user_failure_data", None)
            step_error = (user.description if user is not None else None) or _root_cause(
                data.error  # type: ignore[union-attr]
            )
            outcome.error = step_error
    if not outcome.success:
        blocking = [line for name, line in outcome.check_failures.items() if name not in WARN_ONLY]
        if blocking:
            outcome.failure = "; ".join(blocking)
        else:
            where = f"stack trace in the Dagster UI, run {outcome.run_id[:8]}"
            outcome.failure = f"{step_error or 'run failed'} ({where})"
    return outcome


def _root_cause(error: Any) -> str:
    """The innermost error of a step failure, on one line (Dagster wraps user errors)."""
    if error is None:
        return "step failed"
    while getattr(error, "cause", None) is not None:
        error = error.cause
    message = " ".join(str(error.message).split())
    return message if len(message) <= 300 else message[:297] + "..."
