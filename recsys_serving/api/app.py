"""Application factories: the full recommendation service, or the collector alone.

``create_app(settings)`` builds the service: ``POST /events`` (scope ``events``),
``/recommendations`` and ``/similar`` (scope ``recommend``), ``/admin`` (scope
``admin``), ``/healthz``, ``/readyz`` and ``/metrics``; API routes also live under
``/v1``. ``create_app(settings, collector_only=True)`` (``recsys collector``) is the
log shipper's endpoint as it always was: ``POST /events``, ``/healthz``, ``/metrics``,
no model and no API keys (deploy it inside the network, like the shipper).

All state is created here, per app, so tests run several apps side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool

from recsys_serving.api import admin, dashboard, events, health, heap, metrics, recommendations
from recsys_serving.api.auth import Guard, require
from recsys_serving.api.errors import StrictPercentEncoding, install_error_handlers
from recsys_serving.api.impressions import ImpressionLog
from recsys_serving.api.metrics import MetricsMiddleware, ServiceMetrics
from recsys_serving.api.model_manager import (
    ModelManager,
    ModelSource,
    PinnedSource,
    RegistrySource,
    ServingState,
)
from recsys_serving.api.serving import Recommending
from recsys_serving.api.throttle import TokenBuckets
from recsys_serving.events.intake import EventIntake
from recsys_serving.keys import KeyFile, KeyRing
from recsys_serving.lake import Lake, open_lake
from recsys_serving.logging import configure_logging, get_logger
from recsys_serving.settings import Settings, get_settings

log = get_logger(__name__)

_DEFAULT: Any = object()


def create_app(
    settings: Settings | None = None,
    *,
    collector_only: bool = False,
    model_source: ModelSource | None = None,
    loader: Callable[[Path], Any] | None = None,
    docstore: Any = _DEFAULT,
    index_opener: Callable[[Any], Any] | None = _DEFAULT,
    owns_heap: bool = False,
) -> FastAPI:
    """Build the app. ``model_source``, ``loader``, ``docstore`` and ``index_opener``
    (model -> CandidateIndex, or None for the bundle's embedded index) replace what
    the settings describe; tests inject failing stores or slow indexes through them.
    ``owns_heap``: the app is its process's only tenant (a ``recsys serve`` or
    ``recsys collector`` worker), so it may freeze the process heap once started and
    whenever its models change (:mod:`.heap`)."""
    settings = settings or get_settings()
    configure_logging()
    app = FastAPI(
        title="recsys",
        version="0.1.0",
        description=(
            "Weblog collector and recommendation service. API routes need an `X-API-Key` "
            "with the right scope (`recommend`, `events`, `admin`) unless auth is disabled; "
            "they are served both under `/v1` and unversioned."
        ),
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.collector_only = collector_only
    app.state.owns_heap = owns_heap
    app.state.lake = open_lake(
        settings.resolved_lake_uri,
        endpoint_url=settings.lake.s3_endpoint_url,
        region=settings.lake.aws_region,
    )
    app.state.intake = EventIntake(app.state.lake, settings)
    app.state.metrics = ServiceMetrics(settings.serving.run_dir)
    install_error_handlers(app)
    app.add_middleware(StrictPercentEncoding)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(health.router)
    app.include_router(metrics.router)
    if collector_only:
        app.include_router(events.router)
        app.include_router(events.router, prefix="/v1")
    else:
        _build_service(app, settings, model_source, loader, docstore, index_opener, owns_heap)
    _document_event_contract(app)
    return app


def _build_service(
    app: FastAPI,
    settings: Settings,
    model_source: ModelSource | None,
    loader: Callable[[Path], Any] | None,
    docstore: Any,
    index_opener: Callable[[Any], Any] | None,
    owns_heap: bool,
) -> None:
    service_metrics: ServiceMetrics = app.state.metrics
    app.state.keyring = KeyRing(KeyFile.in_home(settings.resolved_home), settings.serving.api_keys)
    app.state.guard = Guard(
        settings,
        app.state.keyring,
        TokenBuckets.for_run_dir(settings.serving.run_dir),
        service_metrics,
    )
    if docstore is _DEFAULT:
        docstore = _open_docstore(settings)
    app.state.docstore = docstore

    def on_change(state: ServingState) -> None:
        service_metrics.set_models(
            state.versions(), state.ready, state.candidate_share, state.stand_ins()
        )
        if owns_heap:
            heap.settle()

    manager = ModelManager(
        settings,
        model_source or default_model_source(settings, app.state.lake),
        loader or _recommender_loader(),
        on_change=on_change,
        on_refused=lambda reason: service_metrics.model_load_failures.labels(reason).inc(),
        index_opener=_index_opener(settings) if index_opener is _DEFAULT else index_opener,
    )
    app.state.manager = manager
    app.state.impressions = ImpressionLog(app.state.lake, settings, service_metrics)
    app.state.recommending = Recommending(
        settings, manager, docstore, service_metrics, app.state.impressions
    )
    events_scope = [Depends(require("events"))]
    for prefix in ("", "/v1"):
        app.include_router(events.router, prefix=prefix, dependencies=events_scope)
        app.include_router(recommendations.router, prefix=prefix)
        app.include_router(admin.router, prefix=prefix)
    app.include_router(health.ready_router)
    app.include_router(dashboard.router)


def default_model_source(settings: Settings, lake: Lake) -> ModelSource:
    """A pinned ``RECSYS_MODEL_URI`` if set, else the registry's aliases in the lake."""
    cache = settings.resolved_model_cache_dir
    if settings.serving.model_uri:
        return PinnedSource(settings.serving.model_uri, cache, settings)
    from recsys_serving.registry import ModelRegistry

    return RegistrySource(ModelRegistry(lake), cache)


def _recommender_loader() -> Callable[[Path], Any]:
    from recsys_serving.model.recommender import Recommender

    return Recommender.load


def _open_docstore(settings: Settings) -> Any:
    from recsys_serving.stores.docstore import open_docstore

    return open_docstore(settings)


def _index_opener(settings: Settings) -> Callable[[Any], Any] | None:
    """With Elasticsearch configured, each model version queries its own ES index."""
    if not settings.stores.es_url:
        return None
    from recsys_serving.index import IndexArtifact, open_index
    from recsys_serving.model.recommender import INDEX_DIR

    return lambda model: open_index(settings, IndexArtifact.load(Path(model.path) / INDEX_DIR))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    manager: ModelManager | None = getattr(app.state, "manager", None)
    writers: list[Any] = [app.state.intake]
    if manager is not None:
        writers.append(app.state.impressions)
    sealer = asyncio.create_task(_seal_periodically(writers, settings))
    if app.state.owns_heap:
        heap.settle()  # what start-up built lives as long as the process
    if manager is not None:
        manager.start()
    log.info("service.started", lake=app.state.lake.uri, collector_only=app.state.collector_only)
    try:
        yield
    finally:
        sealer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sealer
        if manager is not None:
            await run_in_threadpool(manager.stop)
            app.state.recommending.close()
            app.state.impressions.close()
        app.state.intake.close()
        log.info("service.stopped")


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
            _document_common_errors(spec)
            _document_repeatable_query_parameters(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_COMMON_ERRORS = {
    "400": "Malformed request: a body that cannot be parsed, or a request line and headers "
    "larger than the server accepts (about 64 KiB).",
}
_AUTH_ERRORS = {
    "401": "Missing, unknown or revoked API key.",
    "403": "The key lacks the scope this route needs.",
    "429": "Rate limit of the key; see `Retry-After`.",
}


def _document_common_errors(spec: dict[str, Any]) -> None:
    """Document the answers every operation can give besides its own.

    Any request can be refused as malformed (400); a route behind an API key can
    answer 401, 403 and 429; validation errors (422) have the service's one error
    shape, not FastAPI's default model.
    """
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "ErrorBody",
        {
            "title": "ErrorBody",
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string", "title": "Error"}, "detail": {}},
        },
    )
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            errors = {**_COMMON_ERRORS, **(_AUTH_ERRORS if operation.get("security") else {})}
            for status, description in errors.items():
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": _ERROR_REF}},
                    },
                )
            invalid = responses.get("422", {}).get("content", {}).get("application/json", {})
            if invalid.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
                invalid["schema"] = _ERROR_REF
    if not any(
        "HTTPValidationError" in str(op)
        for ops in spec.get("paths", {}).values()
        for op in ops.values()
    ):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def _document_repeatable_query_parameters(spec: dict[str, Any]) -> None:
    """A list in the query string is the parameter repeated: once is one value.

    FastAPI describes ``exclude: list[str] | None`` as an array or null; on the wire
    ``?exclude=i1`` is one id and null cannot be sent. Documented as what is read
    (one value, or an array of them), clients and fuzzers see the real contract.
    """
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") != "query":
                    continue
                branches = schema.get("anyOf", [schema])
                arrays = [b for b in branches if b.get("type") == "array" and "items" in b]
                if len(arrays) != 1 or any(
                    b.get("type") not in ("array", "null") for b in branches
                ):
                    continue
                array_keys = ("anyOf", "type", "items", "minItems", "maxItems", "uniqueItems")
                kept = {k: v for k, v in schema.items() if k not in array_keys}
                parameter["schema"] = {"anyOf": [arrays[0]["items"], arrays[0]], **kept}
                parameter.setdefault("style", "form")
                parameter.setdefault("explode", True)


async def _seal_periodically(writers: list[Any], settings: Settings) -> None:
    """Seal idle segments so quiet traffic still reaches the weblogs sensor."""
    interval = max(0.5, min(5.0, settings.collector.landing_segment_max_age_seconds / 2))
    while True:
        await asyncio.sleep(interval)
        for writer in writers:
            try:
                await run_in_threadpool(writer.seal_expired)
            except Exception as exc:  # keep sealing even if one attempt fails
                log.error("collector.seal_failed", error=str(exc))


def collector_app() -> FastAPI:
    """Entry point for ``uvicorn --factory recsys_serving.api.app:collector_app``."""
    return create_app(collector_only=True, owns_heap=True)


def service_app() -> FastAPI:
    """Entry point for ``uvicorn --factory recsys_serving.api.app:service_app`` (each
    worker builds its own app from the ``RECSYS_*`` environment)."""
    return create_app(owns_heap=True)
