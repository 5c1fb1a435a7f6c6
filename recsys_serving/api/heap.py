"""Keeping the long-lived heap out of the cyclic garbage collector's way.

A serving worker holds ~200k long-lived Python objects (the imported modules, the
app, the loaded models) that never become garbage. CPython's full (generation 2)
collection walks every one of them: ~100 ms on the 2-core bench machine, during
which the worker holds the GIL and answers nothing. Under load it ran about once
a second per worker (requests waiting on their impressions' fsync live long
enough to be promoted, which is what triggers a full collection), and those pauses
were the whole p95/p99 tail of ``/recommendations`` (bench/RESULTS.md, "The p99
tail was the garbage collector").

:func:`settle` collects once and moves everything alive into the permanent
generation (``gc.freeze``), which later collections skip; objects allocated
afterwards are collected as usual. It runs when the worker's models change,
because a newly loaded model is the next large batch of long-lived objects, and
it first unfreezes so that the models a swap let go of are collected too (a
frozen cycle would otherwise never be freed). That one full collection per swap
is the price, paid in the model manager's thread.

It also runs once at start-up, which is all a collector-only worker needs. Only a
process that owns its heap does this: a uvicorn worker of ``recsys serve`` or of the
collector-only server (:func:`recsys_serving.api.app.service_app`,
:func:`~recsys_serving.api.app.collector_app`), not an app built inside another
program such as a test run, whose heap is not ours to freeze.
"""

from __future__ import annotations

import gc
import time

from recsys_serving.logging import get_logger

log = get_logger(__name__)


def settle() -> None:
    """Collect everything collectable, then exempt what survives from later collections."""
    started = time.perf_counter()
    gc.unfreeze()
    unreachable = gc.collect()
    gc.freeze()
    log.info(
        "heap.settled",
        frozen=gc.get_freeze_count(),
        collected=unreachable,
        seconds=round(time.perf_counter() - started, 3),
    )
