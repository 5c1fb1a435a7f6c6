"""Run ``process_partitions`` over landed dates, without Dagster (optionally with the GX checks).

Started as a subprocess by ``bench/ingest.py`` so its peak RSS is its own and so the
figures separate the business rules + Parquet writes (the default), the
great-expectations checks (``--checks``: the ``weblogs`` asset's work without
Dagster) and Dagster's own bookkeeping (``recsys process``). ``--days N`` processes
only the first N landed dates, to show that peak memory follows a partition, not
the length of the range. ``RECSYS_HOME`` (from the environment) names the lake.
Prints progress to stderr and one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from datetime import UTC, datetime

import orjson

from recsys_assets.weblogs.processing import PartitionResult, Rules, process_partitions
from recsys_serving.lake import open_lake
from recsys_serving.landing import list_sealed
from recsys_serving.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", type=int, default=0, help="print the top N cProfile rows")
    parser.add_argument("--checks", action="store_true", help="also run the GX checks")
    parser.add_argument("--days", type=int, default=0, help="only the first N landed dates")
    args = parser.parse_args(argv)

    settings = Settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    days = sorted({f.date for f in list_sealed(lake)})
    if args.days:
        days = days[: args.days]
    rules = Rules(
        catalog_epoch=settings.events.catalog_epoch,
        now=datetime.now(UTC),
        future_tolerance_seconds=settings.events.future_tolerance_seconds,
        bot_max_events_per_minute=settings.events.bot_max_events_per_minute,
        session_gap_minutes=settings.events.session_gap_minutes,
    )
    done = 0

    def on_partition(result: PartitionResult) -> None:
        nonlocal done
        done += 1
        if done % 5 == 0 or done == len(days):
            print(
                f"    process: {done}/{len(days)} partitions ({result.partition}: "
                f"{result.landing_rows:,} rows)",
                file=sys.stderr,
                flush=True,
            )

    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    checks: dict[str, bool] = {}
    if args.checks:
        # Imported inside the timed region: the asset pays the GX import too.
        from recsys_assets.weblogs.quality import WeblogValidator

        validator = WeblogValidator(
            settings.events.max_duplicate_rate,
            max_unattributed_click_rate=settings.events.max_unattributed_click_rate,
            min_rows=settings.events.min_rows_for_rate_checks,
        )
        run = process_partitions(
            lake, days, rules, on_frames=validator.add_partition, on_partition=on_partition
        )
        checks = {name: o.passed for name, o in validator.finish().items()}
    else:
        run = process_partitions(lake, days, rules, on_partition=on_partition)
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - started
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(text.getvalue(), file=sys.stderr)
    result = {
        "partitions": len(days),
        "landing_rows": run.landing_rows,
        "rows": run.rows,
        "quarantined": run.quarantined,
        "reasons": run.reasons,
        "max_partition_rows": max((p.landing_rows for p in run.partitions), default=0),
        "checks": checks,
        "work_s": elapsed,
    }
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
