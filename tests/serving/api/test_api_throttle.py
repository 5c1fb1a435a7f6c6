"""Token buckets: refill arithmetic, slot reuse, and one limit shared by processes."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest

from recsys_serving.api.throttle import TokenBuckets, retry_after_header


def test_burst_then_refill_at_rps() -> None:
    buckets = TokenBuckets(slots=16)
    t = 1000.0
    assert [buckets.take("k", rps=2, burst=3, now=t) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("k", rps=2, burst=3, now=t)
    assert wait == pytest.approx(0.5)
    assert buckets.take("k", rps=2, burst=3, now=t + 0.25) == pytest.approx(0.25)
    assert buckets.take("k", rps=2, burst=3, now=t + 0.5) == 0.0
    # Idle for long: the bucket fills up to the burst, never beyond.
    assert [buckets.take("k", rps=2, burst=3, now=t + 100) for _ in range(4)][-1] > 0


def test_keys_have_separate_buckets_and_a_full_table_reuses_idle_slots() -> None:
    buckets = TokenBuckets(slots=4)
    t = 50.0
    for key in ("a", "b", "c", "d"):
        assert buckets.take(key, rps=1, burst=1, now=t) == 0.0
    assert buckets.take("a", rps=1, burst=1, now=t) > 0  # a's own bucket is empty
    # The table is full of keys that are all empty now; a fifth key is let through
    # (fail open) rather than charged to someone else's bucket...
    assert buckets.take("e", rps=1, burst=1, now=t) == 0.0
    # ...and once buckets have refilled their slots are reused.
    assert buckets.take("e", rps=1, burst=1, now=t + 5) == 0.0
    assert buckets.take("e", rps=1, burst=1, now=t + 5) > 0


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.0) == "1"
    assert retry_after_header(1.2) == "2"


def _hammer(path: str, seconds: float, ready: Any, go: Any, start_at: Any, out: mp.Queue) -> None:
    buckets = TokenBuckets(Path(path))
    ready.wait(60)  # every process is up and imported...
    go.wait(60)  # ...before the parent fixes the common start
    while time.monotonic() < start_at.value:
        time.sleep(0.001)
    allowed = 0
    end = start_at.value + seconds
    while time.monotonic() < end:
        if buckets.take("shared-key", rps=50, burst=20) == 0.0:
            allowed += 1
    out.put(allowed)


def test_limit_holds_across_processes(tmp_path: Path) -> None:
    """Four processes share one bucket file: together they get burst + rps * t."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    seconds = 1.5
    ready, go, start_at = ctx.Barrier(5), ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_hammer,
            args=(str(tmp_path / "b.bin"), seconds, ready, go, start_at, out),
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    ready.wait(60)
    start_at.value = time.monotonic() + 0.5  # CLOCK_MONOTONIC is one clock for all
    go.set()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    # Together never more than burst + rps * t (95); four separate buckets would allow
    # about 380. The lower bound leaves room for a busy machine, where a process may be
    # descheduled for a while and tokens beyond the burst are not kept for it.
    assert 60 <= sum(counts) <= 20 + 50 * seconds + 2, counts
    assert sum(1 for c in counts if c > 0) >= 2  # they really competed for one bucket
