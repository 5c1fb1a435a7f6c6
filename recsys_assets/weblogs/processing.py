"""Business logic that turns landed events into a clean weblogs partition.

Plain functions over polars frames so they are tested without Dagster; the
``weblogs`` asset only calls :func:`process_partitions`. A partition is always
recomputed from all of its landing files, which is what makes a re-run give the
same rows and lets late events simply trigger another run.

Throughput comes from staying inside polars: each landing segment is parsed whole
by polars' NDJSON reader (a line-by-line parse only for a segment that fails it, so
a bad line still reaches quarantine with its file, line and bytes), the rules are one
pass of expressions with no per-row Python and no string sort, and the next
partition is read while the current one is transformed and written. Memory is
bounded by two partitions (the one being processed and the one read ahead), never
by the length of a backfill.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from recsys_serving.events.schema import EVENT_TYPES, MAX_ABS_VALUE
from recsys_serving.lake import Lake, write_parquet
from recsys_serving.landing import LandingFile, iter_lines, list_sealed
from recsys_serving.layout import LANDING_AREA, weblogs_key, weblogs_quarantine_key
from recsys_serving.settings import EventSettings, default_of

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
    future_tolerance_seconds: float = default_of(EventSettings, "future_tolerance_seconds")
    bot_max_events_per_minute: int = default_of(EventSettings, "bot_max_events_per_minute")
    session_gap_minutes: float = default_of(EventSettings, "session_gap_minutes")


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


def read_landing(lake: Lake, files: Sequence[LandingFile]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Landed rows with their file and line, plus rows that could not be parsed.

    Rows come in landing order (files in seal order, lines in file order), which is
    what "the first landed copy" of a duplicate means. ``landing_file`` is an Enum
    of the file keys (one code per row instead of one string). Landing files are
    written by the intake, so they parse; a file placed by hand or cut by a crash
    falls back to line-by-line parsing instead of failing the run.
    """
    keys = pl.Enum([f.key for f in files])
    frames: list[pl.DataFrame] = []
    broken: list[dict[str, object]] = []
    for f in files:
        df, bad = _read_file(lake, f.key)
        broken.extend(bad)
        frames.append(df.with_columns(pl.lit(f.key, dtype=keys).alias("landing_file")))
    empty = pl.DataFrame(
        schema={**LANDING_SCHEMA, "landing_line": pl.Int64(), "landing_file": keys}
    )
    landed = pl.concat(frames, how="vertical", rechunk=False) if frames else empty
    bad_df = (
        pl.DataFrame(broken, schema=QUARANTINE_SCHEMA)
        if broken
        else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    )
    return landed, bad_df


def _read_file(lake: Lake, key: str) -> tuple[pl.DataFrame, list[dict[str, object]]]:
    """One segment parsed whole by polars, or line by line if that fails.

    A local segment is never copied into Python: polars reads the file itself and the
    lines are counted through a memory map (sealed segments are immutable). The
    whole-file parse is only trusted when it yields one row per line: polars skips
    blank lines, which would shift every later line number.
    """
    path = lake.local_path(key)
    source: Path | bytes = path if path is not None else lake.get_bytes(key)
    lines = _count_lines(source)
    if lines:
        try:
            df = pl.read_ndjson(source, schema=LANDING_SCHEMA)
            if df.height == lines:
                return df.with_columns(
                    pl.int_range(1, df.height + 1, dtype=pl.Int64).alias("landing_line")
                ), []
        except Exception:  # any parse failure means: parse line by line
            pass
    return _parse_lines(key, source.read_bytes() if isinstance(source, Path) else source)


def _count_lines(source: Path | bytes) -> int:
    """Lines as :func:`iter_lines` numbers them (a last line without newline counts).

    A local file is counted through a memory map in chunks with numpy, which
    releases the GIL and never copies the file (about 4x cheaper than
    ``bytes.count`` on a read copy).
    """
    if isinstance(source, bytes):
        return source.count(b"\n") + (0 if not source or source.endswith(b"\n") else 1)
    with open(source, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return 0
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data = np.frombuffer(mm, dtype=np.uint8)
            newline = np.empty(min(_COUNT_CHUNK, data.size), dtype=np.bool_)
            count = 0
            for at in range(0, data.size, _COUNT_CHUNK):
                chunk = data[at : at + _COUNT_CHUNK]
                mask = newline[: chunk.size]
                np.equal(chunk, 10, out=mask)
                count += int(np.count_nonzero(mask))
            ends_with_newline = bool(data[-1] == 10)
            del data, chunk  # the map cannot close while numpy still views it
            return count + (0 if ends_with_newline else 1)


_COUNT_CHUNK = 1 << 22


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


def apply_rules(
    landed: pl.DataFrame, day: date, rules: Rules, *, event_id_n_unique: int | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split landed rows into clean weblogs and quarantined rows with a reason each.

    ``landed`` must be in landing order (as :func:`read_landing` returns it): the
    first copy of a duplicated ``event_id`` is the one kept. ``event_id_n_unique``
    (polars' ``n_unique``, null counted as a value) saves counting when known.
    """
    day_start = datetime.combine(day, datetime.min.time(), UTC)
    day_end = day_start + timedelta(days=1)
    epoch = datetime.combine(rules.catalog_epoch, datetime.min.time(), UTC)
    latest = rules.now + timedelta(seconds=rules.future_tolerance_seconds)

    # Non-strict: a time no datetime can hold (inf, NaN, 1e20 s: landed by an old
    # intake or a file placed by hand) becomes null and its row is quarantined below,
    # instead of the cast failing the whole partition.
    ts = (
        (pl.col("ts") * 1_000_000)
        .round()
        .cast(pl.Int64, strict=False)
        .cast(pl.Datetime("us", "UTC"))
    )
    missing = pl.any_horizontal([pl.col(c).is_null() for c in REQUIRED])
    reason = (
        pl.when(missing)
        .then(pl.lit("missing_required"))
        .when(~pl.col("event_type").is_in(EVENT_TYPES))
        .then(pl.lit("unknown_event_type"))
        .when(pl.col("_ts").is_null())
        .then(pl.lit("invalid_timestamp"))
        .when(pl.col("value").is_not_null() & ~pl.col("value").is_finite())
        .then(pl.lit("non_finite_value"))
        .when(pl.col("value").abs() > MAX_ABS_VALUE)
        .then(pl.lit("implausible_value"))
        .when(pl.col("_ts") > latest)
        .then(pl.lit("future_timestamp"))
        .when(pl.col("_ts") < epoch)
        .then(pl.lit("before_catalog_epoch"))
        .when((pl.col("_ts") < day_start) | (pl.col("_ts") >= day_end))
        .then(pl.lit("outside_partition"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    df = landed.lazy().with_columns(
        ts.alias("_ts"),
        pl.col("position").clip(-(2**31), 2**31 - 1).cast(pl.Int32).alias("_position"),
    )
    df = df.with_columns(reason.alias("reason"))
    # Dedup keeps the first landed copy among otherwise valid rows (row order is
    # landing order, so no sort is needed). Distinct ids, the usual case, are
    # recognised with a cheaper count first.
    if event_id_n_unique is None:
        event_id_n_unique = landed.get_column("event_id").n_unique()
    if event_id_n_unique < landed.height:
        first_copy = (
            pl.when(pl.col("reason").is_null()).then(pl.col("event_id")).is_first_distinct()
        )
        df = df.with_columns(
            pl.when(pl.col("reason").is_null() & ~first_copy)
            .then(pl.lit("duplicate_event_id"))
            .otherwise(pl.col("reason"))
            .alias("reason")
        )
    df = df.collect()

    # Bots: a user whose busiest minute of actions is implausible loses the whole day
    # (every event of theirs, impressions and ratings included).
    bots = (
        df.lazy()
        .filter(pl.col("reason").is_null() & pl.col("event_type").is_in(RATE_COUNTED_EVENT_TYPES))
        .group_by("user_id", pl.col("_ts").dt.truncate("1m").alias("_minute"))
        .len()
        .filter(pl.col("len") > rules.bot_max_events_per_minute)
        .sort("len", "_minute", descending=[True, False])
        .group_by("user_id", maintain_order=True)
        .first()
        .select("user_id", pl.col("len").alias("_peak"), "_minute")
        .collect()
    )
    if bots.height:
        df = df.join(bots, on="user_id", how="left", maintain_order="left").with_columns(
            pl.when(pl.col("reason").is_null() & pl.col("_peak").is_not_null())
            .then(pl.lit("bot_rate"))
            .otherwise(pl.col("reason"))
            .alias("reason")
        )
    else:
        df = df.with_columns(
            pl.lit(None, dtype=pl.UInt32).alias("_peak"),
            pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("_minute"),
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
        .when(pl.col("reason") == "invalid_timestamp")
        .then(pl.format("ts {} cannot be a point in time", pl.col("ts").cast(pl.String)))
        .when(pl.col("reason") == "non_finite_value")
        .then(pl.format("value {} is not a finite number", pl.col("value").cast(pl.String)))
        .when(pl.col("reason") == "implausible_value")
        .then(
            pl.format(
                "value {} is outside -{} .. {} (training would overflow)",
                pl.col("value").cast(pl.String),
                pl.lit(f"{MAX_ABS_VALUE:g}"),
                pl.lit(f"{MAX_ABS_VALUE:g}"),
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
    valid = pl.col("reason").is_null()
    rejected = df.height - df.get_column("reason").null_count()
    quarantined = (
        df.filter(~valid)
        .with_columns(detail.alias("detail"), pl.col("landing_file").cast(pl.String))
        .select(list(QUARANTINE_SCHEMA))
    )
    # One sort (one gather of every column) orders the partition; sessions are then
    # filled in place, which keeps that order.
    clean = (
        (df.filter(valid) if rejected else df)
        .select(
            *(pl.col(c) for c in ("event_id", "event_type", "user_id", "item_id")),
            pl.col("_ts").alias("ts"),
            *(pl.col(c) for c in ("session_id", "request_id")),
            pl.col("_position").alias("position"),
            *(pl.col(c) for c in ("value", "model_version", "context")),
            pl.col("_ts"),
        )
        .sort("ts", "event_id")
    )
    clean = sessionize(clean, rules.session_gap_minutes).select(list(WEBLOGS_SCHEMA))
    return clean.cast(WEBLOGS_SCHEMA), quarantined.cast(QUARANTINE_SCHEMA)


def sessionize(df: pl.DataFrame, gap_minutes: float) -> pl.DataFrame:
    """Infer sessions where the shipper sent none: a new one after ``gap_minutes`` idle.

    Only events without ``session_id`` take part, and the id is derived from the user
    and the session's first second, so a re-run names sessions identically. Rows
    must carry their timestamp as ``_ts``; their order is kept.
    """
    inferred = df.get_column("session_id").is_null()
    if not inferred.any():
        return df.with_columns(inferred.alias("session_inferred"))
    gap = timedelta(minutes=gap_minutes)
    # Sorted by user then time, a session starts at a user's first event or after a
    # gap; its id carries the time of that first event (forward-filled).
    new_session = (pl.col("user_id") != pl.col("user_id").shift()).fill_null(True) | (
        (pl.col("_ts") - pl.col("_ts").shift()) > gap
    )
    started = pl.when(new_session).then(pl.col("_ts")).forward_fill()
    inferred_rows = (
        df.select(
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "user_id", "_ts", "event_id"
        )
        .filter(inferred)
        .sort("user_id", "_ts", "event_id")
        .select(
            "_row",
            pl.format("auto:{}:{}", pl.col("user_id"), started.dt.epoch("s")).alias("_session"),
        )
    )
    sessions = df.get_column("session_id").scatter(
        inferred_rows.get_column("_row"), inferred_rows.get_column("_session")
    )
    return df.with_columns(sessions, inferred.alias("session_inferred"))


@dataclass
class _Landed:
    """A partition's landing files, read and parsed (what the read-ahead produces)."""

    day: str
    files: list[LandingFile]
    landed: pl.DataFrame
    unreadable: pl.DataFrame


def _load(lake: Lake, day: str) -> _Landed:
    files = list_sealed(lake, LANDING_AREA, date=day)
    landed, unreadable = read_landing(lake, files)
    return _Landed(day, files, landed, unreadable)


# What makes two landed copies of an event_id the same event. ``context`` is left out:
# it is free JSON a resending client may serialise with another key order.
EVENT_IDENTITY = tuple(c for c in LANDING_SCHEMA if c != "context")


@dataclass(frozen=True)
class EventIdCounts:
    """A partition's landed (non-null) event_ids, how many are distinct, how many conflict.

    A duplicate is either a *replay* (the same event landed again: a resend, a file
    ingested twice after a crash), harmless once deduplicated, or a *conflict* (one
    event_id for events that differ), where every copy but the first is a real event
    lost to dedup. Only conflicts say something is wrong upstream (a client reusing
    ids), so only they are rated by the blocking check.
    """

    landed: int
    distinct: int
    conflicting: int = 0  # event_ids landed with more than one distinct content
    conflicting_examples: tuple[str, ...] = field(default=(), compare=False)

    @property
    def replayed(self) -> int:
        """Landed copies beyond the first of each event_id (replays and conflicts)."""
        return self.landed - self.distinct

    @property
    def conflicting_rate(self) -> float:
        return self.conflicting / self.distinct if self.distinct else 0.0

    @classmethod
    def of(cls, ids: pl.Series) -> EventIdCounts:
        nulls = ids.null_count()
        return cls(landed=ids.len() - nulls, distinct=ids.n_unique() - (1 if nulls else 0))

    @classmethod
    def of_landed(cls, landed: pl.DataFrame) -> EventIdCounts:
        """Counts of a landed frame; contents are compared only when ids repeat (rare)."""
        counts = cls.of(landed.get_column("event_id"))
        if counts.distinct == counts.landed:
            return counts
        versions = (
            landed.lazy()
            .filter(pl.col("event_id").is_not_null())
            .select(EVENT_IDENTITY)
            .unique()
            .group_by("event_id")
            .len()
            .filter(pl.col("len") > 1)
            .sort("event_id")
            .collect()
        )
        return cls(
            counts.landed,
            counts.distinct,
            conflicting=versions.height,
            conflicting_examples=tuple(versions.get_column("event_id").head(2).to_list()),
        )


@dataclass
class _Processed:
    """A partition after the rules, accounting proven, waiting to be written."""

    day: str
    files: list[LandingFile]
    landing_rows: int
    clean: pl.DataFrame
    quarantined: pl.DataFrame


def _transform(
    loaded: _Landed,
    rules: Rules,
    on_frames: Callable[[str, pl.DataFrame, EventIdCounts], None] | None = None,
) -> _Processed:
    """Apply the rules and prove the accounting before anything is written."""
    day = loaded.day
    ids = EventIdCounts.of_landed(loaded.landed)
    clean, quarantined = apply_rules(
        loaded.landed,
        date.fromisoformat(day),
        rules,
        event_id_n_unique=ids.distinct + (1 if loaded.landed.height > ids.landed else 0),
    )
    if loaded.unreadable.height:
        quarantined = pl.concat([loaded.unreadable, quarantined], how="vertical_relaxed")
    landing_rows = loaded.landed.height + loaded.unreadable.height
    if landing_rows != clean.height + quarantined.height:
        raise RuntimeError(
            f"accounting broken for {day}: {landing_rows} landed != "
            f"{clean.height} written + {quarantined.height} quarantined"
        )
    if on_frames is not None:
        on_frames(day, clean, ids)
    return _Processed(day, loaded.files, landing_rows, clean, quarantined)


def _write(lake: Lake, done: _Processed) -> PartitionResult:
    """Write quarantine then weblogs (the commit point readers rely on), each atomically."""
    day, clean, quarantined = done.day, done.clean, done.quarantined
    write_parquet(lake, weblogs_quarantine_key(day), quarantined)
    write_parquet(lake, weblogs_key(day), clean)
    reasons = quarantined.group_by("reason").len().sort("reason")
    digest = hashlib.sha256()
    for f in done.files:
        digest.update(f"{f.key}:{f.size}\n".encode())
    stats = clean.select(
        pl.col("user_id").n_unique().alias("users"),
        pl.col("item_id").n_unique().alias("items"),
        pl.col("session_inferred").sum().alias("sessions_inferred"),
    ).row(0, named=True)
    return PartitionResult(
        partition=day,
        landing_files=len(done.files),
        landing_rows=done.landing_rows,
        rows=clean.height,
        quarantined=quarantined.height,
        reasons=dict(zip(reasons["reason"].to_list(), reasons["len"].to_list(), strict=True)),
        users=int(stats["users"]),
        items=int(stats["items"]),
        sessions_inferred=int(stats["sessions_inferred"] or 0),
        content_hash=digest.hexdigest()[:16],
    )


def process_partition(lake: Lake, day: str, rules: Rules) -> PartitionResult:
    """Recompute one weblogs partition from its landing files and write it atomically."""
    return _write(lake, _transform(_load(lake, day), rules))


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
    on_frames: Callable[[str, pl.DataFrame, EventIdCounts], None] | None = None,
    on_partition: Callable[[PartitionResult], None] | None = None,
) -> RunSummary:
    """Process partitions in order as a three-stage pipeline: read, rules, write.

    While partition N is transformed, N+1 is read and parsed and N-1 is written, so
    parsing, the rules and Parquet encoding keep both cores busy. Each stage holds
    one partition, so a year-long backfill holds a handful of partitions in memory,
    never the whole range. ``on_frames(day, weblogs, event_id_counts)`` sees each
    partition's frames once, before they are written (the quality checks reduce
    them to what they validate); ``on_partition`` is called in order once a
    partition is written. A failure stops the run at that partition: the ones
    before it are written, the ones after it are untouched.
    """
    results: list[PartitionResult] = []
    if not days:
        return RunSummary(results)

    def written(future: Future[PartitionResult]) -> None:
        result = future.result()
        results.append(result)
        if on_partition is not None:
            on_partition(result)

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="weblogs-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="weblogs-write") as writer,
    ):
        ahead: Future[_Landed] = reader.submit(_load, lake, days[0])
        writing: Future[PartitionResult] | None = None
        try:
            for i in range(len(days)):
                loaded = ahead.result()
                if i + 1 < len(days):
                    ahead = reader.submit(_load, lake, days[i + 1])
                done = _transform(loaded, rules, on_frames)
                del loaded
                if writing is not None:
                    written(writing)
                writing = writer.submit(_write, lake, done)
                del done
            if writing is not None:
                written(writing)
                writing = None
        finally:
            ahead.cancel()
            if writing is not None:
                writing.cancel()
    return RunSummary(results)
