"""Data acquisition commands: ingest, process, status, schema, collector, ui."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from recsys_assets.cli import app
from recsys_assets.cli.common import console, fail, out, progress, summary


def _settings():
    from recsys_serving.settings import Settings

    return Settings()


def seal_orphans(lake, settings) -> list[str]:
    """Seal the segments a crashed writer (``recsys ingest``, a collector) left open, so
    they are processed without waiting for the daemon's landing sensor; the landing
    dates they hold. A segment a live writer holds is never touched."""
    from recsys_serving.landing import parse_sealed_key, recover_orphans
    from recsys_serving.layout import INTAKE_QUARANTINE_AREA, LANDING_AREA

    age = settings.collector.landing_segment_max_age_seconds
    landed = recover_orphans(lake, LANDING_AREA, older_than_seconds=age)
    rejected = recover_orphans(lake, INTAKE_QUARANTINE_AREA, older_than_seconds=age)
    days = sorted({f.date for k in landed if (f := parse_sealed_key(k)) is not None})
    if landed or rejected:
        console.print(
            f"sealed {len(landed) + len(rejected)} segment(s) left open by a crashed writer"
            + (f" (landing dates {', '.join(days)})" if days else "")
        )
    return days


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="NDJSON or JSON-array files (.gz ok).")],
    process: Annotated[
        bool, typer.Option(help="Materialize the touched weblogs partitions in one run.")
    ] = True,
    show_errors: Annotated[int, typer.Option(help="Rejections to print (file:line).")] = 20,
) -> None:
    """Land events from log files (backfills, own log shippers) and process them."""
    from recsys_assets.ingest import count_lines, ingest_files
    from recsys_serving.events.intake import EventIntake
    from recsys_serving.lake import open_lake

    settings = _settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    recovered = seal_orphans(lake, settings)
    intake = EventIntake(lake, settings)
    started = time.perf_counter()
    shown = 0
    with progress() as bar:
        total = sum(count_lines(f) for f in files if f.is_file() and f.suffix != ".gz") or None
        task = bar.add_task("ingesting", total=total)

        def on_progress(path: Path, n: int, result) -> None:
            nonlocal shown
            bar.update(task, advance=n, description=f"ingesting {path.name}")
            for err in result.errors:
                if shown < show_errors:
                    bar.console.print(
                        f"[yellow]{escape(err['at'])}[/]: {err['code']}: {escape(err['reason'])}",
                        soft_wrap=True,
                    )
                    shown += 1

        report = ingest_files(
            files,
            intake,
            on_progress=on_progress,
            on_file_error=lambda m: bar.console.print(f"[bold red]{escape(m)}[/]", soft_wrap=True),
        )
    r = report.result
    elapsed = time.perf_counter() - started
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(r.reasons.items()))
    for message in report.rejected_files:
        console.print(f"[bold red]{escape(message)}[/]", soft_wrap=True)
    summary(
        f"ingested {r.received:,} events from {report.files} file(s): {r.accepted:,} landed, "
        f"{r.rejected:,} quarantined{f' ({reasons})' if reasons else ''} in {elapsed:.1f}s "
        f"({r.received / max(elapsed, 1e-9):,.0f} events/s)"
    )
    failed = bool(report.failed_files or report.rejected_files)
    days = sorted(set(r.days) | set(recovered))
    if process and days:
        # One run per stretch of nearby dates: a file holding a 2001 event among
        # today's must not become a run over every empty partition in between.
        for stretch in contiguous_days(days):
            failed |= not _process_days(settings, stretch, expected_rows=r.accepted)
    if failed:
        raise typer.Exit(1)


MAX_EMPTY_DAYS_IN_A_RUN = 31


def contiguous_days(days: list[str], max_gap: int = MAX_EMPTY_DAYS_IN_A_RUN) -> list[list[str]]:
    """Sorted ISO dates split into stretches with at most ``max_gap`` empty days inside.

    One run per date would cost seconds each on a sparse log (a date here and there
    over years); one run over the whole range would walk every empty partition in
    between (a 2001 event among today's: 25 years). A month of empty partitions costs
    a run little, so nearer dates share one.
    """
    from datetime import date, timedelta

    runs: list[list[str]] = []
    for day in days:
        gap = date.fromisoformat(day) - date.fromisoformat(runs[-1][-1]) if runs else None
        if gap is not None and gap <= timedelta(max_gap + 1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


@app.command("process")
def process_cmd(
    start: Annotated[str | None, typer.Option(help="First date (YYYY-MM-DD).")] = None,
    end: Annotated[str | None, typer.Option(help="Last date (YYYY-MM-DD).")] = None,
) -> None:
    """Re-run weblogs partitions (all dates with landed data, or a date range)."""
    from recsys_serving.lake import open_lake
    from recsys_serving.landing import list_sealed

    settings = _settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    seal_orphans(lake, settings)
    days = sorted({f.date for f in list_sealed(lake)})
    days = [d for d in days if (start is None or d >= start) and (end is None or d <= end)]
    if start and end:
        days = sorted(set(days) | {start, end})
    if not days:
        fail("no landed data in that range; run `recsys ingest` or POST /events first")
    chosen = set(days)
    landed_bytes = sum(f.size for f in list_sealed(lake) if f.date in chosen)
    if not _process_days(settings, days, expected_rows=landed_bytes // MIN_LANDING_LINE_BYTES):
        raise typer.Exit(1)


# A landing line is at least this long in practice (ids, type, ts: ~200 bytes in the
# simulator's logs), so landed bytes / this never overstates a run's rows much.
MIN_LANDING_LINE_BYTES = 120


def _process_days(settings, days: list[str], expected_rows: int = 0) -> bool:
    """Run ``weblogs_job`` over ``days``. ``expected_rows``: about how many rows the
    run processes; a run large enough for its checks to validate in a worker process
    gets that process started first, so GX's import overlaps Dagster's start."""
    from recsys_assets.weblogs.quality import (
        BATCH_ROWS,
        CLIENT_BEHAVIOUR_CHECKS,
        Thresholds,
        discard_prestarted_worker,
        prestart_worker,
    )

    if expected_rows >= BATCH_ROWS:
        events = settings.events
        prestart_worker(
            Thresholds(
                events.max_duplicate_rate,
                events.max_unattributed_click_rate,
                events.min_rows_for_rate_checks,
            )
        )
    from recsys_assets.runs import materialize_weblogs

    started = time.perf_counter()
    try:
        with console.status(f"processing weblogs {days[0]}..{days[-1]} ({len(days)} dates)"):
            outcome = materialize_weblogs(settings, days)
    finally:
        discard_prestarted_worker()  # a run that never validated in a process
    meta = outcome.materialized.get("weblogs", {})
    passed = sum(outcome.checks.values())
    for name, ok in sorted(outcome.checks.items()):
        if ok:
            console.print(f"  check {name}: [green]passed[/]")
    # A failed check is one line (which, how many rows, two examples, what to do); any
    # other failure is its error on one line. Stack traces stay in the run's log.
    blocked = False
    for name, line in outcome.check_failures.items():
        if name in CLIENT_BEHAVIOUR_CHECKS:  # a client's fault: told, never blocking
            console.print(f"[bold yellow]warning (not blocking):[/] {escape(line)}")
        else:
            blocked = True
            console.print(f"[bold red]{escape(line)}[/]")
    if outcome.failure and not blocked:
        console.print(f"[bold red]run failed:[/] {escape(outcome.failure)}")
    reasons = meta.get("quarantine_reasons") or {}
    why = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items()))
    unattributed = meta.get("unattributed_clicks", 0)
    summary(
        f"weblogs {days[0]}..{days[-1]}: {meta.get('dagster/row_count', 0):,} rows, "
        f"{meta.get('quarantined', 0):,} quarantined{f' ({why})' if why else ''}"
        f"{f', {unattributed:,} unattributed clicks kept' if unattributed else ''}; "
        f"checks {passed}/{len(outcome.checks)} "
        f"passed; run {outcome.run_id[:8]} {'succeeded' if outcome.success else 'FAILED'} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return outcome.success


@app.command()
def status() -> None:
    """What is in the lake: landing, weblogs partitions, quarantine."""
    from recsys_serving.lake import open_lake, read_parquet
    from recsys_serving.landing import list_open, list_sealed
    from recsys_serving.layout import (
        INTAKE_QUARANTINE_AREA,
        LANDING_AREA,
        WEBLOGS_AREA,
        WEBLOGS_QUARANTINE_AREA,
        partitions,
    )

    settings = _settings()
    if _missing_local_lake(settings):
        return
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    seal_orphans(lake, settings)
    still_open = list_open(lake, LANDING_AREA) + list_open(lake, INTAKE_QUARANTINE_AREA)
    landing = list_sealed(lake)
    intake_q = list_sealed(lake, INTAKE_QUARANTINE_AREA)
    weblogs = partitions(lake, WEBLOGS_AREA)
    parts = [o.key for o in weblogs.values()]
    qparts = [o.key for o in partitions(lake, WEBLOGS_QUARANTINE_AREA).values()]
    rows = sum(read_parquet(lake, k, ["event_id"]).height for k in parts)
    qrows = sum(read_parquet(lake, k, ["reason"]).height for k in qparts)
    intake_rows = sum(lake.get_bytes(f.key).count(b"\n") for f in intake_q)
    dates = list(weblogs)
    out.print(f"lake: {lake.uri}")
    out.print(f"landing: {len(landing):,} sealed files, {sum(f.size for f in landing):,} bytes")
    live = sum(seg.live for seg in still_open)
    out.print(
        f"open segments: {len(still_open):,} ({sum(seg.size for seg in still_open):,} bytes): "
        f"{live:,} held by a live writer, {len(still_open) - live:,} orphaned (sealed once "
        f"idle for {settings.collector.landing_segment_max_age_seconds:g}s)"
    )
    out.print(f"intake quarantine: {intake_rows:,} events in {len(intake_q):,} files")
    span = f" ({dates[0]}..{dates[-1]})" if dates else ""
    out.print(f"weblogs: {len(parts):,} partitions{span}, {rows:,} rows")
    out.print(f"weblogs quarantine: {qrows:,} rows")
    summary(f"lake {lake.uri}: {rows:,} weblog rows in {len(parts)} partitions")


def _missing_local_lake(settings) -> bool:
    """Say so when the local lake does not exist: status is read-only, and opening a
    local lake creates it (a status run from the wrong directory used to leave a
    ``./.recsys`` behind)."""
    uri = settings.resolved_lake_uri
    if uri.startswith("s3://"):
        return False
    root = Path(uri.removeprefix("file://")).expanduser().resolve()
    if root.is_dir():
        return False
    out.print(f"lake: {root}")
    summary(
        f"nothing there: no lake at {root} (RECSYS_HOME is {settings.resolved_home}); "
        "set RECSYS_HOME to your recsys home, or run `recsys ingest` or `make demo` to start one"
    )
    return True


@app.command()
def schema(
    out_path: Annotated[Path | None, typer.Option("--out", help="Write to a file.")] = None,
) -> None:
    """Print the weblog event JSON Schema (the contract log shippers follow)."""
    from recsys_serving.events.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out_path:
        out_path.write_text(text)
        summary(f"wrote {out_path}")
    else:
        sys.stdout.write(text)


@app.command()
def collector(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Run the event collector alone (POST /events, GET /healthz)."""
    import uvicorn

    from recsys_serving.api.http import UVICORN_HTTP
    from recsys_serving.logging import uvicorn_log_config

    uvicorn.run(
        "recsys_serving.api.app:collector_app",
        factory=True,
        http=UVICORN_HTTP,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        log_config=uvicorn_log_config(),  # uvicorn's lines in the service's JSON format
    )


@app.command()
def ui(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 3000,
) -> None:
    """Open the Dagster UI (and daemon) on this project's instance under RECSYS_HOME."""
    from recsys_assets.instance import PROJECT_WORKSPACE_YAML, ensure_dagster_home

    home = ensure_dagster_home(_settings())
    console.print(f"Dagster instance: {home}  UI: http://{host}:{port}")
    # The workspace ships with the package and names a module, not a path: this works
    # from any directory and from a non-editable install. `python -m dagster` rather
    # than a script beside the interpreter, which a venv without scripts lacks.
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(PROJECT_WORKSPACE_YAML),
        "-h",
        host,
        "-p",
        str(port),
    ]
    raise typer.Exit(subprocess.call(cmd, cwd=home, env=os.environ.copy()))
