"""``recsys-serve``: the recommendation service, with nothing from the training stack.

The serving image installs only what ``recsys_serving`` imports (no Dagster, no
great-expectations, no implicit: requirements-serving.lock), so its entry point has to
live here rather than in ``recsys_assets.cli``. ``recsys serve`` is this same command,
registered on the full CLI, so both spellings take the same options and behave alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Soft wrap: an error must stay one line for grep and scripts.
console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (about one per core).")] = 1,
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="Pin the model (oci://host/repo@sha256:... or a bundle directory) instead "
            "of following the registry's production and candidate aliases."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Server log level.")] = "warning",
    access_log: Annotated[
        bool,
        typer.Option(
            envvar="RECSYS_ACCESS_LOG",
            help="Log every request (one JSON line each, like every other log line).",
        ),
    ] = False,
) -> None:
    """Serve recommendations, /events, /admin, /healthz, /readyz and /metrics over HTTP."""
    # Every worker follows the registry (or the pinned --model-uri) on its own and swaps
    # models without a restart; token buckets and metrics are shared by all workers.
    # The workers read everything from the environment: settle it before they start.
    if model_uri:
        os.environ["RECSYS_MODEL_URI"] = model_uri
    # A server's output is its log: every line, these included, is rendered by
    # recsys_serving.logging (JSON unless RECSYS_LOG_FORMAT=console), and uvicorn's
    # log_config gives each worker process the same handler.
    from recsys_serving.logging import configure_logging, get_logger, uvicorn_log_config

    configure_logging()
    log = get_logger("recsys_serving.cli")
    from recsys_serving.keys import KeyFile, KeyRing, KeyStoreError
    from recsys_serving.settings import Settings

    try:
        settings = Settings()
        keyring = KeyRing(KeyFile.in_home(settings.resolved_home), settings.serving.api_keys)
    except (ValueError, KeyStoreError) as exc:
        _fail(str(exc))
    own_run_dir = settings.serving.run_dir is None
    run_dir = settings.serving.run_dir or _new_run_dir(settings.resolved_home, port)
    prom_dir = run_dir / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)  # must start empty (prometheus_client)
    prom_dir.mkdir(parents=True)
    os.environ["RECSYS_RUN_DIR"] = str(run_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)

    source = settings.serving.model_uri or f"registry in {settings.resolved_lake_uri}"
    active = [k for k in keyring.all_keys() if k.active]
    shown = "localhost" if host in {"0.0.0.0", "::"} else host
    if not settings.serving.auth_enabled:
        log.warning("serve.auth_disabled", hint="RECSYS_AUTH_ENABLED=false: no API keys needed")
    elif not active:
        log.warning(
            "serve.no_api_keys",
            hint="every API call will get 401; create a key with "
            "`recsys keys create --scopes recommend,events`",
        )
    log.info(
        "serve.starting",
        url=f"http://{shown}:{port}",
        docs=f"http://{shown}:{port}/docs",
        workers=workers,
        model_source=source,
    )
    import uvicorn

    from recsys_serving.api.http import UVICORN_HTTP

    try:
        uvicorn.run(
            "recsys_serving.api.app:service_app",
            factory=True,
            http=UVICORN_HTTP,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            log_config=uvicorn_log_config(),
            access_log=access_log,
            timeout_graceful_shutdown=10,
        )
    finally:
        if own_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _new_run_dir(home: Path, port: int) -> Path:
    base = home / "run"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"serve-{port}-", dir=base))


app = typer.Typer(
    name="recsys-serve",
    help="Serve recommendations over HTTP (the serving install's entry point).",
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(serve)


def main() -> None:
    """The ``recsys-serve`` console script."""
    app()


if __name__ == "__main__":
    main()
