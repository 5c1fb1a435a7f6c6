"""Great-expectations suites for processed weblogs, kept in code.

Each Dagster asset check maps to one GX suite so a failure in the UI names the
rule that broke. GX stays the engine that decides every check; polars only
prepares what each suite reads, so a 10M-event backfill is validated in seconds:

* row-level suites (``required_columns_not_null``, ``event_type_allowed``,
  ``ts_inside_partition``) judge every processed row, but GX only sees the rows that
  can break them: polars picks, per partition, the rows with a null in a required
  column, an ``event_type`` outside the allowed set, a timestamp outside its day
  (exactly the rows each expectation counts as unexpected; nulls are ignored by the
  set and range expectations, as in GX). What GX reports from those rows (the
  unexpected count, the examples, success) is what it reported from the whole frame,
  where the other rows only added to the row count, which is kept beside. A clean
  partition (the usual case) costs GX nothing: running the suites on the whole frame
  cost more than processing itself (GX fingerprints every batch by hashing it, and
  its metrics walk every value), and shipping the frames to its process cost more
  again. The candidate rows keep the columns and types GX saw before: ``event_type``
  as a categorical, ``ts`` as epoch microseconds, the seconds into the partition as
  floats, the id columns as their byte lengths with nulls kept (a not-null
  expectation depends on nullity alone);
* per-partition suites see one row of polars-computed figures per partition, as
  their expectations are about the output as a whole: how many ``event_id``\\ s
  repeat in it, and two *rates* of benign row-level anomalies, which are accounted
  for. A click that matches no impression logged for its ``request_id`` and
  ``item_id`` is kept (unattributed; clients lose impressions, and a request can
  straddle midnight) and counted; a replayed event (a resend, a file ingested twice)
  is quarantined as ``duplicate_event_id`` and counted. Only a *rate* past its
  threshold (settings) fails, and only in a partition with at least ``min_rows`` rows
  in the rate's denominator. Replays never count towards a rate: dedup makes them
  harmless. Conflicting ids (one ``event_id``, different events) do, as every copy but
  the first is a real event lost. These two rate checks warn and never block
  (``CLIENT_BEHAVIOUR_CHECKS``): what one client does wrong must not halt the
  partition for the others.

Every check records how many rows broke it, two examples and what to do
(``unexpected``, ``examples``, ``remedy`` in its metadata), which is the one line
the CLI prints for a failed check.

Partitions are reduced to these inputs as they are processed and validated while
processing goes on (see :class:`WeblogValidator` for where), in batches of
partitions of ``batch_rows`` processed rows: the suites have a fixed cost of ~0.06 s
each per batch, which would dominate a year of small daily partitions (or 30 days of
large ones, one batch each). A batch holds only its candidate rows and one row of
figures per partition, so memory stays bounded by ``batch_rows`` candidate rows at
most, not by the length of the backfill.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import threading
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from recsys_assets.weblogs.processing import EventIdCounts
from recsys_serving.events.schema import EVENT_TYPES
from recsys_serving.layout import day_start

REQUIRED_COLUMNS = ("event_id", "event_type", "user_id", "item_id", "ts")

CHECK_DESCRIPTIONS: dict[str, str] = {
    "required_columns_not_null": "event_id, event_type, user_id, item_id and ts are never null.",
    "event_type_allowed": f"event_type is one of {', '.join(EVENT_TYPES)}.",
    "ts_inside_partition": "Every event's timestamp falls on its partition's date (UTC).",
    "event_ids_unique": (
        "Every event_id appears once in the processed partition (replayed copies are "
        "quarantined as duplicate_event_id and counted in metadata)."
    ),
    "unattributed_click_rate_below_threshold": (
        "Clicks that name a request_id but match no impression logged for that request and "
        "item are kept as unattributed and counted; their share of such clicks stays at or "
        "below RECSYS_MAX_UNATTRIBUTED_CLICK_RATE in every partition with at least "
        "RECSYS_MIN_ROWS_FOR_RATE_CHECKS of them."
    ),
    "conflicting_duplicate_rate_below_threshold": (
        "The share of a partition's event_ids that landed as different events (a client "
        "reusing ids: every copy but the first is lost) stays at or below "
        "RECSYS_MAX_DUPLICATE_RATE in every partition with at least "
        "RECSYS_MIN_ROWS_FOR_RATE_CHECKS ids. Replays of the same event never count."
    ),
}

# Checks on what clients do rather than on what processing wrote: a client reusing
# event ids or losing impressions is a fault of that client, accounted for row by row
# (quarantined or kept as unattributed), so these warn (in the UI, the run's log and
# the CLI) and never halt the partition for every other client. The other checks guard
# the output's own integrity and block what reads it.
CLIENT_BEHAVIOUR_CHECKS = frozenset(
    {"unattributed_click_rate_below_threshold", "conflicting_duplicate_rate_below_threshold"}
)

# What to do when a check fails: the end of the one line the CLI prints.
REMEDIES: dict[str, str] = {
    "required_columns_not_null": (
        "processing quarantines such rows, so this is a bug: report it with the run id"
    ),
    "event_type_allowed": (
        "processing quarantines such rows, so this is a bug: report it with the run id"
    ),
    "ts_inside_partition": (
        "processing quarantines such rows, so this is a bug: report it with the run id"
    ),
    "event_ids_unique": "dedup let copies through, a bug: report it with the run id",
    "unattributed_click_rate_below_threshold": (
        "check that the service still logs impressions and that clients echo the request_id "
        "they were served; if this loss is expected, raise RECSYS_MAX_UNATTRIBUTED_CLICK_RATE"
    ),
    "conflicting_duplicate_rate_below_threshold": (
        "a client sends different events under one event_id (later copies are quarantined "
        "as duplicate_event_id): fix its id generation, or raise RECSYS_MAX_DUPLICATE_RATE"
    ),
}

# The suites that judge rows (GX sees each one's candidate rows); the others judge
# one row of figures per partition (and, per partition, which column).
ROW_SUITES = ("required_columns_not_null", "event_type_allowed", "ts_inside_partition")
PARTITION_COLUMNS: dict[str, str] = {
    "event_ids_unique": "output_duplicates",
    "unattributed_click_rate_below_threshold": "unattributed_rate",
    "conflicting_duplicate_rate_below_threshold": "conflicting_rate",
}
# Per check, the per-partition count of offending rows and the counts totalled in
# metadata whether the check passed or not (the accounting of benign anomalies).
PARTITION_COUNTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "event_ids_unique": ("output_duplicates", ()),
    "unattributed_click_rate_below_threshold": (
        "unattributed_clicks",
        ("unattributed_clicks", "clicks_with_request_id"),
    ),
    "conflicting_duplicate_rate_below_threshold": (
        "conflicting_event_ids",
        ("conflicting_event_ids", "replayed_duplicates", "landed_event_ids"),
    ),
}


# Processed rows per validated batch; a run that fills one validates in a process.
BATCH_ROWS = 2_000_000


@dataclass(frozen=True)
class Thresholds:
    """The settings the per-partition suites judge by (one GX suite set per value)."""

    max_duplicate_rate: float = 0.05
    max_unattributed_click_rate: float = 0.5
    min_rows: int = 100


@dataclass
class CheckOutcome:
    name: str
    passed: bool = True
    batches: int = 0
    failed_partitions: list[str] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)

    def add(self, passed: bool, partitions: list[str], observed: dict[str, Any]) -> None:
        first_failure = not passed and self.passed
        self.batches += 1
        if not passed:
            self.passed = False
            self.failed_partitions.extend(partitions)
            self.observed["remedy"] = REMEDIES[self.name]
        for key, value in observed.items():
            if key == "examples":
                if first_failure or key not in self.observed:
                    self.observed[key] = value
            elif isinstance(value, int | float) and isinstance(self.observed.get(key), int | float):
                if key.startswith("max_") or key.endswith("_rate"):
                    self.observed[key] = max(self.observed[key], value)
                else:
                    self.observed[key] = self.observed[key] + value
            elif key not in self.observed:
                self.observed[key] = value


def failure_line(name: str, observed: dict[str, Any], partitions: list[str]) -> str:
    """One line for a failed check: which, how many rows, two examples, what to do."""
    count = observed.get("unexpected", 0)
    more = f" (+{len(partitions) - 3})" if len(partitions) > 3 else ""
    where = ", ".join(partitions[:3]) + more
    examples = "; ".join(str(e) for e in (observed.get("examples") or [])[:2])
    rates = [v for k, v in observed.items() if k.startswith("max_") and k.endswith("_rate")]
    rate = f" (rate {rates[0]:.2%})" if rates else ""
    parts = [f"check {name} failed: {count:,} rows{rate}" + (f" in {where}" if where else "")]
    if examples:
        parts.append(f"e.g. {examples}")
    parts.append(f"to do: {observed.get('remedy') or REMEDIES.get(name, 'see the Dagster UI')}")
    return "; ".join(parts)


@dataclass
class _Batch:
    """Compact check inputs of one or more partitions, in processing order."""

    partitions: list[str] = field(default_factory=list)
    # Per row-level suite, the rows that can break it (see the module's docstring).
    candidates: dict[str, list[pl.DataFrame]] = field(
        default_factory=lambda: {name: [] for name in ROW_SUITES}
    )
    figures: list[dict[str, Any]] = field(default_factory=list)  # one per partition
    row_count: int = 0


class WeblogValidator:
    """Runs the weblog expectation suites over processed partitions, batch by batch.

    Call :meth:`add_partition` for every partition (in any order), then
    :meth:`finish`, which returns one :class:`CheckOutcome` per check (also kept in
    ``outcomes``); after a failed run call :meth:`close` instead.

    Where GX runs depends on the size of the run, decided when the first batch is
    full (so a run of ``batch_rows`` or more) or at :meth:`finish` (a smaller run):

    * a large run validates in a worker process of its own: GX's pandas engine is
      Python-heavy, and in a thread it holds the GIL the processing pipeline needs
      between polars calls (measured on 10M events: 1.2 of 2 cores busy instead of
      1.9). The worker imports GX while processing goes on; up to ``max_in_flight``
      batches (candidate rows and figures) wait for it, which bounds memory and applies
      back-pressure. It is shut down by :meth:`finish` / :meth:`close`, and at
      process exit at the latest (before ``multiprocessing`` joins children, which
      would otherwise wait forever in a Dagster step process);
    * a small run validates on a thread of this process, where GX is imported once
      and its suites are built once per threshold, so frequent small runs (sensor
      ticks, tests) do not pay a new interpreter and a new GX import each time.
    """

    def __init__(
        self,
        max_duplicate_rate: float,
        batch_rows: int = BATCH_ROWS,
        max_in_flight: int = 8,
        *,
        max_unattributed_click_rate: float = 0.5,
        min_rows: int = 100,
    ) -> None:
        self.thresholds = Thresholds(max_duplicate_rate, max_unattributed_click_rate, min_rows)
        self.batch_rows = batch_rows
        self.max_in_flight = max_in_flight
        self.outcomes = {name: CheckOutcome(name) for name in CHECK_DESCRIPTIONS}
        self.worker: str | None = None  # "process" or "thread", once decided
        self.prestarted = False  # the process was started ahead (prestart_worker)
        self._prestarted_owner: _Prestarted | None = None
        self._pending = _Batch()
        self._executor: Executor | None = None
        self._in_flight: deque[Future[list[_SuiteResult]]] = deque()

    def add_partition(self, day: str, events: pl.DataFrame, ids: EventIdCounts) -> None:
        """Reduce one processed partition to its check inputs; validate when a batch is full."""
        start = day_start(day)
        batch = self._pending
        batch.partitions.append(day)
        batch.row_count += events.height
        for name, frame in row_candidates(events, start).items():
            if frame.height:
                batch.candidates[name].append(frame)
        batch.figures.append(partition_figures(day, events, ids, self.thresholds.min_rows))
        if batch.row_count >= self.batch_rows:
            self._submit(large=True)

    def finish(self) -> dict[str, CheckOutcome]:
        """Validate what is pending and wait for every batch; raises a validation error."""
        try:
            if self._pending.partitions:
                self._submit(large=False)
            while self._in_flight:
                self._collect_oldest()
        finally:
            self._shutdown()
        return self.outcomes

    def close(self) -> None:
        """Stop after a failed run: drop what is pending and what the worker has not begun."""
        self._pending = _Batch()
        self._in_flight.clear()
        self._shutdown()

    def _submit(self, large: bool) -> None:
        batch, self._pending = self._pending, _Batch()
        if self._executor is None:
            self._executor = self._start(large)
        while len(self._in_flight) >= self.max_in_flight:
            self._collect_oldest()
        self._in_flight.append(self._executor.submit(_validate_batch, batch, self.thresholds))

    def _start(self, large: bool) -> Executor:
        self.worker = "process" if large else "thread"
        if not large:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="weblogs-gx")
        prestarted = take_prestarted_worker()
        if prestarted is not None:
            # Kept: its pool is shut down at exit once its owner is collected.
            self._prestarted_owner = prestarted
            self.prestarted = True
            return prestarted.pool
        return _worker_process(self)

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _collect_oldest(self) -> None:
        for name, passed, partitions, observed in self._in_flight.popleft().result():
            self.outcomes[name].add(passed, partitions, observed)


def _worker_process(owner: object) -> ProcessPoolExecutor:
    """A process for GX, shut down with ``owner`` or at process exit at the latest."""
    # Spawned, never forked: the parent runs polars' thread pool.
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    multiprocessing.util.Finalize(
        owner, pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, exitpriority=10
    )
    return pool


class _Prestarted:
    """Owner of a prestarted worker (what its exit-time shutdown is attached to)."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor = _worker_process(self)


_PRESTARTED: _Prestarted | None = None
_PRESTARTED_LOCK = threading.Lock()


def prestart_worker(thresholds: Thresholds) -> None:
    """Start the GX worker process of a large run now, importing GX and building its
    suites there, so that the run finds it ready.

    A process that is about to start a large ``weblogs`` run in-process (``recsys
    ingest`` / ``recsys process``) calls this before it imports Dagster and builds
    the run: GX's import (~4 CPU s) then runs on the core those single-threaded steps
    leave idle, instead of competing with the processing for both. The next
    :class:`WeblogValidator` that validates in a process takes this one; the run's
    checks are the same checks, run the same way, in the same kind of process."""
    global _PRESTARTED
    with _PRESTARTED_LOCK:
        if _PRESTARTED is not None:
            return
        prestarted = _Prestarted()
        prestarted.pool.submit(_prepare, thresholds)
        _PRESTARTED = prestarted


def take_prestarted_worker() -> _Prestarted | None:
    """The prestarted worker, or None. The caller owns it from now on and keeps the
    returned object as long as it uses ``.pool`` (collected, it shuts the pool down)."""
    global _PRESTARTED
    with _PRESTARTED_LOCK:
        prestarted, _PRESTARTED = _PRESTARTED, None
    return prestarted


def discard_prestarted_worker() -> None:
    """Stop a prestarted worker no run took (a run that turned out small, or failed
    before validating)."""
    prestarted = take_prestarted_worker()
    if prestarted is not None:
        prestarted.pool.shutdown(wait=True, cancel_futures=True)


def _prepare(thresholds: Thresholds) -> None:
    """In the worker: import GX and build the suites (they stay cached there)."""
    _suites(thresholds)


def row_candidates(events: pl.DataFrame, start: datetime) -> dict[str, pl.DataFrame]:
    """Per row-level suite, the rows of a partition that its expectations count as
    unexpected, in the columns and types GX validates (``start``: the partition's
    first instant). Nulls break only the not-null suite: GX leaves them out of the
    set and range expectations, and so do these filters."""
    in_day = pl.col("seconds_into_partition")
    # Each suite's unexpected rows, over columns whose nulls the projection below keeps.
    unexpected = {
        "required_columns_not_null": pl.any_horizontal(
            pl.col(c).is_null() for c in REQUIRED_COLUMNS
        ),
        "event_type_allowed": pl.col("event_type").is_not_null()
        & ~pl.col("event_type").is_in(EVENT_TYPES),
        "ts_inside_partition": in_day.is_not_null() & ((in_day < 0) | (in_day >= 86_400)),
    }
    validated = {
        "required_columns_not_null": REQUIRED_COLUMNS,
        "event_type_allowed": ("event_type",),
        "ts_inside_partition": ("seconds_into_partition",),
    }
    rows = (
        events.lazy()
        .with_columns(
            ((pl.col("ts") - start).dt.total_microseconds() / 1e6).alias("seconds_into_partition")
        )
        .filter(pl.any_horizontal(*unexpected.values()))
        .select(
            *(pl.col(c).str.len_bytes() for c in ("event_id", "user_id", "item_id")),
            "event_type",
            pl.col("ts").dt.epoch("us"),
            in_day,
        )
        .collect()
    )
    if not rows.height:
        return {}
    return {name: rows.filter(rule).select(*validated[name]) for name, rule in unexpected.items()}


def partition_figures(
    day: str, events: pl.DataFrame, ids: EventIdCounts, min_rows: int
) -> dict[str, Any]:
    """One partition's anomaly counts and rates (a rate is None below ``min_rows``)."""
    clicks = events.filter(
        (pl.col("event_type") == "click") & pl.col("request_id").is_not_null()
    ).select("event_id", "request_id", "item_id")
    unattributed = clicks.head(0)
    if clicks.height:
        # No unique() first: an anti join keeps a click whatever the number of
        # matching impressions, and deduplicating ~10 impressions per click cost
        # more than the join itself.
        shown = (
            events.lazy()
            .filter((pl.col("event_type") == "impression") & pl.col("request_id").is_not_null())
            .select("request_id", "item_id")
        )
        # In the partition's order, so the examples are its first such clicks.
        unattributed = (
            clicks.lazy()
            .join(shown, on=["request_id", "item_id"], how="anti", maintain_order="left")
            .collect()
        )
    event_ids = events.get_column("event_id").drop_nulls()
    output_duplicates = event_ids.len() - event_ids.n_unique()
    repeated = (
        event_ids.filter(event_ids.is_duplicated()).unique(maintain_order=True).head(2).to_list()
        if output_duplicates
        else []
    )
    return {
        "partition": day,
        "output_duplicates": output_duplicates,
        "output_duplicates_examples": [f"event_id {e!r} twice or more" for e in repeated],
        "clicks_with_request_id": clicks.height,
        "unattributed_clicks": unattributed.height,
        "unattributed_rate": (
            round(unattributed.height / clicks.height, 6) if clicks.height >= min_rows else None
        ),
        "unattributed_clicks_examples": [
            f"click {r['event_id']!r} on item {r['item_id']!r} of request {r['request_id']!r}"
            for r in unattributed.head(2).iter_rows(named=True)
        ],
        "landed_event_ids": ids.landed,
        "replayed_duplicates": ids.replayed,
        "conflicting_event_ids": ids.conflicting,
        "conflicting_rate": (round(ids.conflicting_rate, 6) if ids.distinct >= min_rows else None),
        "conflicting_event_ids_examples": [
            f"event_id {e!r} landed as different events" for e in ids.conflicting_examples
        ],
    }


# (check name, passed, partitions it failed in or checked, observed values)
_SuiteResult = tuple[str, bool, list[str], dict[str, Any]]

# Validation definitions per set of thresholds, in whichever process validates.
_VALIDATIONS: dict[Thresholds, dict[str, Any]] = {}
_VALIDATIONS_LOCK = threading.Lock()


def _suites(thresholds: Thresholds) -> dict[str, Any]:
    """The GX validation of every check, built once per thresholds and process."""
    with _VALIDATIONS_LOCK:
        if thresholds not in _VALIDATIONS:
            _VALIDATIONS[thresholds] = _build_suites(thresholds)
        return _VALIDATIONS[thresholds]


def _build_suites(thresholds: Thresholds) -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    # Per-metric tqdm bars would flood run logs; Dagster shows progress instead.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas("weblogs")
    suites: dict[str, list[Any]] = {
        "required_columns_not_null": [
            gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS
        ],
        "event_type_allowed": [
            gxe.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES))
        ],
        "ts_inside_partition": [
            gxe.ExpectColumnValuesToBeBetween(
                column="seconds_into_partition", min_value=0, max_value=86_400, strict_max=True
            )
        ],
        "event_ids_unique": [
            gxe.ExpectColumnValuesToBeBetween(column="output_duplicates", min_value=0, max_value=0)
        ],
        # Rates are None below min_rows: GX leaves nulls out of a column's values.
        "unattributed_click_rate_below_threshold": [
            gxe.ExpectColumnValuesToBeBetween(
                column="unattributed_rate",
                min_value=0.0,
                max_value=thresholds.max_unattributed_click_rate,
            )
        ],
        "conflicting_duplicate_rate_below_threshold": [
            gxe.ExpectColumnValuesToBeBetween(
                column="conflicting_rate", min_value=0.0, max_value=thresholds.max_duplicate_rate
            )
        ],
    }
    validations: dict[str, Any] = {}
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        validations[name] = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
    return validations


def _validate_batch(batch: _Batch, thresholds: Thresholds) -> list[_SuiteResult]:
    """Every suite on one batch (in the worker process or thread)."""
    validations = _suites(thresholds)
    frames = _frames(batch)
    results: list[_SuiteResult] = []
    for name, vd in validations.items():
        df = frames[name]
        if name in PARTITION_COLUMNS:
            if len(df) == 0:
                results.append((name, True, batch.partitions, {"rows": 0, "unexpected": 0}))
                continue
            passed, failed, observed = _validate_per_partition(name, vd, df, batch.figures)
            results.append((name, passed, failed or batch.partitions, observed))
        elif len(df) == 0:  # no row can break it: what GX would say of the whole batch
            results.append(
                (name, True, batch.partitions, {"rows": batch.row_count, "unexpected": 0})
            )
        else:
            result = vd.run(batch_parameters={"dataframe": df})
            observed = _observed(result, batch.row_count)
            results.append((name, bool(result.success), batch.partitions, observed))
    return results


def _validate_per_partition(
    name: str, vd: Any, df: Any, figures: list[dict[str, Any]]
) -> tuple[bool, list[str], dict[str, Any]]:
    """One row per partition, so GX names exactly the partitions that failed."""
    column = PARTITION_COLUMNS[name]
    result = vd.run(
        batch_parameters={"dataframe": df[["partition", column]]},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["partition"]},
    )
    failed = [
        str(row["partition"])
        for r in result.results
        for row in (r.result or {}).get("unexpected_index_list") or []
    ]
    count_key, totals = PARTITION_COUNTS[name]
    by_partition = {f["partition"]: f for f in figures}
    observed: dict[str, Any] = {
        "rows": len(df),
        "unexpected": sum(int(by_partition[p][count_key]) for p in failed),
        **{key: sum(int(f[key]) for f in figures) for key in totals},
    }
    judged = df[column].dropna()
    if column.endswith("_rate") and len(judged):
        observed[f"max_{column}"] = round(float(judged.max()), 6)
    examples = [e for p in failed for e in by_partition[p][f"{count_key}_examples"]]
    if examples:
        observed["examples"] = examples[:2]
    return bool(result.success), failed, observed


def _frames(batch: _Batch) -> dict[str, Any]:
    """The pandas frame each suite validates: a row-level suite's candidate rows, or
    the partitions' figures."""
    frames: dict[str, Any] = {}
    for name, parts in batch.candidates.items():
        rows = pl.concat(parts, how="vertical") if parts else pl.DataFrame()
        if "event_type" in rows.columns:
            rows = rows.with_columns(pl.col("event_type").cast(pl.Categorical))
        frames[name] = rows.to_pandas()
    partitions = pl.DataFrame(
        [{k: f[k] for k in ("partition", *PARTITION_COLUMNS.values())} for f in batch.figures],
        schema={
            "partition": pl.String(),
            "output_duplicates": pl.Int64(),
            "unattributed_rate": pl.Float64(),
            "conflicting_rate": pl.Float64(),
        },
    ).to_pandas()
    frames.update(dict.fromkeys(PARTITION_COLUMNS, partitions))
    return frames


def _observed(result: Any, rows: int) -> dict[str, Any]:
    observed: dict[str, Any] = {"rows": rows}
    unexpected = 0
    examples: list[Any] = []
    for r in result.results:
        res = r.result or {}
        unexpected += int(res.get("unexpected_count") or 0)
        examples.extend((res.get("partial_unexpected_list") or [])[:5])
    observed["unexpected"] = unexpected
    if examples:
        observed["examples"] = [str(e)[:120] for e in examples[:5]]
    return observed
