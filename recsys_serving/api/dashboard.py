"""The live service dashboard: ``GET /dashboard`` and what it loads.

How it is protected: the page, its script and style, the charting bundle and
``/dashboard/config`` are public chrome with no data in them; the figures come from
``GET /dashboard/data``, which needs the ``admin`` scope like every other operator
route. A browser cannot attach a header to a page load, so the page asks for the key
once, keeps it in the tab's ``sessionStorage`` (gone when the tab closes, never in a
cookie the browser would send by itself) and sends it as ``X-API-Key`` on each poll.
With ``RECSYS_AUTH_ENABLED=false`` the page just works.

Where the rolling window lives: in each worker, a :class:`SnapshotRing` of the readings
it took while answering polls (see :mod:`recsys_serving.dashboard.figures`). Every
reading is of the metrics aggregated over all workers, so whichever worker answers, the
figures are the server's; the browser keeps the time series it charts. The figures are
those of one server: behind a load balancer each answer names its host, and the page
starts its series afresh when the host changes (the fleet-wide view is Prometheus').

Charts are drawn by Vega-Lite through vega-embed, served from the ``vl-convert-python``
package (``/dashboard/vendor/vega-embed.js``, built out of process on first use and
cached under ``$RECSYS_HOME/cache/dashboard``), so the page works without internet.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from recsys_serving.api.auth import API_KEY_HEADER, require
from recsys_serving.api.errors import ApiError, ErrorBody, json_response
from recsys_serving.api.metrics import ServiceMetrics
from recsys_serving.dashboard.figures import (
    CachedHistory,
    SnapshotRing,
    describe_history,
    parse_snapshot,
    summarize,
)
from recsys_serving.dashboard.vendor import VendorBuildError, ensure_bundle, library_versions
from recsys_serving.logging import get_logger

log = get_logger(__name__)
router = APIRouter(prefix="/dashboard", tags=["dashboard"])

REFRESH_SECONDS = 3.0
WINDOW_SECONDS = 30.0
HISTORY_LIMIT = 20
STATIC_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Vega compiles its expressions with `new Function`, and vega-embed injects its styles.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_STATE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Asset:
    """A file the page loads, with its validator and a gzip copy made once."""

    body: bytes
    gzipped: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, media_type: str) -> Asset:
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, gzip.compress(body, 6), media_type, etag)

    def respond(self, request: Request, cache_control: str, **headers: str) -> Response:
        common = {"ETag": self.etag, "Cache-Control": cache_control, "Vary": "Accept-Encoding"}
        common.update(headers)
        common["X-Content-Type-Options"] = "nosniff"
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=common)
        if "gzip" in request.headers.get("accept-encoding", ""):
            common["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type=self.media_type, headers=common)
        return Response(self.body, media_type=self.media_type, headers=common)


@cache
def _static(name: str) -> Asset:
    body = resources.files("recsys_serving.dashboard").joinpath("static", name).read_bytes()
    media_type = STATIC_TYPES.get(name, "text/html; charset=utf-8")
    return Asset.of(body, media_type)


_vendor: dict[Path, Asset] = {}
_vendor_lock = threading.Lock()


def vega_bundle(cache_dir: Path) -> Asset:
    """The charting bundle, built out of process on first use (see ``vendor``)."""
    with _vendor_lock:
        found = _vendor.get(cache_dir)
        if found is None:
            path = ensure_bundle(cache_dir)
            found = Asset.of(path.read_bytes(), "text/javascript; charset=utf-8")
            _vendor[cache_dir] = found
        return found


@dataclass
class DashboardState:
    ring: SnapshotRing
    history: CachedHistory


def _dashboard_state(request: Request) -> DashboardState:
    app_state = request.app.state
    with _STATE_LOCK:
        found: DashboardState | None = getattr(app_state, "dashboard", None)
        if found is None:
            registry = _registry(request)
            found = DashboardState(
                SnapshotRing(),
                CachedHistory(lambda: describe_history(registry.history(limit=HISTORY_LIMIT))),
            )
            app_state.dashboard = found
        return found


def _registry(request: Request) -> Any:
    """The registry the workers follow; a pinned server still shows the lake's history."""
    manager = getattr(request.app.state, "manager", None)
    registry = getattr(getattr(manager, "source", None), "registry", None)
    if registry is None:
        from recsys_serving.registry import ModelRegistry

        registry = ModelRegistry(request.app.state.lake)
    return registry


@router.get("", include_in_schema=False)
async def page(request: Request) -> Response:
    return _static("index.html").respond(
        request, "no-cache", **{"Content-Security-Policy": PAGE_POLICY}
    )


@router.get("/static/{name}", include_in_schema=False)
async def static_file(request: Request, name: str) -> Response:
    if name not in STATIC_TYPES:
        raise ApiError(404, "not_found", f"no dashboard file {name!r}")
    return _static(name).respond(request, "no-cache")


@router.get("/vendor/vega-embed.js", include_in_schema=False)
async def vega_embed(request: Request) -> Response:
    cache_dir = request.app.state.settings.resolved_home / "cache" / "dashboard"
    try:
        asset = await run_in_threadpool(vega_bundle, cache_dir)
    except (VendorBuildError, OSError, TimeoutError) as exc:
        log.error("dashboard.vendor_failed", error=str(exc))
        raise ApiError(503, "chart_library_unavailable", str(exc)) from exc
    return asset.respond(request, "public, max-age=86400")


@router.get("/config", summary="How the dashboard page should behave (public)")
async def config(request: Request) -> Response:
    settings = request.app.state.settings
    return json_response(
        {
            "auth_required": bool(settings.serving.auth_enabled),
            "scope": "admin",
            "header": API_KEY_HEADER,
            "refresh_seconds": REFRESH_SECONDS,
            "window_seconds": WINDOW_SECONDS,
            "libraries": library_versions(),
        }
    )


@router.get(
    "/data",
    summary="The dashboard's figures (scope admin)",
    description=(
        "Totals since the server started and rates over the last `window` seconds, from "
        "the metrics `GET /metrics` exposes (aggregated over every worker), plus the models "
        "each worker serves and the registry's recent promotions and rollbacks."
    ),
    responses={
        401: {"model": ErrorBody, "description": "Missing, unknown or revoked API key."},
        403: {"model": ErrorBody, "description": "The key lacks the `admin` scope."},
        429: {"model": ErrorBody, "description": "Rate limit of the key; see `Retry-After`."},
    },
    dependencies=[Depends(require("admin"))],
)
def data(
    request: Request,
    window: Annotated[
        float, Query(ge=5, le=900, description="Seconds of the rate and latency window.")
    ] = WINDOW_SECONDS,
) -> Response:
    # Plain def: reading the per-worker metric files and the registry happens in the
    # threadpool, off the event loop.
    return json_response(dashboard_data(request, window), headers={"Cache-Control": "no-store"})


def dashboard_data(request: Request, window: float) -> dict[str, Any]:
    state = _dashboard_state(request)
    metrics: ServiceMetrics = request.app.state.metrics
    now = parse_snapshot(metrics.render().decode(), time.time())
    figures = summarize(now, state.ring.baseline(now.at, window))
    state.ring.add(now)
    manager = getattr(request.app.state, "manager", None)
    source = getattr(manager, "source", None)
    figures["source"] = {
        "name": getattr(source, "name", "unknown"),
        "pinned": bool(getattr(source, "pinned", False)),
    }
    figures["history"] = state.history.get()
    # Figures are per server (all its workers); behind a load balancer, polls may reach
    # different replicas, and the page says which one answered.
    figures["server"] = {"host": socket.gethostname()}
    return figures
