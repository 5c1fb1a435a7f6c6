"""Page the on-duty engineer when weblogs stop landing, and again when they return.

A silent collector is the failure nobody notices: the pipeline keeps running on
yesterday's data and the recommender slowly goes stale. The rule is deliberately
simple (the newest sealed landing file is older than ``freshness_minutes``) and
the decision is a pure function of the previous state, so it is tested without a
clock or a daemon. The state lives in the sensor cursor, which Dagster stores in
the instance: a daemon restart resumes the same outage instead of paging again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

import dagster as dg
from pydantic import BaseModel, ConfigDict, ValidationError

from recsys_assets.alerts.notifier import (
    Alert,
    NotifierResource,
    delivery_metadata,
    was_delivered,
)
from recsys_assets.resources import LakeResource, RecsysConfig
from recsys_serving.lake import Lake
from recsys_serving.landing import list_sealed
from recsys_serving.layout import LANDING_AREA

FRESHNESS_ALERT_KEY = "weblogs_freshness"
FreshnessStatus = Literal["unknown", "fresh", "stale"]

_log = logging.getLogger(__name__)


class FreshnessState(BaseModel):
    """What the alarm believed at the previous tick; stored as the sensor cursor.

    ``last_arrival`` is remembered, not only observed, so that landing files removed
    by retention do not make an outage look like a fresh install. ``alerted`` means
    the firing alert of the current outage reached someone; a stale state with
    ``alerted=False`` is retried on the next tick.
    """

    model_config = ConfigDict(frozen=True)

    status: FreshnessStatus = "unknown"
    since: datetime | None = None
    last_arrival: datetime | None = None
    alerted: bool = False

    def to_cursor(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_cursor(cls, cursor: str | None) -> FreshnessState:
        if not cursor:
            return cls()
        try:
            return cls.model_validate_json(cursor)
        except ValidationError:
            # Starting over may page once more, which beats a sensor stuck on every tick.
            _log.warning("unreadable freshness cursor, starting from 'unknown': %r", cursor)
            return cls()


def _require_aware(name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def human_duration(delta: timedelta) -> str:
    """Coarse on purpose: an engineer reading '3m' or '2h 5m' needs no seconds."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def evaluate_freshness(
    state: FreshnessState,
    last_arrival: datetime | None,
    now: datetime,
    threshold: timedelta,
    *,
    lake_uri: str | None = None,
) -> tuple[FreshnessState, Alert | None]:
    """Next state and at most one alert: firing once per outage, resolved once after it."""
    _require_aware("now", now)
    _require_aware("last_arrival", last_arrival)
    known = [t for t in (state.last_arrival, last_arrival) if t is not None]
    if not known:
        return FreshnessState(), None
    newest = max(known)
    age = now - newest

    if age > threshold:
        if state.status == "stale" and state.alerted:
            return state.model_copy(update={"last_arrival": newest}), None
        stale_since = state.since if state.status == "stale" and state.since else newest + threshold
        new_state = FreshnessState(
            status="stale", since=stale_since, last_arrival=newest, alerted=True
        )
        return new_state, _firing_alert(newest, age, stale_since, now, threshold, lake_uri)

    if state.status == "stale" and state.alerted:
        new_state = FreshnessState(status="fresh", since=newest, last_arrival=newest)
        return new_state, _resolved_alert(state, newest, now, threshold, lake_uri)
    fresh_since = state.since if state.status == "fresh" and state.since else newest
    return FreshnessState(status="fresh", since=fresh_since, last_arrival=newest), None


def undelivered(previous: FreshnessState, proposed: FreshnessState, alert: Alert) -> FreshnessState:
    """The state to store when ``alert`` reached nobody, so the next tick sends it again.

    A firing alert keeps the outage (and when it began) but clears ``alerted``; a
    resolved alert keeps the previous stale state, whose comparison with the new
    arrival produces the same resolution, gap included, on the next tick.
    """
    if alert.status == "firing":
        return proposed.model_copy(update={"alerted": False})
    return previous


def _firing_alert(
    newest: datetime,
    age: timedelta,
    stale_since: datetime,
    now: datetime,
    threshold: timedelta,
    lake_uri: str | None,
) -> Alert:
    return Alert(
        key=FRESHNESS_ALERT_KEY,
        status="firing",
        severity="critical",
        title="Weblogs stopped arriving",
        summary=(
            f"No weblogs have landed for {human_duration(age)} "
            f"(threshold {human_duration(threshold)}); the newest landing file was sealed "
            f"at {_iso(newest)}. Check the collector and the clients sending to it."
        ),
        details={
            "last_arrival": _iso(newest),
            "age": human_duration(age),
            "age_seconds": round(age.total_seconds(), 1),
            "threshold_minutes": threshold.total_seconds() / 60,
            "stale_since": _iso(stale_since),
            "checked_at": _iso(now),
            "lake_uri": lake_uri,
        },
        at=now,
    )


def _resolved_alert(
    previous: FreshnessState,
    newest: datetime,
    now: datetime,
    threshold: timedelta,
    lake_uri: str | None,
) -> Alert:
    before = previous.last_arrival
    gap = newest - before if before is not None else None
    gap_text = f" after a gap of {human_duration(gap)}" if gap is not None else ""
    return Alert(
        key=FRESHNESS_ALERT_KEY,
        status="resolved",
        severity="info",
        title="Weblogs arriving again",
        summary=f"Weblogs landed again at {_iso(newest)}{gap_text}.",
        details={
            "last_arrival": _iso(newest),
            "previous_arrival": _iso(before) if before is not None else None,
            "gap": human_duration(gap) if gap is not None else None,
            "gap_seconds": round(gap.total_seconds(), 1) if gap is not None else None,
            "stale_since": _iso(previous.since) if previous.since is not None else None,
            "threshold_minutes": threshold.total_seconds() / 60,
            "checked_at": _iso(now),
            "lake_uri": lake_uri,
        },
        at=now,
    )


def _from_ns(ns: int) -> datetime:
    seconds, rest = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)


def last_arrival(lake: Lake) -> datetime | None:
    """When the newest sealed landing file landed (its seal time), or None if none has."""
    files = list_sealed(lake, LANDING_AREA)
    if not files:
        return None
    return _from_ns(max(f.seal_ns for f in files))


def describe(state: FreshnessState, now: datetime, threshold: timedelta) -> str:
    if state.status == "unknown" or state.last_arrival is None:
        return "no weblogs have landed yet; nothing to watch"
    age = human_duration(now - state.last_arrival)
    limit = human_duration(threshold)
    if state.status == "fresh":
        return f"weblogs fresh: last arrival {age} ago (threshold {limit})"
    since = _iso(state.since) if state.since else "?"
    return f"weblogs STALE since {since}: last arrival {age} ago (threshold {limit})"


def _now() -> datetime:
    """The sensor's clock; tests replace it to step through an outage without waiting."""
    return datetime.now(UTC)


@dg.sensor(
    name="weblog_freshness_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Alerts (email/webhook/log) once when no weblog landing file has been sealed for "
        "freshness_minutes, and once when weblogs arrive again. Launches no runs."
    ),
)
def weblog_freshness_sensor(
    context: dg.SensorEvaluationContext,
    lake: LakeResource,
    notifier: NotifierResource,
    recsys_config: RecsysConfig,
) -> dg.SensorResult:
    previous = FreshnessState.from_cursor(context.cursor)
    the_lake = lake.get()
    now = _now()
    threshold = timedelta(minutes=recsys_config.freshness_minutes)
    state, alert = evaluate_freshness(
        previous, last_arrival(the_lake), now, threshold, lake_uri=the_lake.uri
    )
    reason = describe(state, now, threshold)
    if alert is not None:
        results = notifier.get().send(alert)
        for result in results:
            line = f"{alert.key} {alert.status} alert via {result.channel}: {result.describe()}"
            if result.ok:
                context.log.info(line)
            else:
                context.log.error(line)
        if was_delivered(results):
            reason += f"; {alert.status} alert sent"
        else:
            state = undelivered(previous, state, alert)
            reason += f"; {alert.status} alert NOT delivered, retrying next tick"
            context.log.error(
                f"{alert.key} {alert.status} alert reached nobody: {delivery_metadata(results)}"
            )
    return dg.SensorResult(cursor=state.to_cursor(), skip_reason=reason)
