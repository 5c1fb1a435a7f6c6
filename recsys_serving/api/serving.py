"""Answering one recommendation request: route, gather, rank, fall back, log.

Kept apart from the HTTP layer so the rules are plain, testable code:

* the :class:`~recsys_serving.api.model_manager.ServingState` is read once, so the
  whole request runs on the models it found (hot swap safety);
* with the embedded stores (in-process document store, the bundle's own index) the
  request is computed on the event loop: it is a millisecond of CPU that no thread
  could overlap (the GIL), and every hand-off to a thread costs more than that under
  load (a waiting thread gets the GIL only every 5 ms switch interval);
* with a remote document store or Elasticsearch the work goes to threads: the store
  call gets ``store_timeout_ms`` on a small dedicated pool (a bulkhead: a hung store
  cannot take the threads ranking needs; calls queued behind hung ones time out within
  their budget and are cancelled); the index enforces the same budget itself and raises
  ``CandidateIndexError`` / ``CandidateIndexTimeout``;
* any of those failing gives the bundle's ``popular()`` list (no external call),
  ``served_by: fallback``, and ``recsys_fallback_total{reason}``; never a 500;
* a model registered under the first-model rule without beating popularity
  (``LoadedModel.popularity_only``) answers ``/recommendations`` with that same list
  (reason ``below_popularity``) until a model that beats popularity replaces it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.concurrency import run_in_threadpool

from recsys_serving.api.errors import ApiError
from recsys_serving.api.impressions import ImpressionLog, Shown, impression_events
from recsys_serving.api.metrics import ServiceMetrics
from recsys_serving.api.model_manager import LoadedModel, ModelManager
from recsys_serving.index.base import CandidateIndexError, CandidateIndexTimeout
from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

STORE_THREADS = 8


@dataclass(frozen=True, slots=True)
class Answer:
    request_id: str
    items: list[Any]  # ScoredItem(item_id, score, reason)
    model_version: str
    served_by: str
    fallback_reason: str | None = None


class _RequestIds:
    """32 hex characters like a UUID4's, unique without a random draw per request: a
    random 64-bit prefix per process (drawn again in a forked child) and a counter."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count(secrets.randbits(32))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()


class Recommending:
    """The service behind ``/recommendations`` and ``/similar``."""

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        docstore: Any,
        metrics: ServiceMetrics,
        impressions: ImpressionLog,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.docstore = docstore
        self.metrics = metrics
        self.impressions = impressions
        self.timeout = settings.serving.store_timeout_ms / 1000.0
        manager.on_ranker_fallback = lambda reason: metrics.ranker_compile_failures.labels(
            reason
        ).inc()
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="docstore")

    def close(self) -> None:
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    def _no_model(self) -> ApiError:
        self.metrics.fallbacks.labels("no_model").inc()
        return ApiError(
            503,
            "no_model",
            "no model is loaded yet; GET /readyz says when the service is ready",
            headers={"Retry-After": "5"},
        )

    def _in_process(self, loaded: LoadedModel) -> bool:
        return loaded.index is None and (
            self.docstore is None or getattr(self.docstore, "embedded", False) is True
        )

    async def user_doc(self, user_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The user's document, or the fallback reason why it is unavailable."""
        if self.docstore is None:
            return None, None
        if getattr(self.docstore, "embedded", False) is True:
            try:
                return self.docstore.get_user(user_id), None
            except Exception as exc:  # a corrupt embedded store file, say
                log.warning("serving.store_unavailable", reason="store_error", error=str(exc))
                return None, "store_error"
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._store_pool, self.docstore.get_user, user_id)
            return await asyncio.wait_for(future, self.timeout), None
        except TimeoutError:
            return None, "store_timeout"
        except Exception as exc:
            # The store's own client budget surfaces as StoreUnavailable(timeout=True).
            reason = "store_timeout" if getattr(exc, "timeout", False) is True else "store_error"
            log.warning("serving.store_unavailable", reason=reason, error=str(exc)[:300])
            return None, reason

    async def recommend(
        self,
        user_id: str,
        k: int,
        categories: Sequence[str] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Answer:
        routed = self.manager.state.route(user_id)
        if routed is None:
            raise self._no_model()
        loaded, served_by = routed
        cats = list(categories) if categories else None
        items: list[Any] = []
        if loaded.popularity_only:
            doc, reason = None, "below_popularity"
        else:
            doc, reason = await self.user_doc(user_id)
        if reason is None:
            call = partial(
                loaded.model.recommend,
                user_id,
                k,
                categories=cats,
                exclude=exclude,
                user_doc=doc,
                index=loaded.index,
            )
            try:
                items = call() if self._in_process(loaded) else await run_in_threadpool(call)
            except Exception as exc:
                reason = _failure_reason(exc)
        if reason is not None:
            items = self._fallback(loaded, reason, k, cats, exclude | loaded.model.seen(user_id))
            served_by = "fallback"
        answer = Answer(new_request_id(), list(items)[:k], loaded.version, served_by, reason)
        self.metrics.answered(served_by, loaded.version)
        await self.impressions.log(
            impression_events(
                answer.request_id,
                user_id,
                [Shown(item.item_id, pos) for pos, item in enumerate(answer.items)],
                answer.model_version,
                served_by,
                ts=time.time(),
            )
        )
        return answer

    async def similar(self, item_id: str, k: int, exclude: frozenset[str] = frozenset()) -> Answer:
        state = self.manager.state
        loaded = state.production
        if loaded is None:
            raise self._no_model()
        served_by = "champion"
        reason = None
        items: list[Any] = []
        call = partial(loaded.model.similar, item_id, k, exclude=exclude, index=loaded.index)
        try:
            items = call() if self._in_process(loaded) else await run_in_threadpool(call)
        except KeyError as exc:
            raise ApiError(
                404, "unknown_item", f"item {item_id!r} is not in model {loaded.version}"
            ) from exc
        except Exception as exc:
            reason = _failure_reason(exc)
        if reason is not None:
            items = self._fallback(loaded, reason, k, None, exclude | {item_id})
            served_by = "fallback"
        self.metrics.answered(served_by, loaded.version)
        return Answer(new_request_id(), list(items)[:k], loaded.version, served_by, reason)

    def _fallback(
        self,
        loaded: LoadedModel,
        reason: str,
        k: int,
        categories: list[str] | None,
        exclude: frozenset[str],
    ) -> list[Any]:
        self.metrics.fallbacks.labels(reason).inc()
        return list(loaded.model.popular(k, categories=categories, exclude=exclude))


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, CandidateIndexTimeout):
        return "index_timeout"
    if isinstance(exc, CandidateIndexError):
        return "index_error"
    log.error("serving.model_error", error=repr(exc), exc_info=exc)
    return "model_error"
