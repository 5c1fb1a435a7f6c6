"""The ``interactions`` step in bounded memory: weblogs partitions -> vocabulary + encoding.

:func:`recsys_assets.training.data.build_interactions` and friends hold the whole
window as string columns (ids, sessions, requests, event types): about 300 bytes an
event, which put the 10M-event window at 3.2 GB and 100M past this machine. Here the
partitions are scanned lazily by polars' streaming engine, which only ever holds a
morsel of strings: the small dictionaries (users, items, sessions, requests) are
collected first, then every event is collected as integer codes of those
dictionaries (int32) plus its time and weight, about 30 bytes an event.

The output is exactly what the in-memory path produces (same vocabulary, same rows in
the same order, same window), which ``tests/assets/training/test_training_prepare.py`` checks on a
simulated world: the dictionaries are sorted the way the in-memory path sorts ids, so
sorting by code is sorting by id, and ties keep the log order through a row number.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_assets.training.data import (
    DAY,
    WEBLOG_COLUMNS,
    Encoded,
    TrainingWindow,
    Vocabulary,
    compute_window,
    event_grades,
    event_weights,
    vocabulary_from_ids,
)
from recsys_assets.training.params import TrainingParams
from recsys_assets.weblogs.processing import WEBLOGS_SCHEMA
from recsys_serving.lake import Lake
from recsys_serving.layout import weblogs_key
from recsys_serving.logging import get_logger

log = get_logger(__name__)

# The weblogs columns training reads, as the weblogs asset writes them.
SCAN_SCHEMA: dict[str, pl.DataType] = {name: WEBLOGS_SCHEMA[name] for name in WEBLOG_COLUMNS}
STREAMING = "streaming"


@dataclass
class PreparedWindow:
    """What the ``interactions`` step stores: vocabulary, encoding, window, statistics."""

    vocab: Vocabulary
    enc: Encoded
    window: TrainingWindow
    data: dict[str, Any]
    event_types: dict[str, int]
    impressions_clicked: int


@dataclass
class ScannedWeblogs:
    """The window's partitions as lazy frames (``ts`` in epoch seconds, ``_n`` the row
    number in log order), and what the bundle manifest records about them."""

    parts: list[pl.LazyFrame]  # one per partition, in order
    partitions: list[str]
    rows: dict[str, int]
    content_hashes: dict[str, str]

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def frame(self) -> pl.LazyFrame:
        """All partitions as one lazy frame."""
        return pl.concat(self.parts, how="vertical")


@contextmanager
def scan_weblogs(lake: Lake, days: list[str]) -> Iterator[ScannedWeblogs]:
    """Scan the processed partitions of ``days`` without reading them into memory.

    A remote lake's partitions are downloaded one at a time to a temporary directory
    first (removed on exit), so memory holds one partition's bytes at most.
    """
    tmp: Path | None = None
    try:
        paths: list[Path] = []
        rows: dict[str, int] = {}
        hashes: dict[str, str] = {}
        for day in days:
            key = weblogs_key(day)
            path = lake.local_path(key)
            if path is None:
                if tmp is None:
                    tmp = Path(tempfile.mkdtemp(prefix="recsys-weblogs-"))
                path = tmp / f"{day}.parquet"
                path.write_bytes(lake.get_bytes(key))
            with path.open("rb") as fh:
                hashes[day] = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
            rows[day] = int(pl.scan_parquet(path).select(pl.len()).collect().item())
            paths.append(path)
        # One scan per file, each cast to one schema: partitions written by older code
        # may differ in a column's width, which a multi-file scan would refuse.
        # ``_n`` numbers rows across files in log order (partition, then file order).
        parts: list[pl.LazyFrame] = []
        offset = 0
        for path, day in zip(paths, days, strict=True):
            parts.append(
                pl.scan_parquet(path)
                .select([pl.col(name).cast(dtype) for name, dtype in SCAN_SCHEMA.items()])
                .with_columns((pl.col("ts").dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts"))
                .with_row_index("_n", offset=offset)
            )
            offset += rows[day]
        if not parts:
            empty = pl.LazyFrame(schema=SCAN_SCHEMA).with_columns(  # type: ignore[arg-type]
                pl.col("ts").dt.epoch("us").cast(pl.Float64).alias("ts")
            )
            parts.append(empty.with_row_index("_n"))
        yield ScannedWeblogs(parts, list(days), rows, hashes)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _codes(values: pl.LazyFrame, name: str, code: str) -> pl.DataFrame:
    """Sorted distinct values of ``name`` with their row number as ``code`` (int32)."""
    return (
        values.select(pl.col(name))
        .unique()
        .collect(engine=STREAMING)
        .sort(name)
        .with_row_index(code)
        .with_columns(pl.col(code).cast(pl.Int32))
    )


def prepare_interactions(
    scanned: ScannedWeblogs, items_catalog: pl.DataFrame, params: TrainingParams
) -> PreparedWindow:
    """The encoded window, vocabulary and statistics, in bounded memory.

    Raises :class:`~recsys_assets.training.data.TrainingDataError` as
    ``build_interactions`` does (an empty window says ``no interactions ...``).
    """
    since: float | None = None
    if params.train_window_days is not None and scanned.total_rows:
        last = scanned.frame.select(pl.col("ts").max()).collect(engine=STREAMING).item()
        if last is not None:
            since = float(last) - params.train_window_days * DAY
    event = pl.col("event_type")

    def window(part: pl.LazyFrame) -> pl.LazyFrame:
        return part if since is None else part.filter(pl.col("ts") >= since)

    def positives_of(part: pl.LazyFrame) -> pl.LazyFrame:
        return (
            window(part)
            .filter(event != "impression")
            .with_columns(weight=event_weights(params), grade=event_grades(params))
            .filter(pl.col("weight") > 0)
            .with_columns(pl.col("session_id").fill_null(pl.col("user_id")).alias("_sid"))
        )

    def impressions_of(part: pl.LazyFrame) -> pl.LazyFrame:
        return (
            window(part)
            .filter(event == "impression")
            .with_columns(pl.col("request_id").fill_null(pl.col("user_id")).alias("_rid"))
        )

    frame = window(scanned.frame)
    positives = pl.concat([positives_of(p) for p in scanned.parts])
    impressions = pl.concat([impressions_of(p) for p in scanned.parts])
    # Dictionaries: small (distinct ids), collected by the streaming engine.
    users_all = _codes(
        pl.concat([positives.select("user_id"), impressions.select("user_id")]), "user_id", "ua"
    )
    positive_users = positives.select("user_id").unique().collect(engine=STREAMING)
    logged_items = (
        pl.concat([positives.select("item_id"), impressions.select("item_id")])
        .unique()
        .collect(engine=STREAMING)
    )
    vocab = vocabulary_from_ids(
        logged_items["item_id"], positive_users["user_id"].sort(), items_catalog
    )
    items = pl.DataFrame(
        {"item_id": vocab.item_ids, "i": np.arange(vocab.item_ids.size, dtype=np.int32)}
    ).lazy()
    users = users_all.with_columns(
        pl.col("user_id").is_in(positive_users["user_id"].implode()).alias("_pos")
    )
    # A user's vocabulary row: its rank among users with positives (-1: none).
    users = users.with_columns(
        pl.when(pl.col("_pos"))
        .then(pl.col("_pos").cast(pl.Int32).cum_sum() - 1)
        .otherwise(-1)
        .cast(pl.Int32)
        .alias("u")
    ).select("user_id", "ua", "u")
    sessions = _codes(positives.select("_sid"), "_sid", "s")
    requests = _codes(impressions.select("_rid"), "_rid", "r")
    del positive_users, logged_items, users_all

    event_types = sorted({"rating", *params.event_weights})
    # Events are collected one partition at a time: the streaming engine's buffers and
    # join state then follow a partition, and only the compact result accumulates.
    ev = _collect_parts(
        lambda part: (
            positives_of(part)
            .join(users.lazy(), on="user_id", how="left")
            .join(items, on="item_id", how="left")
            .join(sessions.lazy(), on="_sid", how="left")
            .select(
                "_n",
                "ts",
                "ua",
                "u",
                "i",
                (pl.col("s") + 1).alias("s"),
                "weight",
                "grade",
                pl.when(event == "rating").then(pl.col("value")).cast(pl.Float64).alias("rating"),
                event.cast(pl.Enum(event_types)).alias("event_type"),
            )
        ),
        scanned.parts,
    )

    clicks = (
        frame.filter((event == "click") & pl.col("request_id").is_not_null())
        .select(pl.col("request_id").alias("_rid"), "item_id")
        .join(requests.lazy(), on="_rid", how="inner")
        .join(items, on="item_id", how="inner")
        .select((pl.col("r") + 1).alias("r"), "i")
        .unique()
        .with_columns(pl.lit(True).alias("clicked"))
        # Whole-window (a click may land in the partition after its impression).
        .collect(engine=STREAMING)
        .lazy()
    )
    imp = _collect_parts(
        lambda part: (
            impressions_of(part)
            .join(users.lazy(), on="user_id", how="left")
            .join(items, on="item_id", how="left")
            .join(requests.lazy(), on="_rid", how="left")
            .select(
                "_n",
                "ts",
                "ua",
                "u",
                "i",
                (pl.col("r") + 1).alias("r"),
                pl.col("request_id").is_not_null().alias("_has_request"),
                pl.col("position").fill_null(-1).cast(pl.Int32).alias("position"),
            )
            .join(clicks, on=["r", "i"], how="left")
            .select(
                "_n",
                "ts",
                "ua",
                "u",
                "i",
                "r",
                "position",
                # A null request_id never matched a click in the in-memory path.
                (pl.col("clicked").fill_null(False) & pl.col("_has_request")).alias("clicked"),
            )
        ),
        scanned.parts,
    )

    n_impressions = imp.height
    held = [imp]
    del imp
    imp_arrays = _sorted_arrays(
        held,
        (
            ("imp_ts", "ts", np.float64),
            ("imp_user", "u", np.int32),
            ("imp_item", "i", np.int32),
            ("imp_request", "r", np.int32),
            ("imp_position", "position", np.int32),
            ("imp_clicked", "clicked", np.bool_),
        ),
    )
    n_events = ev.height
    counts = ev.group_by("event_type").len().sort(pl.col("event_type").cast(pl.String))
    event_counts = {str(k): int(v) for k, v in counts.iter_rows()}
    n_items = int(ev["i"].n_unique()) if n_events else 0
    held = [ev]
    del ev
    ev_arrays = _sorted_arrays(
        held,
        (
            ("ts", "ts", np.float64),
            ("user", "u", np.int64),
            ("item", "i", np.int64),
            ("weight", "weight", np.float32),
            ("grade", "grade", np.int8),
            ("session", "s", np.int64),
            ("rating", "rating", np.float64),
        ),
    )
    ts = ev_arrays["ts"]
    codes = pl.DataFrame({"ts": ts, "user_id": ev_arrays["user"], "item_id": ev_arrays["item"]})
    window = compute_window(ts, codes, params)
    del codes
    enc = Encoded(**ev_arrays, **imp_arrays)
    data = {
        "partitions": scanned.partitions,
        "rows": scanned.rows,
        "content_hashes": scanned.content_hashes,
        "events": n_events,
        "impressions": n_impressions,
        "users": int(vocab.user_ids.size),
        "items": n_items,
    }
    clicked = int(enc.imp_clicked.sum())
    log.info(
        "training.prepare",
        events=n_events,
        impressions=n_impressions,
        users=int(vocab.user_ids.size),
        items=int(vocab.item_ids.size),
    )
    return PreparedWindow(vocab, enc, window, data, event_counts, clicked)


def _collect_parts(
    plan: Callable[[pl.LazyFrame], pl.LazyFrame], parts: list[pl.LazyFrame]
) -> pl.DataFrame:
    """``plan`` collected for each partition by the streaming engine, concatenated."""
    frames = [plan(part).collect(engine=STREAMING) for part in parts]
    return pl.concat(frames, how="vertical", rechunk=False)


def _sorted_arrays(
    frames: list[pl.DataFrame], columns: tuple[tuple[str, str, type], ...]
) -> dict[str, np.ndarray]:
    """Columns as numpy arrays in the in-memory path's order: its stable sort by
    (ts, user_id, item_id). Ids are codes of sorted dictionaries (``ua``, ``i``) and
    ``_n`` is the log order.

    The frame is taken out of ``frames`` (so no caller keeps it alive) and gathered one
    column at a time, each dropped once copied: sorting the frame would copy it whole.
    """
    frame = frames.pop()
    # The sort keys contiguous first: on the per-partition chunks, every tie-break
    # compare looks the row up chunk by chunk, which stalled 100M events for minutes.
    keys = frame.select("ts", "ua", "i", "_n").rechunk()
    order = keys.select(pl.arg_sort_by("ts", "ua", "i", "_n")).to_series().to_numpy()
    del keys
    frame = frame.drop("_n", "ua")
    out: dict[str, np.ndarray] = {}
    for name, column, dtype in columns:
        values = frame.get_column(column)
        # Floats keep their nulls as NaN; integer codes have none (a null would be -1).
        keep = values.dtype.is_float() or values.null_count() == 0
        array = (values if keep else values.fill_null(-1)).to_numpy()
        out[name] = array.astype(dtype, copy=False)[order]
        frame = frame.drop(column)
        del values, array
    return out
