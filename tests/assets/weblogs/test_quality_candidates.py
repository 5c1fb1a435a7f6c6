"""GX judging only the candidate rows says what it said of the whole frame.

The row-level suites used to validate every processed row; they now see the rows
polars picks as able to break them. These tests run the same GX validation both
ways on partitions full of edge cases and require the same success, unexpected
count and examples.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from recsys_assets.weblogs.processing import EventIdCounts
from recsys_assets.weblogs.quality import (
    REQUIRED_COLUMNS,
    ROW_SUITES,
    Thresholds,
    _Batch,
    _observed,
    _suites,
    _validate_batch,
    partition_figures,
    row_candidates,
)

DAY = "2026-03-02"
START = datetime(2026, 3, 2, tzinfo=UTC)


def _whole_frames(events: pl.DataFrame) -> dict[str, object]:
    """What the suites validated before: every row, in the same columns and types."""
    rows = events.select(
        *(pl.col(c).str.len_bytes() for c in ("event_id", "user_id", "item_id")),
        pl.col("event_type").cast(pl.Categorical),
        pl.col("ts").dt.epoch("us"),
        ((pl.col("ts") - START).dt.total_microseconds() / 1e6).alias("seconds_into_partition"),
    )
    required = rows.select(*REQUIRED_COLUMNS).to_pandas()
    return {
        "required_columns_not_null": required,
        "event_type_allowed": required[["event_type"]],
        "ts_inside_partition": rows.select("seconds_into_partition").to_pandas(),
    }


def _partition(n_clean: int, odd: list[dict[str, object]]) -> pl.DataFrame:
    clean = [
        {
            "event_id": f"e{i}",
            "event_type": "view",
            "user_id": "u",
            "item_id": f"i{i}",
            "ts": START + timedelta(seconds=i),
            "request_id": None,
        }
        for i in range(n_clean)
    ]
    rows = clean[: n_clean // 2] + odd + clean[n_clean // 2 :]
    return pl.DataFrame(
        rows,
        schema={
            "event_id": pl.String(),
            "event_type": pl.String(),
            "user_id": pl.String(),
            "item_id": pl.String(),
            "ts": pl.Datetime("us", "UTC"),
            "request_id": pl.String(),
        },
    )


ODD = [
    {"event_id": None, "event_type": "click", "user_id": "u", "item_id": "i", "ts": START},
    {"event_id": "x1", "event_type": None, "user_id": None, "item_id": "i", "ts": START},
    {"event_id": "x2", "event_type": "teleport", "user_id": "u", "item_id": None, "ts": START},
    {"event_id": "x3", "event_type": "", "user_id": "u", "item_id": "i", "ts": None},
    {"event_id": "x4", "event_type": "VIEW", "user_id": "u", "item_id": "i", "ts": START},
    {"event_id": "x5", "event_type": "view", "user_id": "", "item_id": "", "ts": START},
    # The day's bounds: 0 is inside, 86,400 (the next midnight) and anything before is not.
    {"event_id": "x6", "event_type": "view", "user_id": "u", "item_id": "i", "ts": START},
    {
        "event_id": "x7",
        "event_type": "view",
        "user_id": "u",
        "item_id": "i",
        "ts": START + timedelta(days=1),
    },
    {
        "event_id": "x8",
        "event_type": "view",
        "user_id": "u",
        "item_id": "i",
        "ts": START - timedelta(microseconds=1),
    },
    {
        "event_id": "x9",
        "event_type": "view",
        "user_id": "u",
        "item_id": "i",
        "ts": START + timedelta(days=1) - timedelta(microseconds=1),
    },
    {
        "event_id": "x10",
        "event_type": "view",
        "user_id": "u",
        "item_id": "i",
        "ts": START + timedelta(days=400),
    },
]


@pytest.mark.parametrize(
    "odd",
    [[], ODD, ODD[:1], ODD[6:], ODD[2:5] * 30],
    ids=["clean", "all-edge-cases", "one-null", "timestamps-only", "many-examples"],
)
def test_candidate_rows_give_gx_the_whole_frames_outcome(odd: list[dict[str, object]]) -> None:
    events = _partition(40, [{**row, "request_id": None} for row in odd])
    thresholds = Thresholds()
    validations = _suites(thresholds)
    expected = {}
    for name, df in _whole_frames(events).items():
        result = validations[name].run(batch_parameters={"dataframe": df})
        expected[name] = (bool(result.success), _observed(result, len(df)))

    batch = _Batch(partitions=[DAY], row_count=events.height)
    for name, frame in row_candidates(events, START).items():
        if frame.height:
            batch.candidates[name].append(frame)
    batch.figures.append(
        partition_figures(DAY, events, EventIdCounts(landed=events.height, distinct=1), 100)
    )
    got = {
        name: (passed, observed)
        for name, passed, _, observed in _validate_batch(batch, thresholds)
        if name in ROW_SUITES
    }
    assert got == expected
    if odd:
        assert not all(passed for passed, _ in got.values())


def test_candidates_are_only_the_rows_that_break_a_suite() -> None:
    events = _partition(1_000, ODD)
    counts = {name: frame.height for name, frame in row_candidates(events, START).items()}
    # nulls: x (event_id), x1 (event_type, user_id), x2 (item_id), x3 (ts);
    # event types: teleport, "", VIEW; out of the day: the next midnight, before, +400 d.
    assert counts == {
        "required_columns_not_null": 4,
        "event_type_allowed": 3,
        "ts_inside_partition": 3,
    }
    assert row_candidates(_partition(1_000, []), START) == {}


def test_unattributed_clicks_are_counted_once_and_named_in_partition_order() -> None:
    """Impressions logged twice (a retried request) match a click once; the clicks
    that match none are named in the partition's order."""
    rows = []
    for r in range(6):
        t = START + timedelta(minutes=r)
        shown = [f"i{r}"] * 2  # each impression logged twice
        for item in shown:
            rows.append(("impression", f"imp{r}-{len(rows)}", item, f"r{r}", t))
        clicked = f"i{r}" if r % 2 == 0 else f"lost{r}"
        rows.append(("click", f"c{r}", clicked, f"r{r}", t + timedelta(seconds=1)))
    events = pl.DataFrame(
        [
            {"event_id": e, "event_type": k, "user_id": "u", "item_id": i, "request_id": q, "ts": t}
            for k, e, i, q, t in rows
        ],
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    figures = partition_figures(DAY, events, EventIdCounts(landed=len(rows), distinct=len(rows)), 1)
    assert figures["clicks_with_request_id"] == 6
    assert figures["unattributed_clicks"] == 3
    assert figures["unattributed_rate"] == 0.5
    assert figures["unattributed_clicks_examples"] == [
        "click 'c1' on item 'lost1' of request 'r1'",
        "click 'c3' on item 'lost3' of request 'r3'",
    ]
