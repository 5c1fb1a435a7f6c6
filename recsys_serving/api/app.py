"""Application factory: the collector alone, or the full service as later parts land."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from recsys_serving.api import events, health
from recsys_serving.api.errors import install_error_handlers
from recsys_serving.events.intake import EventIntake
from recsys_serving.lake import open_lake
from recsys_serving.logging import configure_logging, get_logger
from recsys_serving.settings import Settings, get_settings

log = get_logger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; state is created here so tests can run several apps side by side."""
    settings = settings or get_settings()
    configure_logging()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sealer = asyncio.create_task(_seal_periodically(app.state.intake, settings))
        log.info("collector.started", lake=app.state.lake.uri)
        try:
            yield
        finally:
            sealer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sealer
            app.state.intake.close()
            log.info("collector.stopped")

    app = FastAPI(
        title="recsys",
        version="0.1.0",
        description="Weblog collector and recommendation service.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.lake = open_lake(
        settings.resolved_lake_uri,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    app.state.intake = EventIntake(app.state.lake, settings)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(events.router)
    app.include_router(events.router, prefix="/v1")
    _document_event_contract(app)
    return app


def _document_event_contract(app: FastAPI) -> None:
    """Publish the weblog contract in OpenAPI (the request body is read raw for speed)."""
    from fastapi.openapi.utils import get_openapi

    from recsys_serving.events.schema import json_schema

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            contract = {k: v for k, v in json_schema().items() if not k.startswith("$")}
            spec.setdefault("components", {}).setdefault("schemas", {})["WeblogEvent"] = contract
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _seal_periodically(intake: EventIntake, settings: Settings) -> None:
    """Seal idle segments so quiet traffic still reaches the weblogs sensor."""
    interval = max(0.5, min(5.0, settings.landing_segment_max_age_seconds / 2))
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(intake.seal_expired)
        except Exception as exc:  # keep sealing even if one attempt fails
            log.error("collector.seal_failed", error=str(exc))


def collector_app() -> FastAPI:
    """Entry point for ``uvicorn --factory recsys_serving.api.app:collector_app``."""
    return create_app()
