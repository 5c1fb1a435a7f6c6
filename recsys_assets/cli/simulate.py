"""``recsys simulate``: synthetic historic weblogs (plus catalogue and ground truth), and
``recsys simulate live``: simulated users playing against a running server."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import fail, out, progress, summary


def _parse_end(value: str | None) -> datetime | None:
    """ISO date or date-time; naive values are UTC, because log timestamps are."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(f"--end: not an ISO date or date-time: {value!r}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


simulate_app = typer.Typer(
    help="Synthetic weblogs from a ground-truth preference model; `live` plays users.",
    no_args_is_help=False,
    invoke_without_command=True,
)
app.add_typer(simulate_app, name="simulate")


@simulate_app.callback(invoke_without_command=True)
def simulate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/sim"),
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 2_000,
    items: Annotated[int, typer.Option(min=1, help="Number of items.")] = 1_000,
    categories: Annotated[int, typer.Option(min=1, help="Number of item categories.")] = 20,
    days: Annotated[float, typer.Option(min=0.001, help="Length of the simulated period.")] = 14,
    events: Annotated[int, typer.Option(min=0, help="Number of weblog lines to write.")] = 300_000,
    seed: Annotated[int, typer.Option(help="Same seed and --end, same bytes.")] = 42,
    corrupt_fraction: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of lines replaced with bad input."),
    ] = 0.0,
    end: Annotated[
        str | None,
        typer.Option(help="End of the period, ISO date/time (UTC if no offset); default: now."),
    ] = None,
    files: Annotated[
        int | None, typer.Option(min=1, help="Weblog part files (default: one per 2M events).")
    ] = None,
) -> None:
    """Simulate users browsing a shop: weblogs, items, users and the hidden ground truth.

    With a subcommand (`recsys simulate live ...`) the options here are not used.
    """
    if ctx.invoked_subcommand is not None:
        return
    from recsys_assets.simulation.history import simulate_history

    end_at = _parse_end(end)
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("simulating", total=events)

        def on_progress(written: int, total: int) -> None:
            bar.update(task, completed=written)

        try:
            result = simulate_history(
                out,
                n_users=users,
                n_items=items,
                n_categories=categories,
                days=days,
                n_events=events,
                seed=seed,
                end=end_at,
                corrupt_fraction=corrupt_fraction,
                files=files,
                progress_cb=on_progress,
            )
        except ValueError as exc:
            fail(str(exc))
    elapsed = time.perf_counter() - started
    summary(
        f"simulated {result.n_events:,} events ({result.n_corrupt:,} corrupt) for "
        f"{users:,} users x {items:,} items over {days:g} days -> {out} in {elapsed:.1f}s"
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str, option: str) -> float:
    """Seconds from ``90``, ``90s``, ``5m`` or ``1.5h``."""
    text = value.strip().lower()
    scale = _UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        fail(f"{option}: not a duration (try 90, 90s, 5m or 1h): {value!r}")
    if seconds < 0:
        fail(f"{option}: must not be negative: {value!r}")
    return seconds


@simulate_app.command("live")
def live(
    url: Annotated[str, typer.Option(help="Base URL of the running service.")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None,
        typer.Option(envvar="RECSYS_API_KEY", help="X-API-Key (scopes: recommend, events)."),
    ] = None,
    truth: Annotated[
        Path, typer.Option(help="Ground truth written by `recsys simulate` (truth.npz/.json).")
    ] = Path("data/sim/truth"),
    users: Annotated[
        int, typer.Option(min=1, help="Simulated users (few users, many requests).")
    ] = 200,
    rps: Annotated[
        float, typer.Option(min=0.01, help="Target recommendation requests/second.")
    ] = 20.0,
    duration: Annotated[str, typer.Option(help="How long to play: 90s, 5m, 1h.")] = "2m",
    drift_at: Annotated[
        str | None, typer.Option(help="When user tastes shift (after start): e.g. 60s.")
    ] = None,
    drift_strength: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="0 = no change, 1 = unrelated tastes.")
    ] = 0.8,
    trend_shift: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="At the drift, share of item popularity reassigned."),
    ] = 0.0,
    new_items: Annotated[int, typer.Option(min=0, help="Items that appear at the drift.")] = 0,
    browse: Annotated[
        float,
        typer.Option(
            min=0.0, max=10.0, help="Organic views outside the slates per request (mean)."
        ),
    ] = 0.0,
    k: Annotated[int, typer.Option(min=1, max=100, help="Items per recommendation.")] = 10,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = 16,
    interval: Annotated[str, typer.Option(help="Seconds between live lines.")] = "5s",
    timeline: Annotated[
        Path | None,
        typer.Option(help="NDJSON timeline to write (default: live-<time>.ndjson beside truth)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of user choice, clicks and the drift.")] = 0,
    load_catalog: Annotated[
        bool,
        typer.Option(help="Load the drift's new items into the document store (RECSYS_*)."),
    ] = True,
) -> None:
    """Play users against a running server, with an optional preference drift mid-run.

    Recommendations are asked for over HTTP, clicks are drawn from the ground truth
    (position bias included) and posted with downstream events to `POST /events`.
    """
    from recsys_assets.simulation.live import LiveConfig, run_live
    from recsys_assets.simulation.truth import GroundTruth

    try:
        world = GroundTruth.load(truth)
    except FileNotFoundError as exc:
        fail(f"--truth: {exc.filename} not found; run `recsys simulate` first")
    except (ValueError, KeyError) as exc:
        fail(f"--truth: {truth}: {exc}")
    seconds = parse_duration(duration, "--duration")
    drift = parse_duration(drift_at, "--drift-at") if drift_at is not None else None
    if timeline is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        timeline = Path(truth).parent / f"live-{stamp}.ndjson"
    try:
        config = LiveConfig(
            base_url=url,
            api_key=api_key,
            users=users,
            rps=rps,
            duration=seconds,
            drift_at=drift,
            drift_strength=drift_strength,
            drift_new_items=new_items,
            trend_shift=trend_shift,
            browse=browse,
            k=k,
            concurrency=concurrency,
            interval=parse_duration(interval, "--interval") or 1.0,
            seed=seed,
            timeline_path=timeline,
        )
    except ValueError as exc:
        fail(str(exc))
    on_drift = _catalog_loader() if load_catalog and new_items else None
    result = run_live(
        world, config, on_line=lambda line: out.print(line, highlight=False), on_drift=on_drift
    )
    summary(result.describe() + f" -> {timeline}")
    if result.requests == 0:
        raise typer.Exit(1)


def _catalog_loader() -> Callable[[Any, Path | None], None]:
    """Upsert the drift's new items into the document store the service reads, so
    they can be recommended once a retraining has seen them."""

    def load(_truth: Any, items_path: Path | None) -> None:
        from recsys_serving.lake import open_lake
        from recsys_serving.settings import Settings
        from recsys_serving.stores.catalog import load_file
        from recsys_serving.stores.docstore import open_docstore

        if items_path is None:
            return
        settings = Settings()
        lake = open_lake(
            settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
        )
        with open_docstore(settings) as store:
            report = load_file(store, lake, items_path, "items")
        out.print(f"catalog: {report.describe()}", highlight=False)

    return load
