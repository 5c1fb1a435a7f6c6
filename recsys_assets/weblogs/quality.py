"""Great-expectations suites for processed weblogs, kept in code.

Each Dagster asset check maps to one GX suite so a failure in the UI names the
rule that broke. GX stays the engine that decides every check; polars only
prepares what each suite reads, so a 10M-event backfill is validated in seconds:

* row-level suites (``required_columns_not_null``, ``event_type_allowed``,
  ``ts_inside_partition``) see every processed row, but only the columns they
  check, in types the pandas engine handles without per-value Python work (GX
  fingerprints every batch by hashing it, about 0.5 µs per string value, and its
  range check loops in Python over anything but numpy numbers): ``event_type`` as
  a categorical, ``ts`` as epoch microseconds, the seconds into the partition as
  floats, and the id columns (``event_id``, ``user_id``, ``item_id``) as their byte
  lengths with nulls kept. A not-null expectation depends on nullity alone, so its
  result (counts, percentages, the null examples) is exactly the one on the
  strings;
* aggregate suites see polars-computed aggregates, as their expectations are about
  aggregates: clicks and impressions per ``request_id``, and each partition's
  duplicate rate among its landed ``event_id``\\ s.

Partitions are reduced to these inputs as they are processed and validated on a
worker thread (which also pays the 3 s GX import while the first partitions are
processed), one partition at a time, or a few small ones together once they reach
``batch_rows`` rows (a GX run has a fixed cost of ~0.1 s, which would dominate a
year of small daily partitions). Validating a 300k-event partition on its own costs
no more CPU than in 2M-row batches and keeps memory bounded by a partition, not by
the length of the backfill.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import polars as pl

from recsys_assets.weblogs.processing import EventIdCounts
from recsys_serving.events.schema import EVENT_TYPES

REQUIRED_COLUMNS = ("event_id", "event_type", "user_id", "item_id", "ts")

CHECK_DESCRIPTIONS: dict[str, str] = {
    "required_columns_not_null": "event_id, event_type, user_id, item_id and ts are never null.",
    "event_type_allowed": f"event_type is one of {', '.join(EVENT_TYPES)}.",
    "ts_inside_partition": "Every event's timestamp falls on its partition's date (UTC).",
    "clicks_not_above_impressions": (
        "Per request_id with logged impressions, clicks never exceed impressions."
    ),
    "duplicate_rate_below_threshold": (
        "In every partition, the share of duplicate event_ids among landed events stays "
        "at or below the threshold."
    ),
}

# Which prepared frame each suite validates.
SUITE_FRAMES: dict[str, str] = {
    "required_columns_not_null": "required",
    "event_type_allowed": "event_types",
    "ts_inside_partition": "timestamps",
    "clicks_not_above_impressions": "requests",
    "duplicate_rate_below_threshold": "partitions",
}


@dataclass
class CheckOutcome:
    name: str
    passed: bool = True
    batches: int = 0
    failed_partitions: list[str] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)

    def add(self, passed: bool, partitions: list[str], observed: dict[str, Any]) -> None:
        self.batches += 1
        if not passed:
            self.passed = False
            self.failed_partitions.extend(partitions)
        for key, value in observed.items():
            if isinstance(value, int | float) and isinstance(self.observed.get(key), int | float):
                if key.startswith("max_") or key.endswith("_rate"):
                    self.observed[key] = max(self.observed[key], value)
                else:
                    self.observed[key] = self.observed[key] + value
            elif key not in self.observed or (not passed and key == "examples"):
                self.observed[key] = value


@dataclass
class _Batch:
    """Compact check inputs of one or more partitions, in processing order."""

    partitions: list[str] = field(default_factory=list)
    rows: list[pl.DataFrame] = field(default_factory=list)
    requests: list[pl.DataFrame] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    row_count: int = 0


class WeblogValidator:
    """Runs the weblog expectation suites over processed partitions, batch by batch.

    Call :meth:`add_partition` for every partition (in any order), then
    :meth:`finish`; ``outcomes`` then holds one :class:`CheckOutcome` per check.
    """

    def __init__(self, max_duplicate_rate: float, batch_rows: int = 200_000) -> None:
        self.max_duplicate_rate = max_duplicate_rate
        self.batch_rows = batch_rows
        self.outcomes = {name: CheckOutcome(name) for name in CHECK_DESCRIPTIONS}
        self._validations: dict[str, Any] = {}
        self._pending = _Batch()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weblogs-gx")
        # Submitted first, so the worker imports GX while partitions are processed.
        self._running: Future[None] = self._worker.submit(self._build)

    def _build(self) -> None:
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
            "clicks_not_above_impressions": [
                gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="impressions", column_B="clicks", or_equal=True
                )
            ],
            "duplicate_rate_below_threshold": [
                gxe.ExpectColumnValuesToBeBetween(
                    column="duplicate_rate", min_value=0.0, max_value=self.max_duplicate_rate
                )
            ],
        }
        for name, expectations in suites.items():
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
            self._validations[name] = ctx.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=suite)
            )

    def add_partition(self, day: str, events: pl.DataFrame, ids: EventIdCounts) -> None:
        """Reduce one processed partition to its check inputs; validate when a batch is full."""
        start = partition_start(day)
        batch = self._pending
        batch.partitions.append(day)
        batch.row_count += events.height
        batch.rows.append(
            events.select(
                *(pl.col(c).str.len_bytes() for c in ("event_id", "user_id", "item_id")),
                pl.col("event_type").cast(pl.Categorical),
                pl.col("ts").dt.epoch("us"),
                ((pl.col("ts") - start).dt.total_microseconds() / 1e6).alias(
                    "seconds_into_partition"
                ),
            )
        )
        batch.requests.append(
            events.lazy()  # 3x cheaper than the eager group_by on 300k rows
            .filter(pl.col("request_id").is_not_null())
            .group_by("request_id")
            .agg(
                (pl.col("event_type") == "impression").sum().alias("impressions"),
                (pl.col("event_type") == "click").sum().alias("clicks"),
            )
            .collect()
        )
        batch.duplicates.append({"partition": day, "duplicate_rate": ids.duplicate_rate})
        if batch.row_count >= self.batch_rows:
            self._submit()

    def finish(self) -> dict[str, CheckOutcome]:
        """Validate what is pending and wait for every batch; raises a validation error."""
        if self._pending.partitions:
            self._submit()
        try:
            self._running.result()
        finally:
            self._worker.shutdown(wait=True)
        return self.outcomes

    def close(self) -> None:
        """Stop after a failed run: drop what is pending, wait for the batch running."""
        self._pending = _Batch()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        batch, self._pending = self._pending, _Batch()
        # One batch validated at a time: the next waits, which bounds memory to two.
        self._running.result()
        self._running = self._worker.submit(self._validate, batch)

    def _validate(self, batch: _Batch) -> None:
        frames = _frames(batch)
        for name, vd in self._validations.items():
            df = frames[SUITE_FRAMES[name]]
            outcome = self.outcomes[name]
            if len(df) == 0:
                outcome.add(True, batch.partitions, {"rows": 0})
            elif name == "duplicate_rate_below_threshold":
                passed, failed, observed = _validate_per_partition(vd, df)
                outcome.add(passed, failed or batch.partitions, observed)
            else:
                result = vd.run(batch_parameters={"dataframe": df})
                outcome.add(bool(result.success), batch.partitions, _observed(result, df))


def _validate_per_partition(vd: Any, df: Any) -> tuple[bool, list[str], dict[str, Any]]:
    """One row per partition, so GX names exactly the partitions that failed."""
    result = vd.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["partition"]},
    )
    failed = [
        str(row["partition"])
        for r in result.results
        for row in (r.result or {}).get("unexpected_index_list") or []
    ]
    observed: dict[str, Any] = {
        "rows": len(df),
        "duplicate_rate": round(float(df["duplicate_rate"].max()), 6),
    }
    if failed:
        rates = dict(zip(df["partition"], df["duplicate_rate"], strict=True))
        observed["examples"] = [f"{p}: {rates[p]:.4f}" for p in failed[:5]]
    return bool(result.success), failed, observed


def _frames(batch: _Batch) -> dict[str, Any]:
    """The pandas frames each suite validates, built from a batch's compact inputs."""
    rows = pl.concat(batch.rows, how="vertical", rechunk=False)
    required = rows.select(*REQUIRED_COLUMNS).to_pandas()
    requests = (
        pl.concat(batch.requests, how="vertical")
        .lazy()
        .group_by("request_id")
        .agg(pl.col("impressions").sum(), pl.col("clicks").sum())
        .filter(pl.col("impressions") > 0)
        .collect()
    )
    return {
        "required": required,
        "event_types": required[["event_type"]],
        "timestamps": rows.select("seconds_into_partition").to_pandas(),
        "requests": requests.to_pandas(),
        "partitions": pl.DataFrame(batch.duplicates).to_pandas(),
    }


def _observed(result: Any, df: Any) -> dict[str, Any]:
    observed: dict[str, Any] = {"rows": len(df)}
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


def partition_start(day: str) -> datetime:
    return datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
