"""Launch asset runs from the CLI through the project's Dagster instance.

Runs started by hand (``recsys ingest``, ``recsys process``) are ordinary Dagster
runs: they show in the UI with their logs, metadata and check results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from recsys_assets.instance import get_instance
from recsys_assets.weblogs.quality import CLIENT_BEHAVIOUR_CHECKS as WARN_ONLY
from recsys_serving.settings import Settings


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    # One line per failed check: which, how many rows, two examples, what to do.
    check_failures: dict[str, str] = field(default_factory=dict)
    failure: str | None = None


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
    job = defs.resolve_job_def("weblogs_job")
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
        tags |= {ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end}
        result = job.execute_in_process(
            instance=instance, tags=tags, run_config=quiet, raise_on_error=False
        )
    return _outcome(result)


def _outcome(result: dg.ExecuteInProcessResult) -> RunOutcome:
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
            step_error = _root_cause(event.event_specific_data.error)  # type: ignore[union-attr]
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
