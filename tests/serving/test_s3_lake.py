"""The lake on S3: a real S3-compatible endpoint (moto_server) over HTTP on loopback."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from recsys_assets.weblogs.processing import Rules, process_partition
from recsys_serving.api.app import create_app
from recsys_serving.lake import S3Lake, open_lake, read_parquet, write_parquet
from recsys_serving.landing import list_sealed
from recsys_serving.layout import weblogs_key
from recsys_serving.settings import Settings
from support import S3Server, land, moto_s3  # noqa: F401  (fixture)


@pytest.fixture
def s3_lake(moto_s3: S3Server) -> S3Lake:  # noqa: F811
    lake = open_lake(
        f"s3://{moto_s3.bucket}/t-{uuid.uuid4().hex[:8]}", endpoint_url=moto_s3.endpoint_url
    )
    assert isinstance(lake, S3Lake)
    return lake


def test_objects_round_trip(s3_lake: S3Lake) -> None:
    s3_lake.put_bytes("a/b/c.txt", b"hello")
    assert s3_lake.get_bytes("a/b/c.txt") == b"hello"
    assert s3_lake.exists("a/b/c.txt") and not s3_lake.exists("a/b/missing")
    assert [o.key for o in s3_lake.list("a/")] == ["a/b/c.txt"]
    df = pl.DataFrame({"x": [1, 2, 3]})
    write_parquet(s3_lake, "p/part-0.parquet", df)
    assert read_parquet(s3_lake, "p/part-0.parquet").equals(df)
    s3_lake.delete("a/")
    assert list(s3_lake.list("a/")) == []


def test_intake_lands_one_object_per_flush_and_weblogs_process_on_s3(s3_lake: S3Lake) -> None:
    t = datetime(2026, 11, 20, 9, tzinfo=UTC).timestamp()
    events = [
        {"event_id": f"e{i}", "event_type": "view", "user_id": "u", "item_id": "i", "ts": t + i}
        for i in range(25)
    ]
    land(s3_lake, events[:10])
    land(s3_lake, events[5:])  # 5 duplicates from a retry
    files = list_sealed(s3_lake)
    assert len(files) == 2 and {f.date for f in files} == {"2026-11-20"}
    rules = Rules(catalog_epoch=date(2020, 1, 1), now=datetime(2026, 11, 25, tzinfo=UTC))
    result = process_partition(s3_lake, "2026-11-20", rules)
    assert (result.landing_rows, result.rows, result.quarantined) == (30, 25, 5)
    assert read_parquet(s3_lake, weblogs_key("2026-11-20")).height == 25
    assert s3_lake.uri_for(weblogs_key("2026-11-20")).startswith("s3://recsys-lake/t-")


def test_collector_writes_to_s3(moto_s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    prefix = f"c-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        home=tmp_path,
        lake_uri=f"s3://{moto_s3.bucket}/{prefix}",
        s3_endpoint_url=moto_s3.endpoint_url,
    )
    with TestClient(create_app(settings, collector_only=True)) as client:
        now = time.time()
        r = client.post(
            "/events",
            json=[
                {"event_id": "a", "event_type": "click", "user_id": "u", "item_id": "i", "ts": now},
                {"event_id": "b"},
            ],
        )
        assert r.status_code == 202 and r.json()["accepted"] == 1
    keys = [
        o["Key"]
        for o in moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix=prefix)["Contents"]
    ]
    assert any("/landing/date=" in k for k in keys)
    assert any("/quarantine/intake/date=" in k for k in keys)
