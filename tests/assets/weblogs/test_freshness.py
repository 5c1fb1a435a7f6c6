"""The weblog freshness alarm: its state machine, and the sensor over a real lake and SMTP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.alerts import NotifierResource
from recsys_assets.resources import LakeResource, RecsysConfig
from recsys_assets.weblogs import freshness
from recsys_assets.weblogs.freshness import (
    FreshnessState,
    evaluate_freshness,
    human_duration,
    last_arrival,
    undelivered,
    weblog_freshness_sensor,
)
from recsys_serving.lake import LocalLake
from recsys_serving.landing import SegmentWriter, list_sealed, parse_sealed_key

T0 = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
THRESHOLD = timedelta(minutes=15)
MIN = timedelta(minutes=1)


def step(
    state: FreshnessState, arrival: datetime | None, now: datetime
) -> tuple[FreshnessState, str | None]:
    """One tick, with the state round-tripped through the cursor as the daemon stores it."""
    new_state, alert = evaluate_freshness(state, arrival, now, THRESHOLD, lake_uri="/lake")
    restored = FreshnessState.from_cursor(new_state.to_cursor())
    assert restored == new_state
    return restored, alert.status if alert else None


def test_no_data_yet_is_unknown_and_silent() -> None:
    state, alert = evaluate_freshness(FreshnessState(), None, T0, THRESHOLD)
    assert state == FreshnessState(status="unknown")
    assert alert is None
    state, alert = evaluate_freshness(state, None, T0 + timedelta(days=3), THRESHOLD)
    assert (state.status, alert) == ("unknown", None)


def test_one_firing_per_outage_and_one_resolved_when_data_returns() -> None:
    state = FreshnessState()
    state, sent = step(state, T0, T0 + 5 * MIN)
    assert (state.status, sent) == ("fresh", None)
    state, sent = step(state, T0, T0 + 15 * MIN)  # exactly the threshold is still fresh
    assert (state.status, sent) == ("fresh", None)

    state, sent = step(state, T0, T0 + 16 * MIN)
    assert (state.status, state.alerted, sent) == ("stale", True, "firing")
    assert state.since == T0 + THRESHOLD
    for minutes in (17, 30, 120):
        state, sent = step(state, T0, T0 + minutes * MIN)
        assert (state.status, sent) == ("stale", None)
    assert state.since == T0 + THRESHOLD

    back = T0 + 130 * MIN
    state, sent = step(state, back, back + MIN)
    assert (state.status, state.alerted, sent) == ("fresh", False, "resolved")
    state, sent = step(state, back, back + 10 * MIN)
    assert (state.status, sent) == ("fresh", None)

    state, sent = step(state, back, back + 20 * MIN)  # a second outage pages again
    assert (state.status, sent) == ("stale", "firing")
    assert state.since == back + THRESHOLD


def test_alerts_carry_what_the_engineer_needs() -> None:
    stale, firing = evaluate_freshness(
        FreshnessState(status="fresh", since=T0, last_arrival=T0),
        T0,
        T0 + 20 * MIN,
        THRESHOLD,
        lake_uri="s3://lake/prod",
    )
    assert firing is not None
    assert (firing.key, firing.status, firing.severity) == (
        "weblogs_freshness",
        "firing",
        "critical",
    )
    assert firing.title == "Weblogs stopped arriving"
    assert "20m" in firing.summary and "15m" in firing.summary
    assert firing.details == {
        "last_arrival": "2024-05-06T12:00:00+00:00",
        "age": "20m",
        "age_seconds": 1200.0,
        "threshold_minutes": 15.0,
        "stale_since": "2024-05-06T12:15:00+00:00",
        "checked_at": "2024-05-06T12:20:00+00:00",
        "lake_uri": "s3://lake/prod",
    }
    assert firing.at == T0 + 20 * MIN

    _, resolved = evaluate_freshness(
        stale, T0 + 62 * MIN, T0 + 63 * MIN, THRESHOLD, lake_uri="s3://lake/prod"
    )
    assert resolved is not None
    assert (resolved.status, resolved.severity) == ("resolved", "info")
    assert resolved.details["previous_arrival"] == "2024-05-06T12:00:00+00:00"
    assert resolved.details["last_arrival"] == "2024-05-06T13:02:00+00:00"
    assert resolved.details["gap"] == "1h 2m"
    assert "after a gap of 1h 2m" in resolved.summary


def test_remembered_arrival_survives_landing_cleanup() -> None:
    """Landing files removed by retention must not turn an outage into 'no data yet'."""
    state, _ = step(FreshnessState(), T0, T0 + MIN)
    state, sent = step(state, None, T0 + 20 * MIN)
    assert (state.status, state.last_arrival, sent) == ("stale", T0, "firing")


def test_first_look_at_old_data_pages() -> None:
    state, sent = step(FreshnessState(), T0, T0 + 2 * 60 * MIN)
    assert (state.status, sent) == ("stale", "firing")


def test_undelivered_alerts_are_retried_on_the_next_tick() -> None:
    fresh, _ = step(FreshnessState(), T0, T0 + MIN)
    proposed, alert = evaluate_freshness(fresh, T0, T0 + 16 * MIN, THRESHOLD)
    assert alert is not None
    retry = undelivered(fresh, proposed, alert)
    assert (retry.status, retry.alerted) == ("stale", False)
    again, alert = evaluate_freshness(retry, T0, T0 + 17 * MIN, THRESHOLD)
    assert alert is not None and alert.status == "firing"
    assert again.since == proposed.since  # the outage start is kept across retries

    back = T0 + 40 * MIN
    proposed, alert = evaluate_freshness(again, back, back + MIN, THRESHOLD)
    assert alert is not None and alert.status == "resolved"
    retry = undelivered(again, proposed, alert)
    assert retry == again
    _, alert = evaluate_freshness(retry, back, back + 2 * MIN, THRESHOLD)
    assert alert is not None and alert.status == "resolved"
    assert alert.details["previous_arrival"] == "2024-05-06T12:00:00+00:00"


def test_data_back_before_anyone_was_paged_sends_no_resolution() -> None:
    never_paged = FreshnessState(status="stale", since=T0 + THRESHOLD, last_arrival=T0)
    state, sent = step(never_paged, T0 + 30 * MIN, T0 + 31 * MIN)
    assert (state.status, sent) == ("fresh", None)


def test_cursor_and_clock_validation() -> None:
    assert FreshnessState.from_cursor(None) == FreshnessState()
    assert FreshnessState.from_cursor("not json") == FreshnessState()
    assert FreshnessState.from_cursor('{"status": "sideways"}') == FreshnessState()
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate_freshness(FreshnessState(), T0, datetime(2024, 1, 1), THRESHOLD)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=42), "42s"),
        (timedelta(minutes=3, seconds=59), "3m"),
        (timedelta(hours=2), "2h"),
        (timedelta(hours=2, minutes=5), "2h 5m"),
        (timedelta(days=3, hours=1), "3d 1h"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_human_duration(delta: timedelta, text: str) -> None:
    assert human_duration(delta) == text


# --- the sensor, end to end ------------------------------------------------------------


def land(lake: LocalLake, at: datetime | None = None) -> datetime:
    """Seal one landing file; ``at`` back-dates it the way an S3 writer names its PUTs."""
    if at is None:
        writer = SegmentWriter(lake, "landing", max_age_seconds=0)
        writer.append({"2024-05-06": b'{"event_id": "e1"}\n'})
        writer.close()
    else:
        ns = int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000
        key = f"landing/date=2024-05-06/{ns:019d}-backfill-000001.ndjson"
        assert parse_sealed_key(key) is not None
        lake.put_bytes(key, b'{"event_id": "e0"}\n')
    newest = last_arrival(lake)
    assert newest is not None
    return newest


def test_last_arrival_is_the_newest_seal_time(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    assert last_arrival(lake) is None
    before = datetime.now(UTC)
    landed = land(lake)
    assert before <= landed <= datetime.now(UTC)
    assert land(lake, T0) == landed  # an older file does not move the newest arrival
    assert len(list_sealed(lake, "landing")) == 2


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(freshness, "_now", fake)
    return fake


def sensor_resources(lake: LocalLake, smtp_port: int) -> dict[str, object]:
    return {
        "lake": LakeResource(uri=lake.uri),
        "notifier": NotifierResource(
            smtp_host="127.0.0.1", smtp_port=smtp_port, email_to="oncall@example.org"
        ),
        "recsys_config": RecsysConfig(
            catalog_epoch="1995-01-01",
            future_tolerance_seconds=300.0,
            bot_max_events_per_minute=120,
            session_gap_minutes=30.0,
            max_duplicate_rate=0.05,
            freshness_minutes=15.0,
        ),
    }


class Daemon:
    """Evaluates ticks like the sensor daemon: one instance per life, cursor carried over."""

    def __init__(self, resources: dict[str, object]) -> None:
        self.resources = resources
        self.cursor: str | None = None

    def lives(self) -> Iterator[dg.DagsterInstance]:
        with dg.instance_for_test() as instance:
            yield instance

    def tick(self, instance: dg.DagsterInstance) -> str:
        ctx = dg.build_sensor_context(
            instance=instance, cursor=self.cursor, resources=self.resources
        )
        data = weblog_freshness_sensor.evaluate_tick(ctx)
        assert not data.run_requests
        assert data.cursor is not None and data.skip_message is not None
        self.cursor = data.cursor
        return data.skip_message


def test_sensor_emails_once_per_outage_across_ticks_and_restarts(
    tmp_path: Path, alert_smtp_server, clock: Clock
) -> None:
    lake = LocalLake(tmp_path / "lake")
    daemon = Daemon(sensor_resources(lake, alert_smtp_server.port))
    mails = alert_smtp_server.messages
    old = clock.now - timedelta(minutes=40)

    for instance in daemon.lives():
        clock.now = old + timedelta(minutes=3)
        assert daemon.tick(instance) == "no weblogs have landed yet; nothing to watch"
        land(lake, old)
        assert daemon.tick(instance) == "weblogs fresh: last arrival 3m ago (threshold 15m)"
        assert mails == []

        clock.now = old + timedelta(minutes=16)
        assert daemon.tick(instance).endswith(
            "last arrival 16m ago (threshold 15m); firing alert sent"
        )
        clock.now = old + timedelta(minutes=20)
        assert daemon.tick(instance).startswith("weblogs STALE since")
        assert len(mails) == 1

    for instance in daemon.lives():  # restart: a new instance, the stored cursor string
        clock.now = old + timedelta(minutes=30)
        reason = daemon.tick(instance)
        assert "firing" not in reason and "30m ago" in reason
        assert len(mails) == 1

        arrived = land(lake)  # the collector is back (sealed now, in real time)
        clock.now = arrived + timedelta(minutes=1)
        assert daemon.tick(instance) == (
            "weblogs fresh: last arrival 1m ago (threshold 15m); resolved alert sent"
        )
        clock.now = arrived + timedelta(minutes=2)
        daemon.tick(instance)

    assert [m.message["Subject"] for m in mails] == [
        "[recsys][FIRING][critical] Weblogs stopped arriving",
        "[recsys][RESOLVED][info] Weblogs arriving again",
    ]
    assert all(m.rcpt_tos == ["oncall@example.org"] for m in mails)
    firing_body = mails[0].message.get_content()
    assert f"lake_uri: {lake.uri}" in firing_body
    assert f"last_arrival: {old.isoformat()}" in firing_body
    assert "threshold_minutes: 15.0" in firing_body
    resolved_body = mails[1].message.get_content()
    assert f"previous_arrival: {old.isoformat()}" in resolved_body
    assert f"last_arrival: {arrived.isoformat()}" in resolved_body


def test_sensor_retries_a_firing_that_reached_nobody(
    tmp_path: Path, alert_smtp_server, closed_localhost_port: int, clock: Clock
) -> None:
    lake = LocalLake(tmp_path / "lake")
    old = land(lake, clock.now - timedelta(minutes=20))
    clock.now = old + timedelta(minutes=20)
    broken = Daemon(sensor_resources(lake, closed_localhost_port))
    for instance in broken.lives():
        assert broken.tick(instance).endswith("firing alert NOT delivered, retrying next tick")
    assert FreshnessState.from_cursor(broken.cursor).alerted is False

    repaired = Daemon(sensor_resources(lake, alert_smtp_server.port))
    repaired.cursor = broken.cursor
    for instance in repaired.lives():
        clock.now = old + timedelta(minutes=21)
        assert repaired.tick(instance).endswith("firing alert sent")
        clock.now = old + timedelta(minutes=22)
        assert not repaired.tick(instance).endswith("sent")
    assert len(alert_smtp_server.messages) == 1


def test_sensor_loads_in_definitions_with_the_assumed_resource_keys(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    resources = sensor_resources(lake, smtp_port=25)
    resources["notifier"] = NotifierResource()  # log channel only
    defs = dg.Definitions(sensors=[weblog_freshness_sensor], resources=resources)
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("weblog_freshness_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 60
    # validate_loadable does not check sensor resources; the daemon looks them up by key.
    top_level = repo.get_top_level_resources()
    assert sensor.required_resource_keys == {"lake", "notifier", "recsys_config"}
    assert sensor.required_resource_keys <= set(top_level)

    land(lake)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(
            instance=instance,
            repository_def=repo,
            sensor_name=sensor.name,
            resources={k: top_level[k] for k in sensor.required_resource_keys},
        )
        data = sensor.evaluate_tick(ctx)
    assert data.skip_message is not None and data.skip_message.startswith("weblogs fresh")
    assert FreshnessState.from_cursor(data.cursor).status == "fresh"
