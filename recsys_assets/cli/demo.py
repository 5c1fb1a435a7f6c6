"""``recsys demo``: the whole acquisition stage on embedded defaults, start to finish."""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import console, out, progress, summary


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Simulated history size.")] = 300_000,
    days: Annotated[int, typer.Option(help="Days of simulated history.")] = 14,
    seed: Annotated[int, typer.Option()] = 7,
    fresh: Annotated[
        bool, typer.Option(help="Start from an empty lake (the Dagster run history is kept).")
    ] = True,
) -> None:
    """Simulate weblogs, send live events to the collector, process them in Dagster."""
    from recsys_assets.ingest import ingest_files
    from recsys_assets.runs import materialize_weblogs
    from recsys_assets.simulation.history import simulate_history
    from recsys_serving.events.intake import EventIntake
    from recsys_serving.lake import open_lake
    from recsys_serving.landing import list_sealed
    from recsys_serving.settings import Settings

    started = time.perf_counter()
    settings = Settings()
    home = settings.resolved_home
    sim_dir = home / "sim"
    if fresh:
        for path in (sim_dir, Path(settings.resolved_lake_uri)):
            if path.exists() and not settings.resolved_lake_uri.startswith("s3://"):
                shutil.rmtree(path)
    console.rule("1/4  simulate a history of user weblogs")
    with progress() as bar:
        task = bar.add_task("simulating", total=events)
        sim = simulate_history(
            sim_dir,
            n_users=3_000,
            n_items=1_500,
            n_categories=20,
            days=days,
            n_events=events,
            seed=seed,
            corrupt_fraction=0.0005,
            progress_cb=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(
        f"{sim.n_events:,} events ({sim.n_corrupt} deliberately corrupt), {sim.n_users:,} users, "
        f"{sim.n_items:,} items, logging-policy CTR {sim.ctr:.1%}"
    )

    console.rule("2/4  backfill them with `recsys ingest`")
    lake = open_lake(settings.resolved_lake_uri, settings.s3_endpoint_url, settings.aws_region)
    with progress() as bar:
        task = bar.add_task("ingesting", total=sim.n_events)
        report = ingest_files(
            sim.weblog_paths,
            EventIntake(lake, settings),
            on_progress=lambda _p, n, _r: bar.update(task, advance=n),
        )
    r = report.result
    out.print(f"{r.accepted:,} landed, {r.rejected:,} quarantined {dict(r.reasons)}")

    console.rule("3/4  live traffic through the collector (POST /events over HTTP)")
    answers = _post_live_events(settings, sim.truth_path, seed)
    for answer in answers:
        out.print(
            f"202 received={answer['received']} accepted={answer['accepted']} "
            f"rejected={answer['rejected']} {answer['reasons']}"
        )

    console.rule("4/4  process every landed date in one Dagster run")
    days_landed = sorted({f.date for f in list_sealed(lake)})
    with console.status(f"materializing weblogs {days_landed[0]}..{days_landed[-1]}"):
        outcome = materialize_weblogs(settings, days_landed)
    meta = outcome.materialized.get("weblogs", {})
    for name, ok in sorted(outcome.checks.items()):
        out.print(f"  check {name}: {'passed' if ok else 'FAILED'}")
    console.rule("where to look")
    out.print(f"lake:         {lake.uri_for('weblogs')}/date=YYYY-MM-DD/part-0.parquet")
    out.print(f"quarantine:   {lake.uri_for('quarantine')}/ (intake/ and weblogs/, with reasons)")
    out.print(
        f"Dagster UI:   make ui  ->  http://127.0.0.1:3000/assets/weblogs "
        f"(run {outcome.run_id[:8]})"
    )
    out.print("event schema: recsys_serving/schemas/weblog_event.schema.json")
    passed = sum(outcome.checks.values())
    summary(
        f"demo: {meta.get('dagster/row_count', 0):,} weblog rows in {len(days_landed)} partitions, "
        f"{meta.get('quarantined', 0) + r.rejected:,} quarantined, checks {passed}/"
        f"{len(outcome.checks)} passed in {time.perf_counter() - started:.0f}s"
    )
    if not outcome.success:
        raise typer.Exit(1)


def _post_live_events(settings: Any, truth_path: Path, seed: int) -> list[dict[str, Any]]:
    """Run the real collector on loopback and send it two NDJSON batches."""
    import httpx
    import orjson
    import uvicorn

    from recsys_assets.simulation.truth import GroundTruth
    from recsys_serving.api.app import create_app
    from recsys_serving.logging import configure_logging

    configure_logging("WARNING")  # the demo prints the collector's answers itself
    truth = GroundTruth.load(truth_path)
    rng = random.Random(seed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, collector_only=True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    answers = []
    try:
        users, items = truth.user_ids, truth.item_ids
        for batch in range(2):
            lines = []
            now = time.time()
            for req in range(50):
                user = rng.choice(users)
                rid = f"live-{seed}-{batch}-{req}"
                for pos in range(10):
                    lines.append(
                        orjson.dumps(
                            {
                                "event_id": f"{rid}-imp-{pos}",
                                "event_type": "impression",
                                "user_id": user,
                                "item_id": rng.choice(items),
                                "ts": now - rng.uniform(0, 120),
                                "request_id": rid,
                                "position": pos,
                            }
                        )
                    )
            lines.append(b'{"event_id": "oops", "event_type": "click", "user_id": 12')
            resp = httpx.post(
                f"http://127.0.0.1:{port}/events",
                content=b"\n".join(lines),
                headers={"Content-Type": "application/x-ndjson"},
                timeout=30,
            )
            answers.append(resp.json())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return answers
