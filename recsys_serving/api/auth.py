"""Access control for API routes: ``X-API-Key`` -> key -> scope check -> token bucket.

Routes declare what they need with ``Depends(require("recommend"))``; the answer is
401 for a missing, unknown or revoked key, 403 for a key without the scope, 429 with
``Retry-After`` when the key's bucket is empty. Health, readiness, metrics and the
API docs stay open (probes and scrapers carry no keys). With ``RECSYS_AUTH_ENABLED=
false`` (a laptop) every caller is the anonymous principal, with every scope and no
throttling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from recsys_serving.api.errors import ApiError
from recsys_serving.api.metrics import ServiceMetrics
from recsys_serving.api.throttle import TokenBuckets, retry_after_header
from recsys_serving.keys import SCOPES, KeyRing
from recsys_serving.settings import Settings

API_KEY_HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="An API key from `recsys keys create` or `RECSYS_API_KEYS`.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


class Guard:
    """Authenticates, authorizes and throttles; one per app."""

    def __init__(
        self, settings: Settings, keyring: KeyRing, buckets: TokenBuckets, metrics: ServiceMetrics
    ) -> None:
        self.enabled = settings.serving.auth_enabled
        self.default_rps = settings.serving.rate_limit_rps
        self.default_burst = settings.serving.rate_limit_burst
        self.keyring = keyring
        self.buckets = buckets
        self.metrics = metrics

    def check(self, secret: str | None, scope: str) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not secret:
            raise ApiError(
                401, "unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header"
            )
        key = self.keyring.authenticate(secret)
        if key is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key")
        if scope not in key.scopes:
            raise ApiError(
                403,
                "forbidden",
                f"key {key.key_id} lacks the {scope!r} scope "
                f"(has: {', '.join(sorted(key.scopes))})",
            )
        rps = key.rps if key.rps is not None else self.default_rps
        burst = key.burst if key.burst is not None else self.default_burst
        wait = self.buckets.take(key.key_id, rps, burst)
        if wait > 0:
            self.metrics.throttled.labels(key.key_id).inc()
            raise ApiError(
                429,
                "too_many_requests",
                {
                    "message": f"key {key.key_id} is limited to {rps:g} requests/s (burst {burst})",
                    "retry_after_seconds": round(wait, 3),
                },
                headers={"Retry-After": retry_after_header(wait)},
            )
        return Principal(key.key_id, key.scopes)


def authorize(request: Request, scope: str) -> Principal:
    """The check of :func:`require`, called directly by the hot routes: FastAPI's
    dependency resolution costs more per request than everything else they do besides
    ranking. Such routes declare ``SECURITY`` in ``openapi_extra`` to stay documented."""
    guard: Guard = request.app.state.guard
    principal = guard.check(request.headers.get(API_KEY_HEADER), scope)
    request.state.principal = principal
    return principal


# What a route that calls authorize() declares in openapi_extra.
SECURITY = {"security": [{"APIKeyHeader": []}]}


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits callers holding ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(
        request: Request, api_key: str | None = Security(api_key_header)
    ) -> Principal:
        guard: Guard = request.app.state.guard
        principal = guard.check(api_key, scope)
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency
