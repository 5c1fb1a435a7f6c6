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
from recsys_serving.settings import Settings


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    failure: str | None = None


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
    # The full event log is in the UI; the terminal only needs warnings and errors.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
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
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization  # type: ignore[union-attr]
            outcome.materialized[mat.asset_key.to_user_string()] = {
                k: getattr(v, "value", v) for k, v in mat.metadata.items()
            }
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            outcome.checks[ev.check_name] = bool(ev.passed)  # type: ignore[union-attr]
        elif event.event_type_value == "STEP_FAILURE" and outcome.failure is None:
            err = event.event_specific_data.error  # type: ignore[union-attr]
            outcome.failure = err.message.strip() if err else "step failed"
    return outcome
