"""The recsys code location: every asset, check, job, sensor and resource in one place."""

from __future__ import annotations

import dagster as dg

from recsys_assets.alerts.notifier import NotifierResource
from recsys_assets.attributes import with_attributes
from recsys_assets.catalog.assets import item_catalog, user_profiles
from recsys_assets.catalog.resources import DocStoreResource
from recsys_assets.monitoring.defs import closed_loop
from recsys_assets.packaging.assets import promoted_image, publish_job
from recsys_assets.packaging.resource import OciResource
from recsys_assets.resources import LakeResource, RecsysConfig
from recsys_assets.tracking.resource import MlflowResource
from recsys_assets.training.assets import TRAINING_ASSETS
from recsys_assets.training.jobs import retrain_job
from recsys_assets.training.resources import TrainingConfig
from recsys_assets.weblogs.defs import weblogs_defs
from recsys_assets.weblogs.freshness import weblog_freshness_sensor
from recsys_serving.logging import configure_logging
from recsys_serving.settings import Settings, get_settings


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "lake": LakeResource.from_settings(settings),
        "recsys_config": RecsysConfig.from_settings(settings),
        "notifier": NotifierResource.from_settings(settings),
        "oci": OciResource.from_settings(settings),
        "docstore": DocStoreResource.from_settings(settings),
        "training": TrainingConfig.from_settings(settings),
        "mlflow": MlflowResource.from_settings(settings),
        **closed_loop(settings).resources,
    }


def make_definitions(settings: Settings) -> dg.Definitions:
    """The code location for one configuration (tests and the CLI pass their own)."""
    loop = closed_loop(settings)
    acquisition = weblogs_defs(settings)
    return dg.Definitions(
        assets=with_attributes(
            [
                acquisition.landing_weblogs,
                acquisition.weblogs,
                item_catalog,
                user_profiles,
                *TRAINING_ASSETS,
                promoted_image,
                *loop.assets,
            ]
        ),
        jobs=[acquisition.job, retrain_job, publish_job, *loop.jobs],
        sensors=[acquisition.landing_files_sensor, weblog_freshness_sensor, *loop.sensors],
        schedules=loop.schedules,
        resources=build_resources(settings),
    )


# Code servers, run and step workers import this module: their structlog lines go through
# the standard library, where Dagster captures the loggers dagster.yaml manages.
configure_logging()
defs = make_definitions(get_settings())
