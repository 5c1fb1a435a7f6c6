"""``GET /recommendations/{user_id}`` and ``GET /similar/{item_id}``.

The recommendations route is the service's hot path. Its common form (a valid user id
and at most ``k=N``) is answered by :class:`FastRoute` without FastAPI's per-request
parameter resolution, which costs more than the rest of the route besides ranking.
Everything else (filters, an invalid or unusual parameter) goes through the declared
endpoint, so validation, errors and the OpenAPI description are FastAPI's; both paths
give the same answer for the same request (tested).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StringConstraints

from recsys_serving.api.auth import SECURITY, authorize
from recsys_serving.api.errors import ErrorBody
from recsys_serving.api.serving import Answer, Recommending

# The weblog contract's id rules, so every id the API accepts can be logged as-is.
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
MAX_ID = 256
MAX_EXCLUDE = 1000
MAX_CATEGORIES = 50
MAX_K = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The query strings FastRoute answers itself: none, or k in 1..MAX_K written plainly.
_PLAIN_K = re.compile(rb"(?:k=([1-9][0-9]?|100))?")

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN)]
ServedBy = Literal["champion", "challenger", "fallback", "last_good"]


class FastRoute(APIRoute):
    """An APIRoute whose common requests can skip FastAPI's parameter resolution.

    Kept because it pays (issue 14 asked to measure it): on the long-history bench
    world (2026-12-06, bench/RESULTS.md "Issue 13: request cost"), through the ASGI
    app in-process, the service's own CPU per ``/recommendations`` request with the
    model replaced by a fixed answer was 336 / 290 us with it and 503 / 425 us
    without it (two rounds each, alternated): FastAPI's resolution of the four
    declared parameters costs ~150 us, a third of the service around the model. Over
    HTTP (2 workers, 32 connections, same run) the server spent 2,634 / 2,491 us of CPU
    per answer with it and 3,696 without. ``bench/serve.py --declared-route`` repeats
    the HTTP comparison; drop this class if it stops showing a difference.

    An endpoint registered with :func:`plain_form` gets a handler that first asks its
    plain-form function, which answers from the raw path and query when they are in
    their plain form or returns None; the declared endpoint then handles the request
    with full validation. Matching, middleware, exception handlers and the OpenAPI
    schema are unchanged; endpoints without a plain form behave as usual.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        declared = super().get_route_handler()
        plain = _PLAIN_FORMS.get(self.endpoint)
        if plain is None:
            return declared

        async def handler(request: Request) -> Response:
            response = await plain(request)
            return response if response is not None else await declared(request)

        return handler


PlainForm = Callable[[Request], Coroutine[Any, Any, Response | None]]
_PLAIN_FORMS: dict[Callable[..., Any], PlainForm] = {}


def plain_form(plain: PlainForm) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``plain`` as the fast form of the decorated endpoint (see FastRoute)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        _PLAIN_FORMS[endpoint] = plain
        return endpoint

    return register


router = APIRouter(tags=["recommendations"], route_class=FastRoute)


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="Ranker score (popularity for fallback answers).")
    rank: int = Field(ge=1, description="1-based; impressions log `position = rank - 1`.")
    reason: str = Field(description="Why the item is here (e.g. `similar to i42`, `popular`).")


class Recommendations(BaseModel):
    user_id: str
    items: list[RecommendedItem]
    model_version: str
    request_id: str = Field(description="Send it back with clicks (`POST /events`).")
    served_by: ServedBy = Field(
        description="`champion` (production), `challenger` (candidate in phase-in), "
        "`fallback` (popular items: a store or the index failed, or production has not "
        "beaten popularity yet and answers with it: the first-model rule) or `last_good` "
        "(the newest previous production version: production's bundle cannot be loaded here)."
    )


class SimilarItems(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    model_version: str
    request_id: str
    served_by: ServedBy


def _items(answer: Answer) -> list[dict[str, object]]:
    return [
        {"item_id": it.item_id, "score": float(it.score), "rank": n, "reason": it.reason}
        for n, it in enumerate(answer.items, 1)
    ]


def _respond(body: dict[str, object], request_id: str) -> Response:
    # orjson straight to bytes: the response model documents the shape, the hot path
    # skips a second validation of what the code just built.
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers={"X-Request-ID": request_id},
    )


K = Annotated[int, Query(ge=1, le=MAX_K, description="How many items (1..100).")]
Exclude = Annotated[
    list[ItemId] | None,
    Query(max_length=MAX_EXCLUDE, description="Item ids never to return (repeat the parameter)."),
]
Category = Annotated[
    list[ItemId] | None,
    Query(max_length=MAX_CATEGORIES, description="Keep items of any of these categories."),
]
ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Missing, unknown or revoked API key."},
    403: {"model": ErrorBody, "description": "The key lacks the `recommend` scope."},
    422: {"model": ErrorBody, "description": "Invalid parameter (k out of 1..100, bad id)."},
    429: {"model": ErrorBody, "description": "Rate limit of the key; see `Retry-After`."},
    503: {"model": ErrorBody, "description": "No model loaded yet (`/readyz` is false)."},
}


async def _plain_recommendations(request: Request) -> Response | None:
    """``GET /recommendations/{user_id}[?k=N]`` with a valid id and k: the answer; any
    other form: None (the declared endpoint validates it)."""
    scope = request.scope
    found = _PLAIN_K.fullmatch(scope["query_string"])
    user_id = scope["path_params"].get("user_id")
    if (
        found is None
        or not isinstance(user_id, str)
        or not 0 < len(user_id) <= MAX_ID
        or _CONTROL.search(user_id) is not None
    ):
        return None
    k = int(found.group(1)) if found.group(1) is not None else 10
    return await _recommend(request, user_id, k, None, frozenset())


async def _recommend(
    request: Request,
    user_id: str,
    k: int,
    category: list[str] | None,
    exclude: frozenset[str],
) -> Response:
    authorize(request, "recommend")
    service: Recommending = request.app.state.recommending
    answer = await service.recommend(user_id, k, category, exclude)
    return _respond(
        {
            "user_id": user_id,
            "items": _items(answer),
            "model_version": answer.model_version,
            "request_id": answer.request_id,
            "served_by": answer.served_by,
        },
        answer.request_id,
    )


@router.get(
    "/recommendations/{user_id}",
    response_model=Recommendations,
    summary="Top-K items for a user",
    description=(
        "Already-seen items are excluded; unknown users get the cold-start list. Each "
        "returned item is logged as an `impression` event (`request_id`, `position`, "
        "`model_version`) before the answer leaves."
    ),
    responses=ERRORS,
    openapi_extra=SECURITY,
)
@plain_form(_plain_recommendations)
async def get_recommendations(
    request: Request,
    user_id: Annotated[
        str, Path(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN, description="User id.")
    ],
    k: K = 10,
    category: Category = None,
    exclude: Exclude = None,
) -> Response:
    return await _recommend(request, user_id, k, category or None, frozenset(exclude or ()))


@router.get(
    "/similar/{item_id}",
    response_model=SimilarItems,
    summary="Items similar to an item",
    description="Item-to-item neighbours from the production model's index.",
    responses={**ERRORS, 404: {"model": ErrorBody, "description": "Unknown item."}},
    openapi_extra=SECURITY,
)
async def get_similar(
    request: Request,
    item_id: Annotated[
        str, Path(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN, description="Item id.")
    ],
    k: K = 10,
    exclude: Exclude = None,
) -> Response:
    authorize(request, "recommend")
    service: Recommending = request.app.state.recommending
    answer = await service.similar(item_id, k, frozenset(exclude or ()))
    return _respond(
        {
            "item_id": item_id,
            "items": _items(answer),
            "model_version": answer.model_version,
            "request_id": answer.request_id,
            "served_by": answer.served_by,
        },
        answer.request_id,
    )
