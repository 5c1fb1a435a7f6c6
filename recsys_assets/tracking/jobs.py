"""The MLflow catch-up as a run: ``promotion_sensor`` requests it whenever the registry's
aliases moved (whoever moved them: a ``canary_job`` run, the CLI, the admin API), so the
mirror's work and its failures show in a run's log in the UI, not in a sensor tick."""

import dagster as dg

from recsys_assets.resources import LakeResource
from recsys_assets.tracking.mirror import mirror_registry
from recsys_assets.tracking.resource import MlflowResource
from recsys_serving.registry import ModelRegistry

# A long registry is mirrored in batches (``MlflowMirror.sync``); one run takes them all.
MAX_BATCHES = 1_000


@dg.op(
    description=(
        "Mirrors the lake registry's versions and aliases into MLflow; the lake stays the "
        "source of truth. Fails (and promotion_sensor asks again later) when MLflow cannot "
        "be reached; retrainings and alias moves never wait for it."
    )
)
def sync_mlflow(context: dg.OpExecutionContext, lake: LakeResource, mlflow: MlflowResource) -> None:
    registry = ModelRegistry(lake.get())
    mirror = mlflow.mirror()
    for _ in range(MAX_BATCHES):
        outcome = mirror_registry(mirror, registry)
        if outcome["mlflow"] == "off":
            context.log.info("MLflow is switched off (RECSYS_MLFLOW_TRACKING_URI=off)")
            return
        if outcome["mlflow"] != "ok":
            raise dg.Failure(
                description=f"MLflow not updated: {outcome['error']}",
                metadata={"tracking_uri": mlflow.tracking_uri},
            )
        report = outcome["report"]
        context.log.info(f"MLflow mirror: {report.summary()}")
        if report.complete:
            return
    raise dg.Failure(description=f"MLflow mirror not complete after {MAX_BATCHES} batches")


@dg.job(
    name="mlflow_sync_job",
    tags={"recsys/pipeline": "mlflow"},
    description="Brings MLflow's registered model `recsys` up to date with the lake registry.",
)
def mlflow_sync_job() -> None:
    sync_mlflow()
