"""The GX worker started ahead of a large run (``prestart_worker``): the run that takes
it validates exactly as with a worker of its own, and one no run takes is stopped."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.weblogs import quality
from recsys_assets.weblogs.processing import Rules, process_partitions
from recsys_assets.weblogs.quality import (
    Thresholds,
    WeblogValidator,
    discard_prestarted_worker,
    prestart_worker,
    take_prestarted_worker,
)
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings
from support import land

DAYS = ["2026-11-18", "2026-11-19"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, catalog_epoch="2020-01-01")


@pytest.fixture(autouse=True)
def no_leftover() -> Iterator[None]:
    discard_prestarted_worker()
    yield
    discard_prestarted_worker()


def _events(day: str, n: int) -> list[dict[str, object]]:
    t = datetime.fromisoformat(day).replace(hour=6, tzinfo=UTC).timestamp()
    return [
        {
            "event_id": f"e{day}-{i}",
            "event_type": "click" if i % 5 == 0 else "impression",
            "user_id": f"u{i % 7}",
            "item_id": f"i{i % 11}",
            "ts": t + i,
            "request_id": f"r{i // 5}",
        }
        for i in range(n)
    ]


def _outcomes(validator: WeblogValidator, lake: LocalLake, settings: Settings) -> dict:
    rules = Rules(catalog_epoch=settings.events.catalog_epoch, now=datetime.now(UTC))
    process_partitions(lake, DAYS, rules, on_frames=validator.add_partition)
    return {
        name: (o.passed, o.batches, o.failed_partitions, o.observed)
        for name, o in validator.finish().items()
    }


def test_a_prestarted_worker_gives_the_same_outcomes(settings: Settings) -> None:
    lake = LocalLake(settings.resolved_lake_uri)
    for day in DAYS:
        land(lake, _events(day, 30))
    # 10 ids of the second day landed again as different events: one check fails.
    land(lake, [{**e, "user_id": "someone else"} for e in _events(DAYS[1], 30)[:10]])

    own = WeblogValidator(max_duplicate_rate=0.2, batch_rows=20, min_rows=10)
    expected = _outcomes(own, lake, settings)
    assert own.worker == "process" and not own.prestarted

    # Warmed for other thresholds: the run's own thresholds still decide.
    prestart_worker(Thresholds(max_duplicate_rate=0.9))
    taken = WeblogValidator(max_duplicate_rate=0.2, batch_rows=20, min_rows=10)
    assert _outcomes(taken, lake, settings) == expected
    assert taken.worker == "process" and taken.prestarted
    assert take_prestarted_worker() is None  # taken once, by that run
    assert not expected["conflicting_duplicate_rate_below_threshold"][0]


def test_a_small_run_leaves_it_and_discarding_stops_it(settings: Settings) -> None:
    lake = LocalLake(settings.resolved_lake_uri)
    land(lake, _events(DAYS[0], 30))
    prestart_worker(Thresholds())
    small = WeblogValidator(max_duplicate_rate=0.2)
    outcomes = _outcomes(small, lake, settings)
    assert small.worker == "thread" and not small.prestarted
    assert all(passed for passed, *_ in outcomes.values())
    prestarted = quality._PRESTARTED
    assert prestarted is not None
    discard_prestarted_worker()
    assert take_prestarted_worker() is None
    with pytest.raises(RuntimeError):  # shut down: takes no more work
        prestarted.pool.submit(int)


@pytest.mark.slow
def test_the_cli_prestarts_only_for_a_large_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    calls: list[Thresholds] = []
    monkeypatch.setattr(quality, "prestart_worker", calls.append)
    f = tmp_path / "logs.ndjson"
    f.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in _events(DAYS[0], 40)))
    result = CliRunner().invoke(app, ["ingest", str(f)])
    assert result.exit_code == 0, result.output
    assert "checks 6/6 passed" in result.output
    assert calls == []  # 40 rows: the run validates on a thread, nothing to start
    monkeypatch.setattr(quality, "BATCH_ROWS", 40)
    result = CliRunner().invoke(app, ["process"])
    assert result.exit_code == 0, result.output
    assert "checks 6/6 passed" in result.output
    settings = Settings()
    assert calls == [
        Thresholds(
            settings.events.max_duplicate_rate,
            settings.events.max_unattributed_click_rate,
            settings.events.min_rows_for_rate_checks,
        )
    ]
