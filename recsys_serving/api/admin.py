"""Admin routes (scope ``admin``): model state, reload now, alias moves.

Alias moves go through the registry, the single source of truth: this worker reloads
at once and answers with its new state; the other workers (and other hosts) follow
at their next poll, within ``model_poll_seconds`` plus the load time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from recsys_serving.api.auth import Principal, require
from recsys_serving.api.errors import ApiError, ErrorBody, json_response
from recsys_serving.api.metrics import worker_id
from recsys_serving.api.model_manager import ModelManager, PollReport
from recsys_serving.layout import CANDIDATE, PRODUCTION

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require("admin"))])

Alias = Literal["production", "candidate"]
# No control characters: reasons are printed by `recsys models history` in terminals,
# where an escape sequence would rewrite the screen.
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"
Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        pattern=PRINTABLE,
        description="Why (kept in history); no control characters.",
    ),
]


class ModelSlot(BaseModel):
    version: str
    share: float
    loaded_at: float
    answers: str = Field(
        default="model",
        description="`model`, or `popularity` while production has not beaten popularity "
        "(the first-model rule: answers are the bundle's popular items).",
    )


class ModelState(BaseModel):
    worker: str
    source: str
    pinned: bool
    ready: bool
    production: ModelSlot | None
    candidate: ModelSlot | None
    previous: str | None = Field(description="The production model kept in memory for rollback.")
    refused: dict[str, dict[str, Any]]
    last_poll_at: float | None
    last_poll_error: str | None
    poll_seconds: float
    aliases: dict[str, dict[str, Any]] | None = Field(
        default=None, description="The registry's aliases as they are now."
    )


class ReloadResult(BaseModel):
    changed: bool
    loaded: list[str]
    refused: dict[str, str]
    error: str | None
    state: ModelState


class PromoteBody(BaseModel):
    version: str = Field(min_length=1, max_length=128)
    reason: Reason


class RollbackBody(BaseModel):
    reason: Reason
    alias: Alias | None = Field(
        default=None,
        description="Default: stop a running candidate phase-in, else production goes back "
        "to its previous version.",
    )


class AliasBody(BaseModel):
    version: str = Field(min_length=1, max_length=128)
    share: float = Field(gt=0.0, le=1.0, description="Share of users routed to it.")
    reason: Reason


class ProductionAliasBody(BaseModel):
    version: str = Field(min_length=1, max_length=128)
    share: float | None = Field(
        default=None, ge=1.0, le=1.0, description="Always 1.0 (every user); may be omitted."
    )
    reason: Reason


class AliasMove(BaseModel):
    alias: str
    action: str
    version: str | None
    previous: str | None
    share: float | None
    reason: str
    at: str
    state: ModelState


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody, "description": "The key lacks the `admin` scope."},
    404: {"model": ErrorBody, "description": "Unknown model version."},
    409: {
        "model": ErrorBody,
        "description": "Nothing to roll back, a conflict, pinned, or the version's bundle "
        "fails verification (`invalid_bundle`).",
    },
}


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


def _state(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    state = {"worker": worker_id(), **manager.status()}
    registry = getattr(manager.source, "registry", None)
    if registry is not None:
        try:
            state["aliases"] = {
                name: {
                    "version": a.version,
                    "share": a.share,
                    "updated_at": a.updated_at.isoformat(),
                    "reason": a.reason,
                    "previous": a.previous,
                }
                for name, a in registry.aliases().items()
            }
        except Exception as exc:
            state["aliases"] = {"error": {"detail": str(exc)}}
    return state


def _registry(request: Request) -> Any:
    registry = getattr(_manager(request).source, "registry", None)
    if registry is None:
        raise ApiError(
            409,
            "pinned_model",
            "this server serves a pinned model (RECSYS_MODEL_URI); aliases do not apply",
        )
    return registry


async def _move(request: Request, action: Any) -> Any:
    from recsys_serving.registry import (
        AliasConflict,
        InvalidBundle,
        NothingToRollBack,
        RegistryError,
        UnknownVersion,
    )

    try:
        event = await run_in_threadpool(action)
    except UnknownVersion as exc:
        raise ApiError(404, "unknown_version", str(exc)) from exc
    except InvalidBundle as exc:
        raise ApiError(409, "invalid_bundle", str(exc)) from exc
    except (NothingToRollBack, AliasConflict) as exc:
        raise ApiError(409, "conflict", str(exc)) from exc
    except RegistryError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    await run_in_threadpool(_manager(request).poll_once)
    return json_response(
        {
            "alias": event.alias,
            "action": event.action,
            "version": event.version,
            "previous": event.previous,
            "share": event.share,
            "reason": event.reason,
            "at": event.at.isoformat(),
            "state": await run_in_threadpool(_state, request),
        }
    )


@router.get("/models", response_model=ModelState, summary="What this worker serves")
async def models(request: Request) -> Any:
    return json_response(await run_in_threadpool(_state, request))


@router.post(
    "/models/reload",
    response_model=ReloadResult,
    summary="Poll the model source now (force: every worker retries refused versions)",
    responses=ERRORS,
)
async def reload(
    request: Request,
    force: Annotated[bool, Query(description="Retry versions refused earlier.")] = False,
) -> Any:
    # force: every worker (and every server following the same registry) retries the
    # versions it refused at its next poll, not only this one.
    reason = _by(request, "forced reload") if force else ""
    report: PollReport = await run_in_threadpool(_manager(request).reload, force, reason)
    return json_response(
        {
            "changed": report.changed,
            "loaded": report.loaded,
            "refused": report.refused,
            "error": report.error,
            "state": await run_in_threadpool(_state, request),
        }
    )


@router.post(
    "/models/promote",
    response_model=AliasMove,
    summary="Make a version production (clears a candidate pointing at it)",
    responses=ERRORS,
)
async def promote(request: Request, body: PromoteBody) -> Any:
    registry = _registry(request)
    return await _move(
        request, lambda: registry.promote(body.version, reason=_by(request, body.reason))
    )


@router.post(
    "/models/rollback",
    response_model=AliasMove,
    summary="Stop the candidate, or move production back to its previous version",
    responses=ERRORS,
)
async def rollback(request: Request, body: RollbackBody) -> Any:
    registry = _registry(request)
    return await _move(
        request, lambda: registry.rollback(reason=_by(request, body.reason), alias=body.alias)
    )


# One path per alias (rather than /aliases/{alias}) so each documents the body it
# takes: the candidate needs its share of users, production always serves 1.0.
@router.put(
    "/aliases/production",
    response_model=AliasMove,
    summary="Point production at a version (clears a candidate pointing at it)",
    responses=ERRORS,
)
async def set_production(request: Request, body: ProductionAliasBody) -> Any:
    registry = _registry(request)
    return await _move(
        request,
        lambda: registry.set_alias(
            PRODUCTION, body.version, reason=_by(request, body.reason), share=1.0
        ),
    )


@router.put(
    "/aliases/candidate",
    response_model=AliasMove,
    summary="Point the candidate at a version, with its share of users",
    responses=ERRORS,
)
async def set_candidate(request: Request, body: AliasBody) -> Any:
    registry = _registry(request)
    return await _move(
        request,
        lambda: registry.set_alias(
            CANDIDATE, body.version, reason=_by(request, body.reason), share=body.share
        ),
    )


def _clear_route(alias: Alias, summary: str) -> None:
    async def clear_alias(
        request: Request,
        reason: Annotated[str, Query(min_length=1, max_length=500, pattern=PRINTABLE)],
    ) -> Any:
        registry = _registry(request)
        return await _move(
            request, lambda: registry.clear_alias(alias, reason=_by(request, reason))
        )

    clear_alias.__name__ = f"clear_{alias}"
    router.add_api_route(
        f"/aliases/{alias}",
        clear_alias,
        methods=["DELETE"],
        response_model=AliasMove,
        summary=summary,
        responses=ERRORS,
    )


_clear_route(PRODUCTION, "Unset production (nothing is served until it is set again)")
_clear_route(CANDIDATE, "Unset the candidate (end its phase-in)")


def _by(request: Request, reason: str) -> str:
    principal: Principal | None = getattr(request.state, "principal", None)
    who = principal.key_id if principal is not None else "api"
    return f"{reason} (via API, key {who})"
