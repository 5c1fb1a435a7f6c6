"""The weblogs asset under Dagster: range runs, metadata, and blocking quality checks."""

import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from recsys_assets.definitions import build_resources
from recsys_assets.weblogs.assets import landing_weblogs, weblog_partitions
from recsys_assets.weblogs.defs import weblogs_defs
from recsys_assets.weblogs.processing import EventIdCounts, Rules, process_partitions
from recsys_assets.weblogs.quality import WeblogValidator
from recsys_assets.weblogs.sensors import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from recsys_serving.lake import LocalLake, read_parquet
from recsys_serving.settings import Settings
from support import land

DAYS = ["2026-11-18", "2026-11-19", "2026-11-20"]
ACQUISITION = weblogs_defs(Settings(home="/nonexistent", catalog_epoch="2020-01-01"))
WEBLOG_PARTITIONS, weblogs = ACQUISITION.partitions, ACQUISITION.weblogs


@dg.asset(
    partitions_def=WEBLOG_PARTITIONS, deps=[weblogs], backfill_policy=dg.BackfillPolicy.single_run()
)
def downstream_training(context: dg.AssetExecutionContext) -> None:
    """Stands in for the training assets a failing blocking check must stop."""


def events_for(day: str, n: int, prefix: str = "e") -> list[dict[str, object]]:
    t = datetime.fromisoformat(day).replace(hour=6, tzinfo=UTC).timestamp()
    out: list[dict[str, object]] = []
    for i in range(n):
        rid = f"{day}-r{i // 4}"
        out.append(
            {
                "event_id": f"{prefix}{day}-{i}",
                "event_type": "impression",
                "user_id": f"u{i % 9}",
                "item_id": f"i{i % 13}",
                "ts": t + i * 20,
                "request_id": rid,
                "position": i % 4,
            }
        )
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, catalog_epoch="2020-01-01")


def run_range(settings: Settings, start: str, end: str) -> dg.ExecuteInProcessResult:
    job = dg.Definitions(
        assets=[landing_weblogs, weblogs, downstream_training],
        jobs=[
            dg.define_asset_job(
                "both", selection=[weblogs, downstream_training], partitions_def=WEBLOG_PARTITIONS
            )
        ],
        resources=build_resources(settings),
    ).resolve_job_def("both")
    with dg.instance_for_test() as instance:
        return job.execute_in_process(
            instance=instance,
            tags={PARTITION_RANGE_START_TAG: start, PARTITION_RANGE_END_TAG: end},
            raise_on_error=False,
        )


def test_materialize_one_partition_with_metadata_and_checks(settings: Settings) -> None:
    lake = LocalLake(settings.resolved_lake_uri)
    land(lake, events_for(DAYS[0], 40))
    result = dg.materialize(
        [landing_weblogs, weblogs], partition_key=DAYS[0], resources=build_resources(settings)
    )
    assert result.success
    mat = result.asset_materializations_for_node("weblogs")[0]
    assert mat.metadata["dagster/row_count"].value == 40
    assert mat.metadata["landing_rows"].value == 40
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "required_columns_not_null": True,
        "event_type_allowed": True,
        "ts_inside_partition": True,
        "event_ids_unique": True,
        "unattributed_click_rate_below_threshold": True,
        "conflicting_duplicate_rate_below_threshold": True,
    }


def test_a_range_backfills_in_one_run(settings: Settings) -> None:
    lake = LocalLake(settings.resolved_lake_uri)
    for day in DAYS:
        land(lake, events_for(day, 20))
    result = run_range(settings, DAYS[0], DAYS[-1])
    assert result.success
    partitions = {m.partition for m in result.asset_materializations_for_node("weblogs")}
    assert partitions == set(DAYS)
    assert {
        m.partition for m in result.asset_materializations_for_node("downstream_training")
    } == set(DAYS)
    for day in DAYS:
        assert read_parquet(lake, f"weblogs/date={day}/part-0.parquet").height == 20


def test_a_file_ingested_twice_is_deduplicated_counted_and_passes(settings: Settings) -> None:
    """A re-ingest after a crash: 50% replays, quarantined and counted, nothing blocked."""
    lake = LocalLake(settings.resolved_lake_uri)
    day = DAYS[0]
    events = events_for(day, 40)
    land(lake, events)
    land(lake, events)  # the same file shipped twice
    result = run_range(settings, day, day)
    assert result.success
    mat = result.asset_materializations_for_node("weblogs")[0]
    assert mat.metadata["dagster/row_count"].value == 40
    assert mat.metadata["replayed_duplicates"].value == 40
    assert mat.metadata["conflicting_event_ids"].value == 0
    assert mat.metadata["quarantine_reasons"].value == {"duplicate_event_id": 40}
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    dupes = checks["conflicting_duplicate_rate_below_threshold"]
    assert dupes.passed and dupes.metadata["replayed_duplicates"].value == 40
    assert {m.partition for m in result.asset_materializations_for_node("downstream_training")} == {
        day
    }


def test_conflicting_event_ids_warn_with_count_examples_and_remedy(settings: Settings) -> None:
    """One event_id for different events (ids reused): real events lost, told with count,
    examples and remedy; a client's fault, so it warns and never halts the partition."""
    settings = settings.replace(min_rows_for_rate_checks=20)
    lake = LocalLake(settings.resolved_lake_uri)
    day = DAYS[0]
    events = events_for(day, 40)
    land(lake, events)
    land(lake, [{**e, "item_id": "other"} for e in events[:10]])  # 10 of 40 ids reused
    result = run_range(settings, day, day)
    assert result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}[
        "conflicting_duplicate_rate_below_threshold"
    ]
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["conflicting_event_ids"].value == 10
    assert check.metadata["max_conflicting_rate"].value == 0.25
    line = check.metadata["failure"].value
    assert line.startswith("check conflicting_duplicate_rate_below_threshold failed: 10 rows")
    assert f"'e{day}-0' landed as different events" in line
    assert f"'e{day}-1' landed as different events" in line
    assert "RECSYS_MAX_DUPLICATE_RATE" in line
    mat = result.asset_materializations_for_node("weblogs")[0]
    assert mat.metadata["dagster/row_count"].value == 40  # the first copy of each id kept
    assert mat.metadata["quarantine_reasons"].value == {"duplicate_event_id": 10}
    assert {m.partition for m in result.asset_materializations_for_node("downstream_training")} == {
        day
    }


def clicks_with_lost_impressions(day: str, requests: int, lost_every: int) -> list[dict]:
    """Slates of 4 impressions, one click per slate, every ``lost_every``-th impression lost."""
    events = events_for(day, requests * 4)
    kept = [e for i, e in enumerate(events) if i % lost_every != lost_every - 1]
    clicks = [
        {**events[r * 4 + 3], "event_id": f"c{day}-{r}", "event_type": "click", "position": None}
        for r in range(requests)
    ]
    for c in clicks:
        c["ts"] = float(c["ts"]) + 5  # type: ignore[arg-type]
    return kept + clicks


def test_clicks_above_logged_impressions_are_kept_and_counted(settings: Settings) -> None:
    """Clients lose impressions: clicks without one are kept unattributed, not blocking."""
    settings = settings.replace(min_rows_for_rate_checks=10)
    lake = LocalLake(settings.resolved_lake_uri)
    day = DAYS[1]
    # 20 slates, one click on each slate's 4th item; every 8th impression is lost, so the
    # clicked impression is missing in 10 of 20 slates (rate 0.5, at the threshold).
    land(lake, clicks_with_lost_impressions(day, requests=20, lost_every=8))
    result = run_range(settings, day, day)
    assert result.success
    mat = result.asset_materializations_for_node("weblogs")[0]
    assert mat.metadata["dagster/row_count"].value == 70 + 20  # every click kept
    assert mat.metadata["unattributed_clicks"].value == 10
    assert mat.metadata["clicks_with_request_id"].value == 20
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}[
        "unattributed_click_rate_below_threshold"
    ]
    assert check.passed and check.metadata["max_unattributed_rate"].value == 0.5


def test_a_few_clicks_without_impressions_never_halt_a_partition(settings: Settings) -> None:
    """Six clicks on a request whose impressions were lost: below min_rows, not judged."""
    lake = LocalLake(settings.resolved_lake_uri)
    day = DAYS[1]
    events = events_for(day, 8)
    t = events[0]["ts"]
    clicks = [
        {**events[0], "event_id": f"c{i}", "event_type": "click", "item_id": f"lost{i}", "ts": t}
        for i in range(6)
    ]
    land(lake, events + clicks)
    result = run_range(settings, day, day)
    assert result.success
    assert (
        result.asset_materializations_for_node("weblogs")[0].metadata["unattributed_clicks"].value
        == 6
    )


def test_most_clicks_unattributed_warns(settings: Settings) -> None:
    """Impression logging broken (every clicked impression missing): told loudly, but the
    clicks are kept and the partition goes on."""
    settings = settings.replace(min_rows_for_rate_checks=10)
    lake = LocalLake(settings.resolved_lake_uri)
    day = DAYS[1]
    land(lake, clicks_with_lost_impressions(day, requests=20, lost_every=2))
    result = run_range(settings, day, day)
    assert result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}[
        "unattributed_click_rate_below_threshold"
    ]
    assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["unexpected"].value == 20
    assert "RECSYS_MAX_UNATTRIBUTED_CLICK_RATE" in check.metadata["failure"].value
    mat = result.asset_materializations_for_node("weblogs")[0]
    assert mat.metadata["unattributed_clicks"].value == 20
    assert [m.partition for m in result.asset_materializations_for_node("downstream_training")] == [
        day
    ]


def test_partitions_cover_the_catalog_epoch_to_tomorrow() -> None:
    keys = weblog_partitions(Settings()).get_partition_keys()
    assert keys[0] == Settings().events.catalog_epoch.isoformat()
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    assert keys[-1] in {time.strftime("%Y-%m-%d", time.gmtime()), tomorrow}


def test_validator_works_in_bounded_batches_and_names_failing_partitions(
    settings: Settings,
) -> None:
    lake = LocalLake(settings.resolved_lake_uri)
    for day in DAYS:
        land(lake, events_for(day, 30))
    # 12 of 30 ids landed again as different events, 3 more replayed as they were.
    land(lake, [{**e, "user_id": "someone else"} for e in events_for(DAYS[1], 30)[:12]])
    land(lake, events_for(DAYS[1], 30)[20:23])
    validator = WeblogValidator(max_duplicate_rate=0.2, batch_rows=40, min_rows=10)
    rules = Rules(catalog_epoch=settings.events.catalog_epoch, now=datetime.now(UTC))
    run = process_partitions(lake, DAYS, rules, on_frames=validator.add_partition)
    outcomes = validator.finish()
    assert validator.worker == "process"  # a full batch: GX runs beside the pipeline
    assert run.rows == 90
    assert {name: o.batches for name, o in outcomes.items()} == dict.fromkeys(outcomes, 2)
    assert {name for name, o in outcomes.items() if not o.passed} == {
        "conflicting_duplicate_rate_below_threshold"
    }
    duplicates = outcomes["conflicting_duplicate_rate_below_threshold"]
    assert duplicates.failed_partitions == [DAYS[1]]
    assert duplicates.observed["max_conflicting_rate"] == round(12 / 30, 6)
    assert duplicates.observed["unexpected"] == 12
    assert duplicates.observed["replayed_duplicates"] == 15
    assert duplicates.observed["landed_event_ids"] == 105
    assert outcomes["required_columns_not_null"].observed == {"rows": 90, "unexpected": 0}


def test_row_level_suites_see_every_row_and_report_what_broke() -> None:
    day = DAYS[0]
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    events = pl.DataFrame(
        {
            "event_id": ["a", None, "c", "d"],
            "event_type": ["click", "view", "teleport", "impression"],
            "user_id": ["u", "u", None, "u"],
            "item_id": ["i", "i", "i", "i"],
            "ts": [start, start, start.replace(hour=23), start.replace(day=start.day + 1)],
            "request_id": ["r", None, None, "r"],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    validator = WeblogValidator(max_duplicate_rate=0.05)
    validator.add_partition(day, events, EventIdCounts(landed=4, distinct=4))
    outcomes = validator.finish()
    assert validator.worker == "thread"  # a small run never pays for a new interpreter
    assert {name: o.passed for name, o in outcomes.items()} == {
        "required_columns_not_null": False,
        "event_type_allowed": False,
        "ts_inside_partition": False,
        "event_ids_unique": True,
        "unattributed_click_rate_below_threshold": True,
        "conflicting_duplicate_rate_below_threshold": True,
    }
    assert outcomes["required_columns_not_null"].observed["unexpected"] == 2
    assert outcomes["required_columns_not_null"].failed_partitions == [day]
    assert outcomes["event_type_allowed"].observed["examples"] == ["teleport"]
    assert outcomes["ts_inside_partition"].observed["examples"] == ["86400.0"]


def test_output_with_a_repeated_event_id_fails_event_ids_unique() -> None:
    """The output-integrity guard behind dedup: a repeated id in the output blocks."""
    day = DAYS[0]
    start = datetime.fromisoformat(day).replace(hour=1, tzinfo=UTC)
    events = pl.DataFrame(
        {
            "event_id": ["a", "a", "b"],
            "event_type": ["view"] * 3,
            "user_id": ["u"] * 3,
            "item_id": ["i"] * 3,
            "ts": [start] * 3,
            "request_id": [None, None, None],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC"), "request_id": pl.String},
    )
    validator = WeblogValidator(max_duplicate_rate=0.05)
    validator.add_partition(day, events, EventIdCounts(landed=3, distinct=3))
    outcome = validator.finish()["event_ids_unique"]
    assert outcome.passed is False
    assert outcome.observed["unexpected"] == 1
    assert outcome.observed["examples"] == ["event_id 'a' twice or more"]


def test_a_run_that_breaks_is_told_by_its_root_error_on_one_line() -> None:
    """Not a check: Dagster's wrapper errors are peeled off, the trace stays in the run log."""
    from recsys_assets.runs import _outcome

    @dg.asset
    def breaks() -> None:
        raise ValueError("conversion from f64 to i64 failed in column 'ts'\n  [inf]")

    result = dg.materialize([breaks], raise_on_error=False)
    outcome = _outcome(result)
    assert not outcome.success and outcome.check_failures == {}
    assert outcome.failure == (
        "ValueError: conversion from f64 to i64 failed in column 'ts' [inf] "
        f"(stack trace in the Dagster UI, run {result.run_id[:8]})"
    )
