"""The lake layout: every area, key, date partition and alias name the lake uses.

Serving writes the landing and registry objects, the pipeline reads them and writes the
rest; both sides must spell a key the same way or a partition silently goes missing.
This module is the one place that spells them (it lives in ``recsys_serving`` because the
serving install has no ``recsys_assets``). Keys are plain posix strings relative to the
lake root (``Lake`` resolves them); dates are UTC ISO dates (``YYYY-MM-DD``), the
partition a timestamp belongs to.

Areas written by one module keep their object names there (a landing segment's name,
a registry record's); what more than one module reads or builds lives here.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsys_serving.lake import Lake, LakeObject

# -------------------------------------------------------------------- registry aliases
PRODUCTION = "production"  # what every user is served
CANDIDATE = "candidate"  # phased in to a share of users

# ------------------------------------------------------------------------------ areas
LANDING_AREA = "landing"  # sealed NDJSON segments the collector wrote
INTAKE_QUARANTINE_AREA = "quarantine/intake"  # lines the collector refused
OPEN_DIR = "_open"  # a local writer's open segments, under its area
WEBLOGS_AREA = "weblogs"  # processed weblogs, one Parquet partition per date
WEBLOGS_QUARANTINE_AREA = "quarantine/weblogs"  # landed lines the weblogs asset refused
CATALOG_QUARANTINE_AREA = "quarantine/catalog"  # catalog lines `recsys catalog load` refused
CATALOG_ITEMS_KEY = "catalog/items.parquet"  # item_catalog snapshot
CATALOG_USERS_KEY = "catalog/users.parquet"  # user_profiles snapshot
REGISTRY_PREFIX = "registry"  # models, registrations, aliases, history (registry.py)
TRAINING_PREFIX = "training"  # runs/<run>/<asset>/..., latest/<asset>.json (artifacts.py)
RETRAIN_LOCK_KEY = f"{TRAINING_PREFIX}/.retrain.lock"  # one retraining at a time
CTR_AREA = "monitoring/online_ctr"  # attributed CTR series snapshots, dated
HEALTH_AREA = "monitoring/health"  # service health between two scrapes, dated
DECISIONS_AREA = "monitoring/decisions"  # every closed-loop decision with its evidence
MLFLOW_STATUS_KEY = "tracking/mlflow.json"  # the last failed MLflow mirror call

PARTITION_FILE = "part-0.parquet"  # the one object of a Parquet date partition
_DATE_DIR = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})/")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ------------------------------------------------------------------------ partitions
def dated_key(area: str, day: str, name: str) -> str:
    """``<area>/date=<day>/<name>``: how every dated object in the lake is named."""
    return f"{area}/date={day}/{name}"


def date_dir(day: str) -> str:
    """The directory name of a date partition (``date=<day>``)."""
    return f"date={day}"


def partition_key(area: str, day: str) -> str:
    """The object of one date partition of a Parquet area."""
    return dated_key(area, day, PARTITION_FILE)


def weblogs_key(day: str) -> str:
    """The processed weblogs of one UTC date (the ``weblogs`` asset's partition)."""
    return partition_key(WEBLOGS_AREA, day)


def weblogs_quarantine_key(day: str) -> str:
    """The events the weblogs asset refused for one date, with their reasons."""
    return partition_key(WEBLOGS_QUARANTINE_AREA, day)


def date_of(key: str) -> str | None:
    """The date partition a key lies in (``None`` outside any ``date=`` directory)."""
    m = _DATE_DIR.search(key)
    return m[1] if m else None


def date_of_dir(name: str) -> str:
    """The date of a ``date=<day>`` directory name."""
    return name.removeprefix("date=")


def partitions(lake: Lake, area: str) -> dict[str, LakeObject]:
    """The Parquet date partitions of an area: date -> its object, in date order."""
    found = {}
    for obj in lake.list(f"{area}/"):
        day = date_of(obj.key)
        if day is not None and obj.key == partition_key(area, day):
            found[day] = obj
    return dict(sorted(found.items()))


def partition_days(lake: Lake, area: str = WEBLOGS_AREA) -> list[str]:
    """The dates that have a partition in an area (processed weblogs by default)."""
    return list(partitions(lake, area))


# ----------------------------------------------------------------------------- dates
def utc_date(ts: float) -> str:
    """The UTC date (partition) of an epoch timestamp in seconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def utc_today() -> str:
    """Today's UTC date: where arrivals without a usable event time are filed."""
    return datetime.now(UTC).strftime("%Y-%m-%d")


def utc_datetime(ts: float) -> datetime:
    """An epoch timestamp in seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


def day_start(day: str) -> datetime:
    """Midnight UTC opening a date partition."""
    return datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)


def parse_rfc3339(value: str, *, date_only: bool = False) -> datetime:
    """An RFC 3339 timestamp from a client, which must carry its offset (``Z``, ``+02:00``).

    With ``date_only`` a plain ``YYYY-MM-DD`` is read as midnight UTC (catalog dates).
    The ``ValueError`` messages are what a client is shown when its input is refused.
    """
    text = value.strip()
    if date_only and _DATE_ONLY.match(text):
        text += "T00:00:00+00:00"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:
        raise ValueError("RFC 3339 timestamp must carry an offset (e.g. Z or +02:00)")
    return parsed


def parse_utc(value: Any) -> datetime | None:
    """A timestamp the project wrote itself (ISO 8601 in a JSON record) as aware UTC;
    ``None`` for a missing or unreadable one (naive times are UTC)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
