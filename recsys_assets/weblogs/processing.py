"""Business logic that turns landed events into a clean weblogs partition.

Plain functions over polars frames so they are tested without Dagster; the
``weblogs`` asset only calls :func:`process_partition`. A partition is always
recomputed from all of its landing files, which is what makes a re-run give the
same rows and lets late events simply trigger another run.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import orjson
import polars as pl

from recsys_serving.events.schema import EVENT_TYPES
from recsys_serving.lake import Lake, read_parquet, write_parquet
from recsys_serving.landing import LANDING_AREA, LandingFile, iter_lines, list_sealed

WEBLOGS_AREA = "weblogs"
WEBLOGS_QUARANTINE_AREA = "quarantine/weblogs"
REQUIRED = ("event_id", "event_type", "user_id", "item_id", "ts")
# What the bot-rate rule counts: things a person does. Impressions are logged by the
# server (10 per recommendation request), and ratings are often submitted or imported
# in bulk (MovieLens-style sign-ups rate dozens of items in the same second), so
# neither says anything about how fast a user acts.
RATE_COUNTED_EVENT_TYPES: tuple[str, ...] = ("click", "view", "add_to_cart", "purchase")

# Landing files hold contract-valid JSON; ``context`` objects are kept as JSON text.
LANDING_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "event_type": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Float64(),
    "session_id": pl.String(),
    "request_id": pl.String(),
    "position": pl.Int64(),
    "value": pl.Float64(),
    "model_version": pl.String(),
    "context": pl.String(),
}

WEBLOGS_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "event_type": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "session_id": pl.String(),
    "session_inferred": pl.Boolean(),
    "request_id": pl.String(),
    "position": pl.Int32(),
    "value": pl.Float64(),
    "model_version": pl.String(),
    "context": pl.String(),
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "reason": pl.String(),
    "detail": pl.String(),
    "landing_file": pl.String(),
    "landing_line": pl.Int64(),
    **{k: v for k, v in LANDING_SCHEMA.items()},
}


@dataclass(frozen=True)
class Rules:
    """The business rules a run applied; recorded in metadata for reproducibility."""

    catalog_epoch: date
    now: datetime
    future_tolerance_seconds: float = 300.0
    bot_max_events_per_minute: int = 120
    session_gap_minutes: float = 30.0


@dataclass
class PartitionResult:
    partition: str
    landing_files: int = 0
    landing_rows: int = 0
    rows: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    users: int = 0
    items: int = 0
    sessions_inferred: int = 0
    content_hash: str = ""
    events: pl.DataFrame | None = None
    landing_ids: pl.Series | None = None

    @property
    def duplicates(self) -> int:
        return self.reasons.get("duplicate_event_id", 0)

    def summary(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "landing_files": self.landing_files,
            "landing_rows": self.landing_rows,
            "rows": self.rows,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons),
            "users": self.users,
            "items": self.items,
            "sessions_inferred": self.sessions_inferred,
            "content_hash": self.content_hash,
        }


def partition_key(day: str) -> str:
    return f"{WEBLOGS_AREA}/date={day}/part-0.parquet"


def quarantine_key(day: str) -> str:
    return f"{WEBLOGS_QUARANTINE_AREA}/date={day}/part-0.parquet"


def read_landing(lake: Lake, files: Sequence[LandingFile]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Landed rows with their file and line, plus rows that could not be parsed.

    Landing files are written by the intake, so they parse; a file placed by hand
    or cut by a crash falls back to line-by-line parsing instead of failing the run.
    """
    frames: list[pl.DataFrame] = []
    broken: list[dict[str, object]] = []
    for f in files:
        data = _read(lake, f.key)
        try:
            df = pl.read_ndjson(io.BytesIO(data), schema=LANDING_SCHEMA)
            if df.height != data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1):
                raise ValueError("row count does not match line count")
        except Exception:
            df, bad = _parse_lines(f.key, data)
            broken.extend(bad)
        frames.append(
            df.with_columns(
                pl.lit(f.key).alias("landing_file"),
                pl.int_range(1, df.height + 1, dtype=pl.Int64).alias("landing_line"),
            )
            if "landing_line" not in df.columns
            else df.with_columns(pl.lit(f.key).alias("landing_file"))
        )
    empty = pl.DataFrame(
        schema={**LANDING_SCHEMA, "landing_file": pl.String(), "landing_line": pl.Int64()}
    )
    landed = pl.concat([empty, *frames], how="diagonal_relaxed") if frames else empty
    bad_df = (
        pl.DataFrame(broken, schema=QUARANTINE_SCHEMA)
        if broken
        else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    )
    return landed, bad_df


def _read(lake: Lake, key: str) -> bytes:
    path = lake.local_path(key)
    return path.read_bytes() if path is not None else lake.get_bytes(key)


def _parse_lines(key: str, data: bytes) -> tuple[pl.DataFrame, list[dict[str, object]]]:
    good: list[dict[str, object]] = []
    bad: list[dict[str, object]] = []
    for line_no, raw in iter_lines(data):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            row = {k: obj.get(k) for k in LANDING_SCHEMA}
            if isinstance(row["context"], dict):
                row["context"] = orjson.dumps(row["context"]).decode()
            row["landing_line"] = line_no
            pl.DataFrame([row], schema={**LANDING_SCHEMA, "landing_line": pl.Int64()})
            good.append(row)
        except Exception as exc:
            bad.append(
                {
                    "reason": "corrupt_landing_line",
                    "detail": f"{type(exc).__name__}: {exc}"[:500],
                    "landing_file": key,
                    "landing_line": line_no,
                    **{k: None for k in LANDING_SCHEMA},
                    "context": raw.decode("utf-8", errors="backslashreplace"),
                }
            )
    schema = {**LANDING_SCHEMA, "landing_line": pl.Int64()}
    return pl.DataFrame(good, schema=schema), bad


def apply_rules(landed: pl.DataFrame, day: date, rules: Rules) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split landed rows into clean weblogs and quarantined rows with a reason each."""
    day_start = datetime.combine(day, datetime.min.time(), UTC)
    day_end = day_start + timedelta(days=1)
    epoch = datetime.combine(rules.catalog_epoch, datetime.min.time(), UTC)
    latest = rules.now + timedelta(seconds=rules.future_tolerance_seconds)

    df = landed.with_columns(
        (pl.col("ts") * 1_000_000)
        .round()
        .cast(pl.Int64)
        .cast(pl.Datetime("us", "UTC"))
        .alias("_ts"),
        pl.col("position").clip(-(2**31), 2**31 - 1).cast(pl.Int32).alias("_position"),
    )
    missing = pl.any_horizontal([pl.col(c).is_null() for c in REQUIRED])
    reason = (
        pl.when(missing)
        .then(pl.lit("missing_required"))
        .when(~pl.col("event_type").is_in(EVENT_TYPES))
        .then(pl.lit("unknown_event_type"))
        .when(pl.col("_ts") > latest)
        .then(pl.lit("future_timestamp"))
        .when(pl.col("_ts") < epoch)
        .then(pl.lit("before_catalog_epoch"))
        .when((pl.col("_ts") < day_start) | (pl.col("_ts") >= day_end))
        .then(pl.lit("outside_partition"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    df = df.with_columns(reason.alias("reason"))

    # Dedup keeps the first landed copy (files are named by seal time).
    df = df.sort("landing_file", "landing_line").with_columns(
        pl.when(pl.col("reason").is_null()).then(pl.col("event_id")).alias("_dedup")
    )
    later_copy = pl.int_range(pl.len()).over("_dedup") > 0
    df = df.with_columns(
        pl.when(pl.col("reason").is_null() & later_copy)
        .then(pl.lit("duplicate_event_id"))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )

    # Bots: a user whose busiest minute of actions is implausible loses the whole day
    # (every event of theirs, impressions and ratings included).
    actions = df.filter(
        pl.col("reason").is_null() & pl.col("event_type").is_in(RATE_COUNTED_EVENT_TYPES)
    )
    bots = (
        actions.group_by("user_id", pl.col("_ts").dt.truncate("1m").alias("_minute"))
        .len()
        .filter(pl.col("len") > rules.bot_max_events_per_minute)
        .sort("len", "_minute", descending=[True, False])
        .unique("user_id", keep="first")
        .select("user_id", pl.col("len").alias("_peak"), "_minute")
    )
    df = df.join(bots, on="user_id", how="left").with_columns(
        pl.when(pl.col("reason").is_null() & pl.col("_peak").is_not_null())
        .then(pl.lit("bot_rate"))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )

    detail = (
        pl.when(pl.col("reason") == "bot_rate")
        .then(
            pl.format(
                "{} actions (click, view, add_to_cart, purchase) in the minute from {}; limit {}",
                pl.col("_peak"),
                pl.col("_minute").dt.strftime("%Y-%m-%dT%H:%MZ"),
                pl.lit(rules.bot_max_events_per_minute),
            )
        )
        .when(pl.col("reason") == "future_timestamp")
        .then(pl.format("ts {} is after {}", pl.col("_ts"), pl.lit(latest.isoformat())))
        .when(pl.col("reason") == "before_catalog_epoch")
        .then(pl.format("ts {} is before {}", pl.col("_ts"), pl.lit(epoch.date().isoformat())))
        .when(pl.col("reason") == "outside_partition")
        .then(pl.format("ts {} is not on {}", pl.col("_ts"), pl.lit(day.isoformat())))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    quarantined = (
        df.filter(pl.col("reason").is_not_null())
        .with_columns(detail.alias("detail"))
        .select(list(QUARANTINE_SCHEMA))
    )
    clean = sessionize(
        df.filter(pl.col("reason").is_null()).with_columns(
            pl.col("_ts").alias("ts"), pl.col("_position").alias("position")
        ),
        rules.session_gap_minutes,
    )
    clean = clean.select(list(WEBLOGS_SCHEMA)).sort("ts", "event_id")
    return clean.cast(WEBLOGS_SCHEMA), quarantined.cast(QUARANTINE_SCHEMA)


def sessionize(df: pl.DataFrame, gap_minutes: float) -> pl.DataFrame:
    """Infer sessions where the shipper sent none: a new one after ``gap_minutes`` idle.

    Only events without ``session_id`` take part, and the id is derived from the user
    and the session's first second, so a re-run names sessions identically.
    """
    gap = timedelta(minutes=gap_minutes)
    missing = df.filter(pl.col("session_id").is_null())
    present = df.filter(pl.col("session_id").is_not_null()).with_columns(
        pl.lit(False).alias("session_inferred")
    )
    if missing.height == 0:
        return present
    missing = missing.sort("user_id", "_ts", "event_id").with_columns(
        ((pl.col("_ts").diff().over("user_id") > gap).fill_null(True))
        .cum_sum()
        .over("user_id")
        .alias("_sess")
    )
    missing = missing.with_columns(
        pl.format(
            "auto:{}:{}",
            pl.col("user_id"),
            pl.col("_ts").min().over("user_id", "_sess").dt.epoch("s"),
        ).alias("session_id"),
        pl.lit(True).alias("session_inferred"),
    ).drop("_sess")
    return pl.concat([present, missing], how="vertical_relaxed")


def process_partition(
    lake: Lake, day: str, rules: Rules, keep_frames: bool = True
) -> PartitionResult:
    """Recompute one weblogs partition from its landing files and write it atomically."""
    files = list_sealed(lake, LANDING_AREA, date=day)
    landed, unreadable = read_landing(lake, files)
    clean, quarantined = apply_rules(landed, date.fromisoformat(day), rules)
    quarantined = pl.concat([unreadable, quarantined], how="vertical_relaxed")
    # Quarantine first: the weblogs file is the commit point readers rely on.
    write_parquet(lake, quarantine_key(day), quarantined)
    write_parquet(lake, partition_key(day), clean)
    reasons = quarantined.group_by("reason").len().sort("reason")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.key}:{f.size}\n".encode())
    return PartitionResult(
        partition=day,
        landing_files=len(files),
        landing_rows=landed.height + unreadable.height,
        rows=clean.height,
        quarantined=quarantined.height,
        reasons=dict(zip(reasons["reason"].to_list(), reasons["len"].to_list(), strict=True)),
        users=clean["user_id"].n_unique(),
        items=clean["item_id"].n_unique(),
        sessions_inferred=int(clean["session_inferred"].sum() or 0),
        content_hash=digest.hexdigest()[:16],
        events=clean if keep_frames else None,
        landing_ids=landed["event_id"] if keep_frames else None,
    )


def read_weblogs(lake: Lake, days: Sequence[str], columns: list[str] | None = None) -> pl.DataFrame:
    """Processed weblogs for some partitions (missing partitions are skipped)."""
    frames = [
        read_parquet(lake, partition_key(d), columns) for d in days if lake.exists(partition_key(d))
    ]
    if not frames:
        schema = {k: v for k, v in WEBLOGS_SCHEMA.items() if columns is None or k in columns}
        return pl.DataFrame(schema=schema)
    return pl.concat(frames, how="vertical_relaxed")


@dataclass
class RunSummary:
    partitions: list[PartitionResult]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    @property
    def landing_rows(self) -> int:
        return sum(p.landing_rows for p in self.partitions)

    @property
    def quarantined(self) -> int:
        return sum(p.quarantined for p in self.partitions)

    @property
    def reasons(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.partitions:
            for k, v in p.reasons.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))


def process_partitions(
    lake: Lake,
    days: Sequence[str],
    rules: Rules,
    on_batch: Callable[[pl.DataFrame, pl.Series, list[str]], None] | None = None,
    batch_rows: int = 2_000_000,
    on_partition: Callable[[PartitionResult], None] | None = None,
) -> RunSummary:
    """Process partitions one at a time, handing bounded batches to the validator.

    A year-long backfill runs in one Dagster run yet only ever holds about
    ``batch_rows`` processed rows in memory.
    """
    results: list[PartitionResult] = []
    pending: list[PartitionResult] = []

    def flush() -> None:
        if on_batch is not None and pending:
            events = pl.concat(
                [
                    p.events.with_columns(  # type: ignore[union-attr]
                        pl.lit(
                            datetime.combine(
                                date.fromisoformat(p.partition), datetime.min.time(), UTC
                            )
                        )
                        .cast(pl.Datetime("us", "UTC"))
                        .alias("_partition_start")
                    )
                    for p in pending
                ],
                how="vertical_relaxed",
            )
            ids = pl.concat([p.landing_ids for p in pending])  # type: ignore[misc]
            on_batch(events, ids, [p.partition for p in pending])
        for p in pending:
            p.events = None
            p.landing_ids = None
        pending.clear()

    for day in days:
        result = process_partition(lake, day, rules, keep_frames=on_batch is not None)
        if result.landing_rows != result.rows + result.quarantined:
            raise RuntimeError(
                f"accounting broken for {day}: {result.landing_rows} landed != "
                f"{result.rows} written + {result.quarantined} quarantined"
            )
        results.append(result)
        pending.append(result)
        if on_partition is not None:
            on_partition(result)
        if sum(p.rows for p in pending) >= batch_rows:
            flush()
    flush()
    return RunSummary(results)
