"""From processed weblogs to weighted interactions, the time window and vocabularies.

Plain functions over polars frames, called by the ``interactions`` asset and by
:func:`recsys_assets.training.pipeline.train_bundle` alike.

* Positive events (view < click < add_to_cart < purchase, ratings by value) become
  ``interactions`` with an implicit-feedback weight and a ranking grade.
* Impressions are kept apart with a ``clicked`` flag (joined on request and item),
  because "shown and not clicked" is the only explicit negative the logs hold.
* The window is cut into training / label / holdout segments by time; segments that
  would be too sparse widen to hold a minimum share of events, and a window too
  small to learn anything raises :class:`TrainingDataError` with the counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.artifacts import pack_meta, pack_ragged, unpack_meta, unpack_ragged
from recsys_assets.training.params import TrainingParams
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA
from recsys_serving.lake import Lake
from recsys_serving.layout import (
    CATALOG_ITEMS_KEY,
    CATALOG_USERS_KEY,
    WEBLOGS_QUARANTINE_AREA,
    partition_days,
    weblogs_key,
)
from recsys_serving.model.state import Ragged

DAY = 86_400.0
# The weblogs columns training reads (not the ids of events, their context or the
# model that served them).
WEBLOG_COLUMNS = [
    c
    for c in WEBLOGS_SCHEMA
    if c not in ("event_id", "session_inferred", "model_version", "context")
]


class TrainingDataError(ValueError):
    """The data cannot train a model (empty or tiny window); the message says why."""


@dataclass
class WeblogData:
    frame: pl.DataFrame  # WEBLOG_COLUMNS, ts as epoch seconds (Float64)
    partitions: list[str]
    rows: dict[str, int]
    content_hashes: dict[str, str]


@dataclass(frozen=True)
class TrainingWindow:
    """Epoch-second boundaries of one training run.

    The ranking dataset is built at each of ``cutoffs`` (newest first): features from
    ``[start, c)``, labels from ``[c, c + label_seconds)``; ``[holdout_start, end)`` is
    the evaluation holdout; the served state covers ``[start, end)``.
    """

    start: float
    cutoffs: tuple[float, ...]
    label_seconds: float
    holdout_start: float
    end: float
    widened: tuple[str, ...] = ()

    @property
    def cutoff(self) -> float:
        """The newest ranking cut-off."""
        return self.cutoffs[0]

    def label_end(self, cutoff: float) -> float:
        return min(cutoff + self.label_seconds, self.holdout_start)

    def bounds(self) -> dict[str, Any]:
        """Epoch seconds, exact (what downstream assets read back)."""
        return {
            "start": self.start,
            "cutoffs": list(self.cutoffs),
            "label_seconds": self.label_seconds,
            "holdout_start": self.holdout_start,
            "end": self.end,
            "widened": list(self.widened),
        }

    @classmethod
    def from_bounds(cls, bounds: dict[str, Any]) -> TrainingWindow:
        return cls(
            float(bounds["start"]),
            tuple(float(c) for c in bounds["cutoffs"]),
            float(bounds["label_seconds"]),
            float(bounds["holdout_start"]),
            float(bounds["end"]),
            tuple(bounds.get("widened", ())),
        )

    def as_dict(self) -> dict[str, Any]:
        from datetime import UTC, datetime

        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")

        return {
            "start": iso(self.start),
            "cutoff": iso(self.cutoff),
            "ranking_cutoffs": [iso(c) for c in self.cutoffs],
            "holdout_start": iso(self.holdout_start),
            "end": iso(self.end),
            "label_days": self.label_seconds / DAY,
            "holdout_days": (self.end - self.holdout_start) / DAY,
            "widened": list(self.widened),
        }


@dataclass
class Interactions:
    """Positive events and impressions in the window, ids still as strings."""

    events: pl.DataFrame  # user_id, item_id, ts, session_id, event_type, value, weight, grade
    impressions: pl.DataFrame  # user_id, item_id, ts, request_id, position, clicked
    window: TrainingWindow
    data: dict[str, Any] = field(default_factory=dict)  # partitions, rows, hashes


# ------------------------------------------------------------------------- reading
def read_weblogs(
    lake: Lake, first_day: str | None = None, last_day: str | None = None
) -> WeblogData:
    """Processed weblogs of the partitions in ``[first_day, last_day]`` (all by default)."""
    days = [
        d
        for d in partition_days(lake)
        if (first_day is None or d >= first_day) and (last_day is None or d <= last_day)
    ]
    frames: list[pl.DataFrame] = []
    rows: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for day in days:
        key = weblogs_key(day)
        path = lake.local_path(key)
        data = path.read_bytes() if path is not None else lake.get_bytes(key)
        hashes[day] = hashlib.sha256(data).hexdigest()[:16]
        frame = pl.read_parquet(io.BytesIO(data), columns=WEBLOG_COLUMNS)
        rows[day] = frame.height
        frames.append(frame)
    if frames:
        frame = pl.concat(frames, how="vertical_relaxed")
    else:
        frame = pl.DataFrame(
            schema={
                "event_type": pl.String,
                "user_id": pl.String,
                "item_id": pl.String,
                "ts": pl.Datetime("us", "UTC"),
                "session_id": pl.String,
                "request_id": pl.String,
                "position": pl.Int32,
                "value": pl.Float64,
            }
        )
    frame = frame.with_columns((pl.col("ts").dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts"))
    return WeblogData(frame, days, rows, hashes)


# What to do about the business rules that quarantine whole datasets.
QUARANTINE_HINTS = {
    "before_catalog_epoch": "events older than RECSYS_CATALOG_EPOCH (1995-01-01 by default): "
    "set it before your first event and ingest again",
    "future_timestamp": "timestamps after now: epoch milliseconds sent as seconds?",
    "bot_rate": "users above RECSYS_BOT_MAX_EVENTS_PER_MINUTE",
}


def quarantined_reasons(lake: Lake) -> dict[str, int]:
    """Rows the weblogs rules quarantined, by reason (to explain an empty window)."""
    counts: dict[str, int] = {}
    for obj in lake.list(f"{WEBLOGS_QUARANTINE_AREA}/"):
        if not obj.key.endswith(".parquet"):
            continue
        reasons = _read(lake, obj.key).get_column("reason")
        for reason, n in reasons.value_counts().iter_rows():
            counts[str(reason)] = counts.get(str(reason), 0) + int(n)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def explain_empty_counts(lake: Lake, rows: int, partitions: int) -> str:
    """Why a window holds no interactions, in one line a user can act on."""
    text = (
        f"no interactions in the training window: the weblogs hold {rows:,} "
        f"events in {partitions} partition(s)"
    )
    quarantined = quarantined_reasons(lake)
    if quarantined:
        total = sum(quarantined.values())
        parts = [
            f"{reason} {n:,}"
            + (f" ({QUARANTINE_HINTS[reason]})" if reason in QUARANTINE_HINTS else "")
            for reason, n in quarantined.items()
        ]
        return f"{text}, and {total:,} were quarantined by the weblogs rules: " + "; ".join(parts)
    return (
        f"{text}: ingest weblogs first (`recsys ingest FILE` or POST /events, then "
        "`recsys process`)"
    )


def read_catalog(lake: Lake) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The document store's snapshots (``item_catalog`` / ``user_profiles`` assets).

    Either may be missing (no catalogue loaded yet): training then knows items only
    from the logs, without categories or publication dates.
    """
    items_schema = {
        "item_id": pl.String,
        "title": pl.String,
        "categories": pl.List(pl.String),
        "published_at": pl.Float64,
    }
    items = pl.DataFrame(schema=items_schema)
    if lake.exists(CATALOG_ITEMS_KEY):
        raw = _read(lake, CATALOG_ITEMS_KEY)
        cols = [c for c in items_schema if c in raw.columns]
        raw = raw.select(cols)
        if "published_at" in raw.columns and raw.schema["published_at"] != pl.Float64:
            dtype = raw.schema["published_at"]
            if isinstance(dtype, pl.Datetime):
                raw = raw.with_columns(pl.col("published_at").dt.epoch("us").cast(pl.Float64) / 1e6)
            else:
                raw = raw.with_columns(pl.col("published_at").cast(pl.Float64, strict=False))
        for name, dtype in items_schema.items():
            if name not in raw.columns:
                raw = raw.with_columns(pl.lit(None, dtype=dtype).alias(name))
        items = raw.select(list(items_schema)).cast(items_schema)  # type: ignore[arg-type]
        items = items.unique("item_id", keep="last", maintain_order=True)
    users = pl.DataFrame(schema={"user_id": pl.String})
    if lake.exists(CATALOG_USERS_KEY):
        users = _read(lake, CATALOG_USERS_KEY).select(pl.col("user_id").cast(pl.String)).unique()
    return items, users


def _read(lake: Lake, key: str) -> pl.DataFrame:
    path = lake.local_path(key)
    if path is not None:
        return pl.read_parquet(path)
    return pl.read_parquet(io.BytesIO(lake.get_bytes(key)))


# -------------------------------------------------------------------- interactions
def event_weights(params: TrainingParams) -> pl.Expr:
    lo, hi = params.rating_scale
    span = max(hi - lo, 1e-9)
    rating = params.rating_min_weight + (
        (pl.col("value").fill_null((lo + hi) / 2).clip(lo, hi) - lo) / span
    ) * (params.rating_max_weight - params.rating_min_weight)
    expr = pl.when(pl.col("event_type") == "rating").then(rating)
    for name, weight in params.event_weights.items():
        expr = expr.when(pl.col("event_type") == name).then(pl.lit(weight))
    return expr.otherwise(pl.lit(0.0)).cast(pl.Float32)


def event_grades(params: TrainingParams) -> pl.Expr:
    expr = pl.when(pl.col("event_type") == "rating").then(
        pl.when(pl.col("value").fill_null(0) >= params.rating_good).then(2).otherwise(1)
    )
    for name, grade in params.label_grades.items():
        expr = expr.when(pl.col("event_type") == name).then(pl.lit(grade))
    return expr.otherwise(pl.lit(0)).cast(pl.Int8)


def build_interactions(weblogs: WeblogData, params: TrainingParams) -> Interactions:
    """Weighted positives and labelled impressions in the window; raises on thin data."""
    frame = weblogs.frame
    if params.train_window_days is not None and frame.height:
        last = float(frame["ts"].max())  # type: ignore[arg-type]
        frame = frame.filter(pl.col("ts") >= last - params.train_window_days * DAY)
    positives = (
        frame.filter(pl.col("event_type") != "impression")
        .with_columns(weight=event_weights(params), grade=event_grades(params))
        .filter(pl.col("weight") > 0)
        .select("user_id", "item_id", "ts", "session_id", "event_type", "value", "weight", "grade")
        .sort("ts", "user_id", "item_id", maintain_order=True)
    )
    window = compute_window(positives["ts"].to_numpy(), positives, params)
    clicks = (
        frame.filter((pl.col("event_type") == "click") & pl.col("request_id").is_not_null())
        .select("request_id", "item_id")
        .unique()
        .with_columns(pl.lit(True).alias("clicked"))
    )
    impressions = (
        frame.filter(pl.col("event_type") == "impression")
        .select("user_id", "item_id", "ts", "request_id", "position")
        .join(clicks, on=["request_id", "item_id"], how="left")
        .with_columns(pl.col("clicked").fill_null(False))
        .sort("ts", "user_id", "item_id", maintain_order=True)
    )
    return Interactions(
        events=positives,
        impressions=impressions,
        window=window,
        data={
            "partitions": weblogs.partitions,
            "rows": weblogs.rows,
            "content_hashes": weblogs.content_hashes,
            "events": positives.height,
            "impressions": impressions.height,
            "users": positives["user_id"].n_unique(),
            "items": positives["item_id"].n_unique(),
        },
    )


def compute_window(
    ts: npt.NDArray[np.float64], positives: pl.DataFrame, params: TrainingParams
) -> TrainingWindow:
    """Cut the window; widen label and holdout segments that hold too few events."""
    n = ts.size
    if n == 0:
        raise TrainingDataError(
            "no interactions in the training window: ingest weblogs first "
            "(`recsys ingest FILE` or POST /events, then `recsys process`)"
        )
    ts = np.sort(ts)
    start, end = float(ts[0]), float(ts[-1]) + 1.0
    widened: list[str] = []
    holdout = end - params.holdout_days * DAY
    by_share = float(np.quantile(ts, 1.0 - params.min_holdout_share))
    if by_share < holdout:
        holdout = by_share
        widened.append("holdout")
    label = params.label_days * DAY
    before = ts[ts < holdout]
    want = min(before.size - 1, max(1, round(params.min_label_share * n)))
    if want > 0:
        # The newest label segment must hold min_label_share of all events.
        needed = holdout - float(before[before.size - want])
        if needed > label:
            label = needed
            widened.append("label")
    cutoffs = [holdout - label]
    for _ in range(1, max(params.rank_cutoffs, 1)):
        older = cutoffs[-1] - label
        # An older cut-off needs a history to learn from and events to label.
        history = int((ts < older).sum())
        labelled = int(((ts >= older) & (ts < cutoffs[-1])).sum())
        if history < params.min_events or labelled == 0:
            break
        cutoffs.append(older)
    window = TrainingWindow(start, tuple(cutoffs), label, holdout, end, tuple(widened))
    _check_segments(window, positives, params)
    return window


def _check_segments(
    window: TrainingWindow, positives: pl.DataFrame, params: TrainingParams
) -> None:
    ts = pl.col("ts")
    train = positives.filter(ts < window.cutoff)
    label = positives.filter((ts >= window.cutoff) & (ts < window.holdout_start))
    holdout = positives.filter(ts >= window.holdout_start)
    problems = []
    if train.height < params.min_events:
        problems.append(
            f"{train.height} events before the ranking cut-off (need {params.min_events})"
        )
    n_users, n_items = train["user_id"].n_unique(), train["item_id"].n_unique()
    if n_users < params.min_users:
        problems.append(f"{n_users} users before the cut-off (need {params.min_users})")
    if n_items < params.min_items:
        problems.append(f"{n_items} items before the cut-off (need {params.min_items})")
    if label.height == 0:
        problems.append("no events in the label segment")
    if holdout.height == 0:
        problems.append("no events in the holdout segment")
    if problems:
        w = window.as_dict()
        raise TrainingDataError(
            f"training window {w['start']}..{w['end']} is too small to train a model: "
            + "; ".join(problems)
            + f" ({positives.height} positive events in total; holdout from "
            f"{w['holdout_start']}, labels from {w['cutoff']})"
        )


# ---------------------------------------------------------------------- vocabulary
@dataclass
class Vocabulary:
    """Row numbers for ids: items from the catalogue and the logs, users from the logs."""

    item_ids: npt.NDArray[np.str_]
    user_ids: npt.NDArray[np.str_]
    categories: npt.NDArray[np.str_]
    item_categories: list[list[int]]
    published_at: npt.NDArray[np.float64]
    in_catalog: npt.NDArray[np.bool_]
    stats: dict[str, int]

    def item_categories_ragged(self) -> Ragged:
        return Ragged.from_lists(
            [
                (np.asarray(c, dtype=np.int64), np.ones(len(c), dtype=np.float32))
                for c in self.item_categories
            ]
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "item_ids": self.item_ids,
            "user_ids": self.user_ids,
            "categories": self.categories,
            **pack_ragged("item_categories", self.item_categories_ragged()),
            "published_at": self.published_at,
            "in_catalog": self.in_catalog,
            **pack_meta({"stats": self.stats}),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Vocabulary:
        cats = unpack_ragged("item_categories", arrays)
        return cls(
            item_ids=arrays["item_ids"],
            user_ids=arrays["user_ids"],
            categories=arrays["categories"],
            item_categories=[cats.row(r)[0].tolist() for r in range(cats.n_rows)],
            published_at=arrays["published_at"],
            in_catalog=arrays["in_catalog"],
            stats=unpack_meta(arrays)["stats"],
        )


def build_vocabulary(interactions: Interactions, items: pl.DataFrame) -> Vocabulary:
    logged_items = pl.concat(
        [interactions.events.select("item_id"), interactions.impressions.select("item_id")]
    ).unique()
    users = interactions.events["user_id"].unique().sort()
    return vocabulary_from_ids(logged_items["item_id"], users, items)


def vocabulary_from_ids(
    logged_items: pl.Series, users: pl.Series, items: pl.DataFrame
) -> Vocabulary:
    """The vocabulary from the distinct logged item ids, the sorted distinct ids of users
    with positives and the catalogue (what :func:`build_vocabulary` and the streaming
    ``prepare`` path both reduce the window to)."""
    catalog_ids = set(items["item_id"].to_list())
    logged = set(logged_items.to_list())
    item_ids = np.asarray(sorted(catalog_ids | logged), dtype=str)
    user_ids = users.to_numpy().astype(str)

    categories = sorted(
        {c for cats in items["categories"].to_list() for c in (cats or []) if c is not None}
    )
    cat_index = {c: i for i, c in enumerate(categories)}
    by_item = dict(zip(items["item_id"].to_list(), items["categories"].to_list(), strict=True))
    published = dict(zip(items["item_id"].to_list(), items["published_at"].to_list(), strict=True))
    item_categories: list[list[int]] = []
    published_at = np.full(item_ids.size, np.nan, dtype=np.float64)
    for row, item in enumerate(item_ids.tolist()):
        cats = by_item.get(item) or []
        item_categories.append(list(dict.fromkeys(cat_index[c] for c in cats if c in cat_index)))
        value = published.get(item)
        if value is not None and np.isfinite(value):
            published_at[row] = float(value)
    in_catalog = np.asarray([i in catalog_ids for i in item_ids.tolist()], dtype=bool)
    return Vocabulary(
        item_ids=item_ids,
        user_ids=user_ids,
        categories=np.asarray(categories, dtype=str),
        item_categories=item_categories,
        published_at=published_at,
        in_catalog=in_catalog,
        stats={
            "items": int(item_ids.size),
            "users": int(user_ids.size),
            "categories": len(categories),
            "catalog_items": len(catalog_ids),
            "logged_items_missing_from_catalog": len(logged - catalog_ids) if catalog_ids else 0,
            "catalog_items_never_logged": len(catalog_ids - logged),
        },
    )


@dataclass
class Encoded:
    """Interactions as integer rows of the vocabulary, sorted by time."""

    user: npt.NDArray[np.int64]
    item: npt.NDArray[np.int64]
    ts: npt.NDArray[np.float64]
    weight: npt.NDArray[np.float32]
    grade: npt.NDArray[np.int8]
    session: npt.NDArray[np.int64]
    rating: npt.NDArray[np.float64]  # NaN unless a rating event
    # Impressions are most of a clickstream (9 in 10 events in the simulated one), so
    # their codes are int32: nothing multiplies them into a wider key.
    imp_user: npt.NDArray[np.int32]
    imp_item: npt.NDArray[np.int32]
    imp_ts: npt.NDArray[np.float64]
    imp_clicked: npt.NDArray[np.bool_]
    imp_position: npt.NDArray[np.int32]
    imp_request: npt.NDArray[np.int32]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Encoded:
        return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})


# Rows per slice when a step scans every impression (9 in 10 events of a clickstream,
# 90M rows at 100M events): a mask or a copy of one slice is a few MB, of the whole
# array a gigabyte of temporaries on top of the window itself.
IMPRESSION_SLICE = 1 << 22


def impression_slices(n: int, size: int | None = None) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, ``size`` rows each (default
    ``IMPRESSION_SLICE``, read at each call; the last slice is shorter)."""
    size = size or IMPRESSION_SLICE
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def encode(interactions: Interactions, vocab: Vocabulary) -> Encoded:
    users = pl.DataFrame(
        {"user_id": vocab.user_ids, "u": np.arange(vocab.user_ids.size, dtype=np.int64)}
    )
    items = pl.DataFrame(
        {"item_id": vocab.item_ids, "i": np.arange(vocab.item_ids.size, dtype=np.int64)}
    )
    ev = (
        interactions.events.with_row_index("_n")
        .join(users, on="user_id", how="left")
        .join(items, on="item_id", how="left")
        .sort("_n")
        .with_columns(
            pl.col("session_id")
            .fill_null(pl.col("user_id"))
            .rank("dense")
            .cast(pl.Int64)
            .alias("s"),
            pl.when(pl.col("event_type") == "rating")
            .then(pl.col("value"))
            .otherwise(None)
            .cast(pl.Float64)
            .alias("rating"),
        )
    )
    imp = (
        interactions.impressions.with_row_index("_n")
        .join(users, on="user_id", how="left")
        .join(items, on="item_id", how="left")
        .sort("_n")
        .with_columns(
            pl.col("u").fill_null(-1),
            pl.col("request_id")
            .fill_null(pl.col("user_id"))
            .rank("dense")
            .cast(pl.Int64)
            .alias("r"),
        )
    )
    return Encoded(
        user=ev["u"].to_numpy().astype(np.int64),
        item=ev["i"].to_numpy().astype(np.int64),
        ts=ev["ts"].to_numpy().astype(np.float64),
        weight=ev["weight"].to_numpy().astype(np.float32),
        grade=ev["grade"].to_numpy().astype(np.int8),
        session=ev["s"].to_numpy().astype(np.int64),
        rating=ev["rating"].to_numpy().astype(np.float64),
        imp_user=imp["u"].to_numpy().astype(np.int32),
        imp_item=imp["i"].to_numpy().astype(np.int32),
        imp_ts=imp["ts"].to_numpy().astype(np.float64),
        imp_clicked=imp["clicked"].to_numpy().astype(bool),
        imp_position=imp["position"].fill_null(-1).to_numpy().astype(np.int32),
        imp_request=imp["r"].to_numpy().astype(np.int32),
    )
