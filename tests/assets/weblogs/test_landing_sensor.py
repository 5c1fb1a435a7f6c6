"""The landing sensor: every sealed file leads to exactly one run, none is skipped."""

from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.definitions import make_definitions
from recsys_assets.resources import LakeResource
from recsys_assets.weblogs.sensors import (
    GRACE_SECONDS,
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    LandingCursor,
)
from recsys_serving.lake import LocalLake
from recsys_serving.landing import SegmentWriter, list_sealed
from recsys_serving.settings import Settings


@pytest.fixture
def lake(tmp_path: Path) -> LocalLake:
    return LocalLake(tmp_path / "lake")


def seal(lake: LocalLake, day: str, name: str | None = None, seal_ns: int | None = None) -> None:
    if seal_ns is None:
        w = SegmentWriter(lake, "landing", writer_id=name)
        w.append({day: b'{"event_id":"x"}\n'})
        w.close()
    else:  # a file whose rename was slow: sealed "earlier" than ones already seen
        lake.put_bytes(f"landing/date={day}/{seal_ns:019d}-{name}-000001.ndjson", b"{}\n")


def tick(
    instance: dg.DagsterInstance, lake: LocalLake, cursor: str | None
) -> tuple[list[dg.RunRequest], str | None]:
    defs = make_definitions(Settings(lake_uri=lake.uri))
    ctx = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"lake": LakeResource(uri=lake.uri)},
        definitions=defs,
    )
    result = defs.resolve_sensor_def("landing_files_sensor").evaluate_tick(ctx)
    return list(result.run_requests or []), result.cursor


def test_new_files_become_one_run_for_their_dates(lake: LocalLake) -> None:
    with dg.instance_for_test() as instance:
        requests, cursor = tick(instance, lake, None)
        assert requests == []
        seal(lake, "2026-11-20")
        requests, cursor = tick(instance, lake, cursor)
        assert [r.partition_key for r in requests] == ["2026-11-20"]
        requests, cursor = tick(instance, lake, cursor)
        assert requests == []  # nothing processed twice

        seal(lake, "2026-11-01")
        seal(lake, "2026-11-03")
        requests, cursor = tick(instance, lake, cursor)
        assert len(requests) == 1
        assert requests[0].tags[PARTITION_RANGE_START_TAG] == "2026-11-01"
        assert requests[0].tags[PARTITION_RANGE_END_TAG] == "2026-11-03"
        assert requests[0].tags["recsys/landing_files"] == "2"


def test_a_late_rename_inside_the_grace_window_is_not_skipped(lake: LocalLake) -> None:
    with dg.instance_for_test() as instance:
        seal(lake, "2026-11-20")
        _, cursor = tick(instance, lake, None)
        newest = max(f.seal_ns for f in list_sealed(lake))
        seal(lake, "2026-11-19", name="slow", seal_ns=newest - 5_000_000_000)
        requests, cursor = tick(instance, lake, cursor)
        assert [r.partition_key for r in requests] == ["2026-11-19"]
        assert tick(instance, lake, cursor)[0] == []


def test_cursor_survives_a_daemon_restart(lake: LocalLake) -> None:
    seal(lake, "2026-11-20")
    with dg.instance_for_test() as first:
        requests, cursor = tick(first, lake, None)
        assert len(requests) == 1
    with dg.instance_for_test() as restarted:
        assert tick(restarted, lake, cursor)[0] == []
        seal(lake, "2026-11-21")
        assert [r.partition_key for r in tick(restarted, lake, cursor)[0]] == ["2026-11-21"]


def test_cursor_forgets_names_outside_the_grace_window() -> None:
    c = LandingCursor()
    old = f"landing/date=2026-11-01/{1:019d}-w-000001.ndjson"
    c.recent = {old}
    c.watermark_ns = (GRACE_SECONDS + 10) * 1_000_000_000
    c.advance([])
    assert c.recent == set()
    assert LandingCursor.parse(c.dump()) == c


def test_run_keys_deduplicate_identical_requests(lake: LocalLake) -> None:
    seal(lake, "2026-11-20")
    with dg.instance_for_test() as instance:
        a, _ = tick(instance, lake, None)
        b, _ = tick(instance, lake, None)  # a replayed tick sees the same files
        assert a[0].run_key == b[0].run_key


def test_sensor_is_wired_to_the_weblogs_job(tmp_path: Path) -> None:
    defs = make_definitions(Settings(home=tmp_path))
    sensor = defs.resolve_sensor_def("landing_files_sensor")
    assert sensor.job_name == "weblogs_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
