"""Turn newly sealed landing files into weblogs runs.

The cursor follows seal times (the first part of every landing file name) with a
grace window: files sealed up to ``GRACE_SECONDS`` before the newest one seen are
remembered by name, so a slow writer's rename is never skipped and no file causes
two runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import dagster as dg
import orjson

from recsys_assets.resources import LakeResource
from recsys_serving.landing import LandingFile, list_sealed, recover_orphans
from recsys_serving.layout import LANDING_AREA

GRACE_SECONDS = 600
# Dagster's documented run tags for a run over a range of partitions.
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

WEBLOGS_JOB = "weblogs_job"


def build_weblogs_job(weblogs: dg.AssetsDefinition) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        WEBLOGS_JOB,
        selection=dg.AssetSelection.assets(weblogs),
        partitions_def=weblogs.partitions_def,
        tags={"recsys/pipeline": "weblogs"},
        description="Process landed events into weblogs partitions (one run for a range).",
    )


@dataclass
class LandingCursor:
    watermark_ns: int = 0
    recent: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, raw: str | None) -> LandingCursor:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(int(data["watermark_ns"]), set(data["recent"]))

    def dump(self) -> str:
        return orjson.dumps(
            {"watermark_ns": self.watermark_ns, "recent": sorted(self.recent)}
        ).decode()

    def new_files(self, files: list[LandingFile]) -> list[LandingFile]:
        floor = self.watermark_ns - GRACE_SECONDS * 1_000_000_000
        return [f for f in files if f.seal_ns > floor and f.key not in self.recent]

    def advance(self, files: list[LandingFile]) -> None:
        if files:
            self.watermark_ns = max(self.watermark_ns, max(f.seal_ns for f in files))
        floor = self.watermark_ns - GRACE_SECONDS * 1_000_000_000
        self.recent = {f.key for f in files if f.seal_ns > floor} | {
            k for k in self.recent if _seal_ns(k) > floor
        }


def _seal_ns(key: str) -> int:
    return int(key.rsplit("/", 1)[-1].split("-", 1)[0])


def run_request_for(days: list[str], files: list[LandingFile]) -> dg.RunRequest:
    """One run for the whole range of touched dates; the run key names the files."""
    digest = hashlib.sha256("\n".join(sorted(f.key for f in files)).encode()).hexdigest()[:16]
    start, end = min(days), max(days)
    tags = {"recsys/trigger": "landing_files", "recsys/landing_files": str(len(files))}
    if start == end:
        return dg.RunRequest(run_key=f"landing-{digest}", partition_key=start, tags=tags)
    tags |= {PARTITION_RANGE_START_TAG: start, PARTITION_RANGE_END_TAG: end}
    return dg.RunRequest(run_key=f"landing-{digest}", tags=tags)


def build_landing_files_sensor(
    job: dg.UnresolvedAssetJobDefinition, partitions: dg.PartitionsDefinition
) -> dg.SensorDefinition:
    """The landing sensor, launching ``job`` for the dates within ``partitions``."""

    @dg.sensor(
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Launches a weblogs run for the dates of newly sealed landing files.",
    )
    def landing_files_sensor(
        context: dg.SensorEvaluationContext, lake: LakeResource
    ) -> dg.SensorResult:
        store = lake.get()
        recovered = recover_orphans(store, LANDING_AREA)
        if recovered:
            context.log.warning(f"sealed {len(recovered)} orphaned landing segments")
        cursor = LandingCursor.parse(context.cursor)
        files = list_sealed(store, LANDING_AREA)
        new = cursor.new_files(files)
        valid_keys = set(partitions.get_partition_keys())
        days = sorted({f.date for f in new if f.date in valid_keys})
        skipped = sorted({f.date for f in new} - set(days))
        if skipped:
            context.log.warning(f"landing files for dates outside the partitions: {skipped[:10]}")
        cursor.advance(files)
        if not days:
            return dg.SensorResult(skip_reason="no new landing files", cursor=cursor.dump())
        return dg.SensorResult(run_requests=[run_request_for(days, new)], cursor=cursor.dump())

    return landing_files_sensor
