"""Every closed-loop decision is a run in the Dagster UI, with its log events.

One project instance (``$RECSYS_HOME/dagster``, what ``recsys ui`` shows) and the real
code location (``make_definitions``): the sensors are evaluated as the daemon does,
the runs they request are executed against that instance, and the operator's moves go
through ``recsys models``. Then the instance is asked, by job name and tags, for the run
of each decision (a CTR drop, a canary step, a retraining failure's alert, a promotion
and a rollback by hand), and each run's event log must tell the decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from monitoring_support import (
    failing_retrain,
    register_model,
    run_failure_request,
    write_feedback,
)
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.definitions import build_resources, make_definitions
from recsys_assets.instance import get_instance
from recsys_assets.monitoring import sensors
from recsys_serving.lake import LocalLake
from recsys_serving.registry import PRODUCTION, ModelRegistry
from recsys_serving.settings import Settings

CLOSED_LOOP_ENV = {
    "RECSYS_CTR_BUCKET_SECONDS": "60",
    "RECSYS_CTR_RECENT_MINUTES": "10",
    "RECSYS_CTR_BASELINE_MINUTES": "30",
    "RECSYS_CTR_MIN_IMPRESSIONS": "500",
    "RECSYS_CTR_CLICK_DELAY_SECONDS": "0",
    "RECSYS_LANDING_SEGMENT_MAX_AGE_SECONDS": "0",
    # No weblogs runs here: a confirmed drop retrains without waiting for them.
    "RECSYS_RETRAIN_DATA_WAIT_MINUTES": "0",
    "RECSYS_MLFLOW_TRACKING_URI": "off",
    "RECSYS_PUBLISH_ON_PROMOTION": "false",
}


@pytest.fixture
def project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alert_webhook_server: Any
) -> Iterator[tuple[Settings, dg.DagsterInstance]]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", alert_webhook_server.url)
    for name, value in CLOSED_LOOP_ENV.items():
        monkeypatch.setenv(name, value)
    now = datetime.now(UTC)
    # The sensors' clock held still: a minute boundary between writing the feedback
    # and a tick must not move their windows.
    monkeypatch.setattr(sensors, "_now", lambda: now)
    settings = Settings()
    with get_instance(settings) as instance:
        yield settings, instance


def evaluate(
    defs: dg.Definitions, name: str, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
    return defs.resolve_sensor_def(name).evaluate_tick(context)


def launch(
    defs: dg.Definitions,
    request: dg.RunRequest,
    instance: dg.DagsterInstance,
    job_name: str | None = None,
) -> dg.ExecuteInProcessResult:
    """What the daemon does with a request (in this process, against the instance);
    ``job_name`` for a sensor with one target, whose requests name none."""
    name = request.job_name or job_name
    assert name is not None
    result = defs.resolve_job_def(name).execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=instance
    )
    assert result.success
    return result


def the_run(instance: dg.DagsterInstance, job_name: str, **tags: str) -> dg.DagsterRun:
    """The one run of ``job_name`` with ``tags``, as the UI's run filter finds it."""
    (run,) = instance.get_runs(dg.RunsFilter(job_name=job_name, tags=tags))
    assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    return run


def logged(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run.run_id))


def test_every_closed_loop_decision_is_a_run_with_its_logs(
    project: tuple[Settings, dg.DagsterInstance], tmp_path: Path
) -> None:
    settings, instance = project
    defs = make_definitions(settings)
    resources = build_resources(settings)
    lake = LocalLake(tmp_path / "home" / "lake")
    registry = ModelRegistry(lake)
    v1 = register_model(registry, tmp_path, "v1")
    registry.promote(v1, reason="first model")
    now = sensors._now()

    # A CTR drop: the sensor requests the retraining and a monitoring_job run that
    # records the drop (the retraining itself is not run here).
    rates = [0.08] * 33 + [0.03] * 12
    rng = np.random.default_rng(0)
    write_feedback(lake, v1, now - timedelta(minutes=len(rates)), len(rates), rates, rng)
    tick = evaluate(defs, "ctr_drop_sensor", instance, resources)
    (record,) = [r for r in tick.run_requests if r.job_name == "monitoring_job"]
    assert [r.job_name for r in tick.run_requests] == ["retrain_job", "monitoring_job"]
    launch(defs, record, instance)

    # A canary step: a registered challenger the evaluation said to promote.
    v2 = register_model(registry, tmp_path, "v2")
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "model_evaluation",
            metadata={
                "challenger_version": v2,
                "production_version": v1,
                "decision": "promote",
                "decision_reason": "ndcg@10 +12%",
            },
        )
    )
    instance.report_runless_asset_event(
        dg.AssetMaterialization("registered_model", metadata={"version": v2})
    )
    tick = evaluate(defs, "promotion_sensor", instance, resources)
    (start,) = [r for r in tick.run_requests if r.job_name == "canary_job"]
    launch(defs, start, instance)

    # A failed retraining: the run-failure sensor requests the alert as a run.
    failed = failing_retrain.execute_in_process(instance=instance, raise_on_error=False)
    sensor = defs.resolve_sensor_def("retrain_failure_sensor")
    alert = run_failure_request(sensor, instance, failed, resources)
    assert isinstance(alert, dg.RunRequest) and alert.run_key == failed.run_id
    launch(defs, alert, instance, "alert_job")

    # By hand: stop the canary, promote v2, roll production back.
    runner = CliRunner()
    for args in (
        ["rollback", "--reason", "by hand"],
        ["promote", v2, "--reason", "looks good"],
        ["rollback", "--alias", "production", "--reason", "second thoughts"],
    ):
        result = runner.invoke(app, ["models", *args])
        assert result.exit_code == 0, result.output
    assert registry.alias(PRODUCTION).version == v1  # type: ignore[union-attr]

    # Each decision, found as the UI's run filters find it, with its logs.
    drop = the_run(instance, "monitoring_job", **{"recsys/event": "ctr_drop"})
    assert "CTR drop, retraining launched" in logged(instance, drop)
    canary = the_run(instance, "canary_job", **{"recsys/model_version": v2})
    assert "canary_started: " in logged(instance, canary)
    failure = the_run(instance, "alert_job", **{"recsys/failed_run_id": failed.run_id})
    assert "training window is empty" in logged(instance, failure)
    (promotion,) = instance.get_runs(
        dg.RunsFilter(job_name="model_alias_job", tags={"recsys/move": "promote"})
    )
    assert f"Model {v2} promoted to production by hand" in logged(instance, promotion)
    rollbacks = instance.get_runs(
        dg.RunsFilter(job_name="model_alias_job", tags={"recsys/move": "rollback"})
    )
    texts = [logged(instance, run) for run in rollbacks]
    assert any(f"Candidate {v2} rolled back by hand" in t for t in texts)
    assert any(f"Production rolled back to {v1} by hand" in t for t in texts)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in [promotion, *rollbacks])
    # And production_model's history holds every change of which model serves.
    history = instance.fetch_materializations(dg.AssetKey("production_model"), limit=10).records
    actions = [
        r.asset_materialization.metadata["action"].value  # type: ignore[union-attr]
        for r in history
    ]
    assert actions == ["manual_rollback", "manual_promote", "manual_rollback", "canary_started"]
