"""The acquisition assets: the collector's landing zone and processed weblogs."""

from datetime import UTC, date, datetime

import dagster as dg
import orjson

from recsys_assets.resources import LakeResource, RecsysConfig
from recsys_assets.weblogs.processing import Rules, process_partitions
from recsys_assets.weblogs.quality import (
    CHECK_DESCRIPTIONS,
    CLIENT_BEHAVIOUR_CHECKS,
    WeblogValidator,
    failure_line,
)
from recsys_serving.settings import Settings


def weblog_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    """One partition per UTC day from the catalog epoch: a definition-time value, built
    for the ``Settings`` a code location is made from (never read at import)."""
    return dg.DailyPartitionsDefinition(
        start_date=settings.events.catalog_epoch.isoformat(),
        # Today's partition exists so live traffic can be processed as it lands.
        end_offset=1,
    )


landing_weblogs = dg.AssetSpec(
    "landing_weblogs",
    description=(
        "Raw events accepted by `POST /events` and `recsys ingest`: append-only NDJSON "
        "segments under `landing/date=YYYY-MM-DD/`, fsynced before the collector answers. "
        "Invalid events are in `quarantine/intake/` with their original bytes."
    ),
    group_name="acquisition",
    kinds={"ndjson"},
)

WEBLOG_CHECKS = [
    dg.AssetCheckSpec(
        name, asset="weblogs", blocking=name not in CLIENT_BEHAVIOUR_CHECKS, description=text
    )
    for name, text in CHECK_DESCRIPTIONS.items()
]


def process_weblogs(
    context: dg.AssetExecutionContext, lake: LakeResource, recsys_config: RecsysConfig
) -> dg.MaterializeResult:
    """The ``weblogs`` asset's body (see :func:`build_weblogs`)."""
    rules = Rules(
        catalog_epoch=date.fromisoformat(recsys_config.catalog_epoch),
        now=datetime.now(UTC),
        future_tolerance_seconds=recsys_config.future_tolerance_seconds,
        bot_max_events_per_minute=recsys_config.bot_max_events_per_minute,
        session_gap_minutes=recsys_config.session_gap_minutes,
    )
    days = list(context.partition_keys)
    validator = WeblogValidator(
        recsys_config.max_duplicate_rate,
        max_unattributed_click_rate=recsys_config.max_unattributed_click_rate,
        min_rows=recsys_config.min_rows_for_rate_checks,
    )
    done = 0

    def log_partition(result: object) -> None:
        nonlocal done
        done += 1
        if done % 25 == 0 or done == len(days):
            context.log.info(f"processed {done}/{len(days)} partitions")

    try:
        run = process_partitions(
            lake.get(), days, rules, on_frames=validator.add_partition, on_partition=log_partition
        )
    except BaseException:
        validator.close()
        raise
    outcomes = validator.finish()
    table = "\n".join(
        f"| {p.partition} | {p.landing_files} | {p.landing_rows} | {p.rows} | {p.quarantined} |"
        for p in run.partitions[-60:]
    )
    checks = [
        dg.AssetCheckResult(
            check_name=o.name,
            passed=o.passed,
            severity=(
                dg.AssetCheckSeverity.WARN
                if o.name in CLIENT_BEHAVIOUR_CHECKS
                else dg.AssetCheckSeverity.ERROR
            ),
            metadata={
                "partitions_checked": len(days),
                "failed_partitions": ", ".join(o.failed_partitions[:50]) or "none",
                **{k: _meta(v) for k, v in o.observed.items()},
                # The one line the CLI prints for a failed check (which, how many, examples,
                # what to do), so the terminal and the UI say the same thing.
                **(
                    {"failure": failure_line(o.name, o.observed, o.failed_partitions)}
                    if not o.passed
                    else {}
                ),
            },
        )
        for o in outcomes.values()
    ]
    # Benign row-level anomalies, accounted for here whether or not any check failed.
    dupes = outcomes["conflicting_duplicate_rate_below_threshold"].observed
    clicks = outcomes["unattributed_click_rate_below_threshold"].observed
    anomalies = {
        "replayed_duplicates": int(dupes.get("replayed_duplicates", 0)),
        "conflicting_event_ids": int(dupes.get("conflicting_event_ids", 0)),
        "unattributed_clicks": int(clicks.get("unattributed_clicks", 0)),
        "clicks_with_request_id": int(clicks.get("clicks_with_request_id", 0)),
    }
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": run.rows,
            "partitions": len(days),
            "landing_rows": run.landing_rows,
            "quarantined": run.quarantined,
            "quarantine_reasons": dg.MetadataValue.json(run.reasons),
            **anomalies,
            "lake": dg.MetadataValue.path(lake.get().uri_for("weblogs")),
            "rules": dg.MetadataValue.json(orjson.loads(orjson.dumps(rules, default=str))),
            "per_partition": dg.MetadataValue.md(
                "| date | files | landed | rows | quarantined |\n|---|---|---|---|---|\n" + table
            ),
            "content_hashes": dg.MetadataValue.json(
                {p.partition: p.content_hash for p in run.partitions[-60:]}
            ),
        },
        check_results=checks,
    )


def build_weblogs(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The ``weblogs`` asset over ``partitions`` (see :func:`weblog_partitions`)."""
    return dg.asset(
        name="weblogs",
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[landing_weblogs],
        check_specs=WEBLOG_CHECKS,
        group_name="acquisition",
        kinds={"polars", "parquet"},
        tags={"recsys/pipeline": "weblogs"},
        description=(
            "Processed weblogs, one Parquet file per event date (UTC): schema coercion, dedup by "
            "event_id (replays counted as `replayed_duplicates`), bot-rate filter, out-of-range "
            "timestamps quarantined, sessions inferred where missing; clicks matching no logged "
            "impression are kept and counted as `unattributed_clicks`. Every partition is "
            "recomputed from all its landing files, so re-runs are idempotent; rejected rows go "
            "to `quarantine/weblogs/` with a reason."
        ),
    )(process_weblogs)


def _meta(value: object) -> object:
    if isinstance(value, list | dict):
        return dg.MetadataValue.json(value)
    return value
