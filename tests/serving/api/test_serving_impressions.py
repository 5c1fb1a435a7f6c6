"""Impression group commit: durable before the answer, grouped under load, contract-valid."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys_serving.api.impressions import ImpressionLog, Shown, _day, impression_events
from recsys_serving.api.metrics import ServiceMetrics, parse_metrics
from recsys_serving.events.schema import WeblogEvent, normalize
from recsys_serving.lake import LocalLake, open_lake
from recsys_serving.settings import Settings
from support import S3Server, moto_s3, ndjson_lines  # noqa: F401  (fixture)


def _events(n: int, request: int) -> list[dict[str, object]]:
    return impression_events(
        f"req{request}",
        f"user {request}",
        [Shown(f"item-{i}", i) for i in range(n)],
        "v20260101000000-0123abcd",
        "champion",
    )


def test_impression_lines_obey_the_weblog_contract() -> None:
    for event in _events(3, 1):
        assert normalize(WeblogEvent.model_validate(event)) == event
    assert [e["position"] for e in _events(3, 1)] == [0, 1, 2]
    assert {e["event_id"] for e in _events(3, 1)} == {"req1-0", "req1-1", "req1-2"}


@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
def test_the_date_partition_is_the_utc_date_of_the_timestamp(ts: float) -> None:
    # Computed once per answer and cached per hour, not formatted per event.
    assert _day(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def test_concurrent_requests_share_fsyncs_and_every_event_lands(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    metrics = ServiceMetrics()
    log = ImpressionLog(lake, Settings(home=tmp_path), metrics)
    open_dir = lake.root / "landing" / "_open"

    async def one(request: int) -> None:
        assert await log.log(_events(10, request))
        # Durable when log() returns: the lines are in an fsynced open segment already.
        data = b"".join(p.read_bytes() for p in open_dir.rglob("*.ndjson"))
        assert f'"req{request}-9"'.encode() in data

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(main())
    log.close()
    rows = ndjson_lines(lake, "landing/")
    assert len(rows) == 2000
    assert len({r["event_id"] for r in rows}) == 2000
    assert log.events == 2000
    assert log.groups < 200  # grouped: far fewer fsyncs than requests
    samples = parse_metrics(metrics.render().decode())
    assert samples["recsys_events_accepted_total"] == [({"source": "impressions"}, 2000.0)]
    assert samples["recsys_impressions_total"] == [
        ({"model_version": "v20260101000000-0123abcd"}, 2000.0)
    ]


def test_a_failed_write_is_counted_and_does_not_hang(tmp_path: Path) -> None:
    class BrokenLanding:
        def append(self, by_date: dict[str, bytes]) -> None:
            raise OSError(28, "No space left on device")

    metrics = ServiceMetrics()
    log = ImpressionLog(LocalLake(tmp_path / "lake"), Settings(home=tmp_path), metrics)
    log.writer = BrokenLanding()  # type: ignore[assignment]
    started = time.monotonic()
    assert asyncio.run(log.log(_events(4, 1))) is False
    assert time.monotonic() - started < 5
    samples = parse_metrics(metrics.render().decode())
    assert samples["recsys_events_rejected_total"] == [({"reason": "write_failed"}, 4.0)]


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    log = ImpressionLog(lake, Settings(home=tmp_path), ServiceMetrics())

    async def main() -> None:
        await log.log(_events(5, 7))

    asyncio.run(main())
    log.close()
    assert len(ndjson_lines(lake, "landing/")) == 5
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(log.log(_events(1, 8)))


def test_on_s3_a_group_is_one_put(moto_s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    lake = open_lake(
        f"s3://{moto_s3.bucket}/imp-{uuid.uuid4().hex[:8]}", endpoint_url=moto_s3.endpoint_url
    )
    log = ImpressionLog(lake, Settings(home=tmp_path), ServiceMetrics())

    async def main() -> None:
        results = await asyncio.gather(*(log.log(_events(10, i)) for i in range(30)))
        assert all(results)

    asyncio.run(main())
    log.close()
    assert len(ndjson_lines(lake, "landing/")) == 300
    puts = [o for o in lake.list("landing/") if o.key.endswith(".ndjson")]
    assert len(puts) == log.groups < 30


def test_without_sync_answers_do_not_wait_but_nothing_is_lost_on_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsys_serving.api.impressions as impressions

    lake = LocalLake(tmp_path / "lake")
    log = ImpressionLog(lake, Settings(home=tmp_path, impression_sync=False), ServiceMetrics())
    real_append = log.writer.append

    def slow_append(by_date: dict[str, bytes]) -> None:
        time.sleep(1.0)  # a disk that has fallen far behind
        real_append(by_date)

    log.writer.append = slow_append  # type: ignore[method-assign]
    monkeypatch.setattr(impressions, "MAX_PENDING_EVENTS", 50)

    async def main() -> list[float]:
        waits = []
        for i in range(8):
            started = time.perf_counter()
            assert await log.log(_events(10, i))
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(0)  # let the loop start the commit
        return waits

    waits = asyncio.run(main())
    # The first answers leave at once; once more than 50 events queue behind the slow
    # disk, an answer waits for the commit (back-pressure, not an unbounded queue).
    # (Bounds far from the 1 s commit, so a busy machine cannot blur them.)
    assert max(waits[:5]) < 0.25
    assert max(waits) >= 0.5
    log.close()
    assert len(ndjson_lines(lake, "landing/")) == 80
