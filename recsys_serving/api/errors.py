"""One JSON error shape for every 4xx/5xx, so clients never parse HTML or guess."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from recsys_serving.logging import get_logger

log = get_logger(__name__)


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Serialize with orjson: the collector answers thousands of batches a second."""
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


class ApiError(Exception):
    """Raised by handlers to answer with a precise status and machine-readable code."""

    def __init__(
        self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return json_response(
            {"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only;
            # a path served by several routes (PUT and DELETE /admin/aliases/candidate)
            # must list them all.
            headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        return json_response(
            {"error": _CODES.get(exc.status_code, "error"), "detail": exc.detail},
            status_code=exc.status_code,
            headers=headers or None,
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, _: ClientDisconnect) -> Response:
        # A client gone before its body was complete (a dropped mobile connection, a
        # killed shipper) is the client's fault, not a 500: nothing of that body was
        # taken, no one reads this answer, and the error rate must not count it.
        log.info("http.client_disconnected", path=request.url.path)
        return json_response(
            {"error": "client_disconnected", "detail": "the client closed before its body ended"},
            status_code=400,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        # Still JSON for the client; the traceback goes to the server log.
        log.error("http.unhandled", error=repr(exc), exc_info=exc)
        return json_response(
            {"error": "internal_error", "detail": "unexpected server error (logged)"},
            status_code=500,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        detail = [
            {
                "loc": list(e.get("loc", ())),
                "msg": e.get("msg"),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        return json_response({"error": "invalid_request", "detail": detail}, status_code=422)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> set[str]:
    """Every method some route of the app serves at the request's path.

    Asked of the routes themselves, method by method (included routers are route
    objects of their own in recent FastAPI, with no list of methods to read).
    """
    routes = request.app.router.routes
    return {
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    }


class StrictPercentEncoding:
    """Refuse a path or query whose percent-escapes are not UTF-8 (``%ff``), with 422.

    The ASGI server decodes them with replacement, so ``/recommendations/%ff`` would
    reach the route as the id ``"\ufffd"``: a different id than the client sent,
    logged and answered as if valid. A pure ASGI middleware: one ``in`` test per
    request when the URL has no ``%``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = _undecodable(scope)
            if where is not None:
                detail = [
                    {
                        "loc": [where],
                        "msg": f"the {where} holds percent-escapes that are not UTF-8 "
                        "(e.g. %ff); encode ids as UTF-8 before percent-encoding them",
                        "type": "invalid_percent_encoding",
                    }
                ]
                response = json_response(
                    {"error": "invalid_request", "detail": detail}, status_code=422
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _undecodable(scope: Scope) -> str | None:
    raw_path: bytes = scope.get("raw_path") or b""
    if b"%" in raw_path:
        try:
            unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            return "path"
    query: bytes = scope.get("query_string") or b""
    if b"%" in query:
        try:
            unquote_to_bytes(query).decode("utf-8")
        except UnicodeDecodeError:
            return "query"
    return None
