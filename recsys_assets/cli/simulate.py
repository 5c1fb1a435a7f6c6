"""``recsys simulate``: synthetic historic weblogs (plus catalogue and ground truth)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import fail, progress, summary


def _parse_end(value: str | None) -> datetime | None:
    """ISO date or date-time; naive values are UTC, because log timestamps are."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(f"--end: not an ISO date or date-time: {value!r}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@app.command("simulate")
def simulate(
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
    """Simulate users browsing a shop: weblogs, items, users and the hidden ground truth."""
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
