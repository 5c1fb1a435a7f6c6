"""Business rules of the weblogs partition: coercion, dedup, bots, time, sessions, atomicity."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest

from recsys_assets.weblogs import processing
from recsys_assets.weblogs.processing import (
    EventIdCounts,
    Rules,
    process_partition,
    process_partitions,
)
from recsys_serving.lake import LocalLake, read_parquet
from recsys_serving.landing import SegmentWriter
from recsys_serving.layout import LANDING_AREA, weblogs_key, weblogs_quarantine_key
from support import land

DAY = "2026-11-20"
T0 = datetime(2026, 11, 20, 12, tzinfo=UTC).timestamp()
RULES = Rules(
    catalog_epoch=date(2020, 1, 1),
    now=datetime(2026, 11, 25, tzinfo=UTC),
    bot_max_events_per_minute=50,
    session_gap_minutes=30,
)


def ev(i: int, ts: float, user: str = "u1", **extra: object) -> dict[str, object]:
    return {
        "event_id": f"e{i}",
        "event_type": "view",
        "user_id": user,
        "item_id": "i1",
        "ts": ts,
        **extra,
    }


def write_landing(lake: LocalLake, day: str, lines: list[bytes]) -> None:
    """What an external agent (or a hand-copied file) could leave in landing."""
    w = SegmentWriter(lake, LANDING_AREA, writer_id="agent")
    w.append({day: b"".join(line + b"\n" for line in lines)})
    w.close()


def test_clean_partition_round_trip(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    land(lake, [ev(i, T0 + i, session_id="s1", context={"d": "ios"}) for i in range(10)])
    result = process_partition(lake, DAY, RULES)
    assert (result.landing_rows, result.rows, result.quarantined) == (10, 10, 0)
    df = read_parquet(lake, weblogs_key(DAY))
    assert df.schema["ts"] == pl.Datetime("us", "UTC")
    assert df["event_id"].to_list() == [f"e{i}" for i in range(10)]
    assert json.loads(df["context"][0]) == {"d": "ios"}


def test_duplicates_keep_the_first_landed_copy(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    land(lake, [ev(1, T0, item_id="first"), ev(2, T0)])
    land(lake, [ev(1, T0 + 5, item_id="second")])  # resent by another writer later
    result = process_partition(lake, DAY, RULES)
    df = read_parquet(lake, weblogs_key(DAY))
    assert df.filter(pl.col("event_id") == "e1")["item_id"].to_list() == ["first"]
    assert result.reasons == {"duplicate_event_id": 1}
    q = read_parquet(lake, weblogs_quarantine_key(DAY))
    assert q["item_id"].to_list() == ["second"]


def test_bots_by_implausible_action_rate_are_quarantined_whole_day(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    bot = [ev(i, T0 + i * 0.5, user="bot", event_type="click") for i in range(80)]  # 80 in 40 s
    # The rest of the bot's day goes too, whatever the type and however slow.
    bot += [ev(200 + i, T0 + 3_600 + i * 60, user="bot") for i in range(5)]
    bot += [ev(300, T0 + 7_200, user="bot", event_type="impression", request_id="r1")]
    bot += [ev(301, T0 + 7_300, user="bot", event_type="rating", value=4.0)]
    human = [ev(1000 + i, T0 + i * 30, user="human") for i in range(40)]
    land(lake, bot + human)
    result = process_partition(lake, DAY, RULES)
    assert result.reasons == {"bot_rate": 87}
    assert (result.rows, result.quarantined) == (40, 87)
    q = read_parquet(lake, weblogs_quarantine_key(DAY))
    assert set(q["user_id"]) == {"bot"} and set(q["reason"]) == {"bot_rate"}
    assert set(q["detail"]) == {
        "80 actions (click, view, add_to_cart, purchase) in the minute from "
        "2026-11-20T12:00Z; limit 50"
    }
    assert set(read_parquet(lake, weblogs_key(DAY))["user_id"]) == {"human"}


def test_bulk_ratings_and_server_logged_impressions_are_not_bot_traffic(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    # A MovieLens-style sign-up: 300 ratings submitted in the same second.
    rater = [
        ev(i, T0, user="rater", event_type="rating", item_id=f"i{i}", value=float(i % 5 + 1))
        for i in range(300)
    ]
    # A fast but human browser: 30 recommendation pages (10 impressions each) in a minute,
    # with 45 views and clicks, under the limit of 50 actions.
    browser = [
        ev(
            1000 + i,
            T0 + 120 + i * 0.2,
            user="browser",
            event_type="impression",
            request_id=f"r{i // 10}",
            position=i % 10,
        )
        for i in range(300)
    ]
    browser += [
        ev(2000 + i, T0 + 121 + i, user="browser", event_type="click" if i % 3 else "view")
        for i in range(45)
    ]
    land(lake, rater + browser)
    result = process_partition(lake, DAY, RULES)
    assert (result.rows, result.quarantined, result.reasons) == (645, 0, {})


def test_the_action_limit_is_per_minute_and_strict(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    # Exactly the limit (50) in one minute is allowed; 60 spread over two minutes too.
    at_limit = [ev(i, T0 + i, user="at_limit", event_type="add_to_cart") for i in range(50)]
    spread = [ev(100 + i, T0 + 30 + i, user="spread", event_type="purchase") for i in range(60)]
    over = [ev(200 + i, T0 + i, user="over", event_type="view") for i in range(51)]
    land(lake, at_limit + spread + over)
    result = process_partition(lake, DAY, RULES)
    assert result.reasons == {"bot_rate": 51}
    users = set(read_parquet(lake, weblogs_key(DAY))["user_id"])
    assert users == {"at_limit", "spread"}


def test_timestamps_in_future_before_epoch_or_outside_partition(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    future = datetime(2026, 12, 31, tzinfo=UTC).timestamp()
    write_landing(
        lake,
        DAY,
        [
            b'{"event_id":"ok","event_type":"view","user_id":"u","item_id":"i","ts":%d}' % T0,
            b'{"event_id":"f","event_type":"view","user_id":"u","item_id":"i","ts":%d}' % future,
            b'{"event_id":"old","event_type":"view","user_id":"u","item_id":"i","ts":1000}',
            b'{"event_id":"o","event_type":"view","user_id":"u","item_id":"i","ts":%d}'
            % (T0 + 86_400),
            b'{"event_id":"t","event_type":"teleport","user_id":"u","item_id":"i","ts":%d}' % T0,
            b'{"event_id":"m","event_type":"view","item_id":"i","ts":%d}' % T0,
            b'{"event_id": "cut',
        ],
    )
    result = process_partition(lake, DAY, RULES)
    assert result.rows == 1
    assert result.reasons == {
        "before_catalog_epoch": 1,
        "corrupt_landing_line": 1,
        "future_timestamp": 1,
        "missing_required": 1,
        "outside_partition": 1,
        "unknown_event_type": 1,
    }
    assert result.landing_rows == result.rows + result.quarantined == 7


def test_sessions_are_inferred_only_where_missing_and_deterministically(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    events = [ev(1, T0), ev(2, T0 + 60), ev(3, T0 + 60 * 45), ev(4, T0 + 10, session_id="given")]
    events += [ev(5, T0 + 5, user="u2")]
    land(lake, events)
    process_partition(lake, DAY, RULES)
    df = read_parquet(lake, weblogs_key(DAY)).sort("event_id")
    sessions = dict(zip(df["event_id"], df["session_id"], strict=True))
    assert sessions["e1"] == sessions["e2"] != sessions["e3"]
    assert sessions["e4"] == "given"
    assert sessions["e5"].startswith("auto:u2:")
    assert df.filter(pl.col("event_id") == "e4")["session_inferred"].to_list() == [False]
    assert df["session_inferred"].sum() == 4


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    land(lake, [ev(i, T0 + i * 100, user=f"u{i % 3}") for i in range(50)])
    process_partition(lake, DAY, RULES)
    first = read_parquet(lake, weblogs_key(DAY))
    process_partition(lake, DAY, RULES)
    assert read_parquet(lake, weblogs_key(DAY)).equals(first)


def test_failed_write_leaves_previous_partition_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = LocalLake(tmp_path)
    land(lake, [ev(1, T0)])
    process_partition(lake, DAY, RULES)
    before = (tmp_path / weblogs_key(DAY)).read_bytes()
    land(lake, [ev(2, T0)])

    def broken(self: pl.DataFrame, file: object, **kw: object) -> None:
        Path(str(file)).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        process_partition(lake, DAY, RULES)
    monkeypatch.undo()
    assert (tmp_path / weblogs_key(DAY)).read_bytes() == before
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_partitions_are_handed_over_once_in_order_with_their_id_counts(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    days = ["2026-11-18", "2026-11-19", "2026-11-20"]
    for k, day in enumerate(days):
        t = datetime.fromisoformat(day).replace(hour=1, tzinfo=UTC).timestamp()
        land(lake, [ev(k * 100 + i, t + i, user=f"u{i}") for i in range(30)])
    land(lake, [ev(100, datetime(2026, 11, 19, 2, tzinfo=UTC).timestamp())])  # a resend
    seen: list[tuple[str, int, EventIdCounts]] = []
    written: list[str] = []
    run = process_partitions(
        lake,
        days,
        RULES,
        on_frames=lambda day, events, ids: seen.append((day, events.height, ids)),
        on_partition=lambda result: written.append(result.partition),
    )
    assert run.rows == 90 and run.quarantined == 1
    assert seen == [
        (days[0], 30, EventIdCounts(landed=30, distinct=30)),
        # The resend has another ts, so it is a different event under a reused id.
        (days[1], 30, EventIdCounts(landed=31, distinct=30, conflicting=1)),
        (days[2], 30, EventIdCounts(landed=30, distinct=30)),
    ]
    assert written == days
    assert [p.partition for p in run.partitions] == days


def test_a_failing_partition_stops_the_run_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = LocalLake(tmp_path)
    days = ["2026-11-18", "2026-11-19", "2026-11-20"]
    for day in days:
        t = datetime.fromisoformat(day).replace(hour=1, tzinfo=UTC).timestamp()
        land(lake, [ev(int(t) + i, t + i) for i in range(5)])
    real = processing.apply_rules

    def lose_a_row(landed: pl.DataFrame, day: date, rules: Rules, **kw: object):  # type: ignore[no-untyped-def]
        clean, quarantined = real(landed, day, rules, **kw)  # type: ignore[arg-type]
        return (clean.head(4), quarantined) if day.isoformat() == days[1] else (clean, quarantined)

    monkeypatch.setattr(processing, "apply_rules", lose_a_row)
    with pytest.raises(RuntimeError, match="accounting broken for 2026-11-19: 5 landed != 4"):
        process_partitions(lake, days, RULES)
    assert lake.exists(weblogs_key(days[0]))
    assert not lake.exists(weblogs_key(days[1])) and not lake.exists(
        weblogs_quarantine_key(days[1])
    )
    assert not lake.exists(weblogs_key(days[2]))


def test_bad_lines_keep_their_exact_file_line_and_bytes(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    good = b'{"event_id":"e%d","event_type":"view","user_id":"u","item_id":"i","ts":%d}'
    write_landing(
        lake,
        DAY,
        [
            good % (1, T0),
            b"",  # a blank line still counts: polars would skip it and shift every line
            b'{"event_id":"e2","event_type":"view","user_id":"u","item_id":"i","ts":"soon"}',
            good % (3, T0 + 1),
            b'\xff{"event_id":"e4"}',
        ],
    )
    result = process_partition(lake, DAY, RULES)
    assert (result.landing_rows, result.rows, result.quarantined) == (4, 2, 2)
    q = read_parquet(lake, weblogs_quarantine_key(DAY)).sort("landing_line")
    assert q["landing_line"].to_list() == [3, 5]
    assert set(q["reason"]) == {"corrupt_landing_line"}
    assert q["landing_file"][0].startswith("landing/date=2026-11-20/")
    assert (
        q["context"][0]
        == '{"event_id":"e2","event_type":"view","user_id":"u","item_id":"i","ts":"soon"}'
    )
    assert q["context"][1] == '\\xff{"event_id":"e4"}'
    assert read_parquet(lake, weblogs_key(DAY))["event_id"].to_list() == ["e1", "e3"]


def test_rows_are_ordered_by_time_then_id_whatever_the_landing_order(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    land(lake, [ev(3, T0 + 5), ev(1, T0 + 5), ev(2, T0)])
    land(lake, [ev(0, T0 + 1)])
    process_partition(lake, DAY, RULES)
    df = read_parquet(lake, weblogs_key(DAY))
    assert df["event_id"].to_list() == ["e2", "e0", "e1", "e3"]
