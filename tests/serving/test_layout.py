"""The lake layout: keys spelled exactly as lakes already written spell them, partition
keys parsed back, dates of timestamps, and the timestamp parsers clients are refused by."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from recsys_serving import layout
from recsys_serving.lake import LocalLake, atomic_file
from recsys_serving.landing import SegmentWriter, list_sealed


def test_keys_are_the_ones_existing_lakes_hold() -> None:
    assert layout.weblogs_key("2024-06-01") == "weblogs/date=2024-06-01/part-0.parquet"
    assert (
        layout.weblogs_quarantine_key("2024-06-01")
        == "quarantine/weblogs/date=2024-06-01/part-0.parquet"
    )
    assert layout.dated_key("monitoring/health", "2024-06-01", "x.json") == (
        "monitoring/health/date=2024-06-01/x.json"
    )
    assert (layout.PRODUCTION, layout.CANDIDATE) == ("production", "candidate")
    assert (layout.CATALOG_ITEMS_KEY, layout.CATALOG_USERS_KEY) == (
        "catalog/items.parquet",
        "catalog/users.parquet",
    )
    assert layout.RETRAIN_LOCK_KEY == "training/.retrain.lock"
    assert layout.MLFLOW_STATUS_KEY == "tracking/mlflow.json"


def test_partitions_are_parsed_back_from_keys(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    for day in ("2024-06-02", "2024-06-01"):
        lake.put_bytes(layout.weblogs_key(day), b"x")
    lake.put_bytes("weblogs/date=2024-06-03/.part-0.parquet.tmp", b"x")  # not a partition
    lake.put_bytes("weblogs/notes.txt", b"x")
    lake.put_bytes(layout.weblogs_quarantine_key("2024-06-09"), b"x")  # another area
    assert layout.partition_days(lake) == ["2024-06-01", "2024-06-02"]
    found = layout.partitions(lake, layout.WEBLOGS_QUARANTINE_AREA)
    assert list(found) == ["2024-06-09"]
    assert found["2024-06-09"].key == "quarantine/weblogs/date=2024-06-09/part-0.parquet"
    assert layout.date_of("landing/date=2024-06-01/0001-w.ndjson") == "2024-06-01"
    assert layout.date_of("registry/models/v1/manifest.json") is None
    assert layout.date_of_dir(layout.date_dir("2024-06-01")) == "2024-06-01"


def test_landing_segments_land_under_their_date(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    writer = SegmentWriter(lake, layout.LANDING_AREA, writer_id="w")
    writer.append({"2024-06-01": b"{}\n"})
    writer.close()
    (sealed,) = list_sealed(lake, date="2024-06-01")
    assert sealed.key.startswith("landing/date=2024-06-01/") and sealed.date == "2024-06-01"


@pytest.mark.parametrize(
    "ts",
    [0.0, 1_717_199_999.999_999, 1_717_200_000.0, 1_717_286_399.999_995, 1e9 + 0.5],
)
def test_utc_date_is_the_date_of_the_timestamp(ts: float) -> None:
    assert layout.utc_date(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
    assert layout.utc_datetime(ts) == datetime.fromtimestamp(ts, UTC)


def test_day_start_is_midnight_utc() -> None:
    assert layout.day_start("2024-06-01") == datetime(2024, 6, 1, tzinfo=UTC)


def test_rfc3339_needs_an_offset() -> None:
    assert layout.parse_rfc3339(" 2024-06-01T10:00:00Z ") == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert layout.parse_rfc3339("2024-06-01", date_only=True) == datetime(2024, 6, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="must carry an offset"):
        layout.parse_rfc3339("2024-06-01T10:00:00")
    with pytest.raises(ValueError, match=r"not an RFC 3339 timestamp: '2024-13-01'"):
        layout.parse_rfc3339("2024-13-01", date_only=True)


def test_parse_utc_is_lenient_with_records() -> None:
    assert layout.parse_utc("2024-06-01T10:00:00") == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert layout.parse_utc("2024-06-01T12:00:00+02:00") == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert layout.parse_utc("yesterday") is None
    assert layout.parse_utc(None) is None


def test_atomic_file_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with atomic_file(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
