"""``recsys catalog``: load items and users into the document store, and show what it holds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from recsys_assets.cli import app
from recsys_assets.cli.common import console, fail, out, progress, summary

catalog_app = typer.Typer(
    help="Items and users in the document store (MongoDB API; embedded by default).",
    no_args_is_help=True,
)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command()
def load(
    items: Annotated[
        Path | None, typer.Option(help="Items NDJSON (.gz ok): item_id, title, categories, ...")
    ] = None,
    users: Annotated[Path | None, typer.Option(help="Users NDJSON (.gz ok): user_id, ...")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Documents per bulk upsert.")] = 1000,
    show_errors: Annotated[int, typer.Option(help="Rejections to print (file:line).")] = 20,
) -> None:
    """Upsert items and/or users; invalid lines are quarantined to the lake with the reason."""
    from recsys_assets.ingest import count_lines
    from recsys_serving.lake import open_lake
    from recsys_serving.settings import Settings
    from recsys_serving.stores.catalog import CatalogFileError, Kind, Rejection, load_file
    from recsys_serving.stores.docstore import DocStoreError, open_docstore

    jobs: list[tuple[Kind, Path]] = [
        (kind, path) for kind, path in (("items", items), ("users", users)) if path is not None
    ]
    if not jobs:
        fail("nothing to load: give --items FILE and/or --users FILE")
    for _, path in jobs:
        if not path.is_file():
            fail(f"{path}: no such file")
    settings = Settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    started = time.perf_counter()
    shown = 0
    reports = []
    failed = False
    try:
        store = open_docstore(settings)
    except DocStoreError as exc:
        fail(str(exc))
    with store, progress() as bar:
        for kind, path in jobs:
            total = count_lines(path) if path.suffix != ".gz" else None
            task = bar.add_task(f"loading {kind} from {path.name}", total=total)

            def on_progress(n: int, rejected: list[Rejection], task: int = task) -> None:
                nonlocal shown
                bar.update(task, advance=n)
                for rej in rejected:
                    if shown < show_errors:
                        bar.console.print(
                            f"[yellow]{escape(rej.at)}[/]: {rej.code}: {escape(rej.reason)}",
                            soft_wrap=True,
                        )
                        shown += 1

            try:
                report = load_file(
                    store, lake, path, kind, batch_size=batch_size, on_progress=on_progress
                )
            except (CatalogFileError, DocStoreError) as exc:
                bar.console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                failed = True
                continue
            if report.file_error:
                bar.console.print(f"[bold red]error:[/] {escape(report.file_error)}")
                failed = True
            reports.append(report)
    hidden = sum(r.rejected for r in reports) - shown
    if hidden > 0:
        console.print(f"... {hidden:,} more rejections, all in the lake under quarantine/catalog/")
    parts = "; ".join(r.describe() for r in reports) or "nothing loaded"
    summary(f"catalog: {parts}; store {store.uri} in {time.perf_counter() - started:.1f}s")
    if failed:
        raise typer.Exit(1)


@catalog_app.command()
def status() -> None:
    """Documents in the store, where it lives (no credentials), quarantined lines."""
    from recsys_serving.lake import open_lake
    from recsys_serving.settings import Settings
    from recsys_serving.stores.catalog import quarantined_counts
    from recsys_serving.stores.docstore import DocStoreError, open_docstore

    settings = Settings()
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    try:
        with open_docstore(settings) as store:
            counts = store.counts()
            uri, backend = store.uri, store.backend
    except DocStoreError as exc:
        fail(str(exc))
    quarantined = quarantined_counts(lake)
    out.print(f"store: {uri} ({backend})")
    for kind in ("items", "users"):
        out.print(f"{kind}: {counts[kind]:,} documents, {quarantined[kind]:,} lines quarantined")
    summary(f"catalog {uri}: {counts['items']:,} items, {counts['users']:,} users")
