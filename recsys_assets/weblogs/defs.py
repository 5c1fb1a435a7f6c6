"""Everything acquisition adds to the code location, built for one ``Settings``.

The weblogs partitions start at the catalog epoch, a setting: building them here from
the settings a code location is made from (not at import) keeps a test's or a
deployment's ``RECSYS_CATALOG_EPOCH`` from being frozen by whoever imported first.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from recsys_assets.weblogs.assets import build_weblogs, landing_weblogs, weblog_partitions
from recsys_assets.weblogs.sensors import build_landing_files_sensor, build_weblogs_job
from recsys_serving.settings import Settings


@dataclass(frozen=True)
class WeblogsDefs:
    partitions: dg.PartitionsDefinition
    landing_weblogs: dg.AssetSpec
    weblogs: dg.AssetsDefinition
    job: dg.UnresolvedAssetJobDefinition
    landing_files_sensor: dg.SensorDefinition


def weblogs_defs(settings: Settings) -> WeblogsDefs:
    partitions = weblog_partitions(settings)
    weblogs = build_weblogs(partitions)
    job = build_weblogs_job(weblogs)
    return WeblogsDefs(
        partitions=partitions,
        landing_weblogs=landing_weblogs,
        weblogs=weblogs,
        job=job,
        landing_files_sensor=build_landing_files_sensor(job, partitions),
    )
