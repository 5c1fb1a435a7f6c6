"""Liveness and readiness.

``/healthz`` answers as long as the process can serve HTTP (restart me if not).
``/readyz`` answers 200 only once a production model is loaded and the stores answer
(send me traffic); a load balancer takes a worker out while it is 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from recsys_serving.api.errors import json_response

router = APIRouter(tags=["health"])
# Readiness needs a model manager: only the full service mounts it.
ready_router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    model: dict[str, Any] = Field(description="Versions this worker serves, by alias.")
    checks: dict[str, bool] = Field(description="Each dependency: model loaded, stores answer.")
    reasons: dict[str, str] = Field(
        default_factory=dict, description="Why a failed check failed, when the dependency says."
    )
    stand_in: dict[str, dict[str, str]] | None = Field(
        default=None,
        description="Only while an alias's own version cannot be loaded: the last good "
        'version serving instead, e.g. {"production": {"version": ..., "instead_of": ...}}.',
    )


@router.get("/healthz", response_model=Health, summary="Liveness probe")
async def healthz() -> Health:
    return Health(status="ok")


@ready_router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness probe",
    responses={503: {"model": Ready, "description": "No model loaded or a store is down."}},
)
async def readyz(request: Request) -> Response:
    state = request.app.state.manager.state
    timeout = request.app.state.settings.serving.store_timeout_ms / 1000.0
    checks = {"model": state.ready}
    docstore = request.app.state.docstore
    if docstore is not None:
        checks["docstore"] = await _ping(docstore, timeout)
    if state.production is not None and state.production.index is not None:
        checks["index"] = await _ping(state.production.index, timeout)
    ready = all(checks.values())
    reasons: dict[str, str] = {}
    if not checks.get("docstore", True) and getattr(docstore, "last_error", None):
        reasons["docstore"] = docstore.last_error
    body: dict[str, Any] = {"ready": ready, "model": state.versions(), "checks": checks}
    if reasons:  # only when there is one: the usual body stays as it was
        body["reasons"] = reasons
    if stand_in := state.stand_ins():
        body["stand_in"] = stand_in
    return json_response(body, status_code=200 if ready else 503)


async def _ping(dependency: Any, timeout: float) -> bool:
    # A readiness probe may wait longer than a request's budget, but not forever.
    try:
        return bool(await asyncio.wait_for(run_in_threadpool(dependency.ping), max(timeout, 1.0)))
    except Exception:
        return False
