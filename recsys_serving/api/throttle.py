"""Per-key token buckets that hold across all the workers of one server.

Why a shared table rather than a per-worker share of the limit: the kernel hands
connections to whichever worker accepts first, so one client's requests are spread
unevenly (keep-alive pins a client to one worker). Dividing a key's rps by N workers
would throttle a client pinned to one worker at 1/N of its limit while letting a
client spread over all of them through at the full rate. A table every worker updates
under one lock enforces exactly the configured rate and burst whatever the spread.

The table is a file of fixed-size slots mapped into every worker (``run_dir`` set by
``recsys serve``; an anonymous map when a single process serves). An update is a
``flock`` plus a few loads and stores, about two microseconds. Time is
``CLOCK_MONOTONIC``, which all processes of a host share. Slots are claimed by a hash
of the key id with linear probing; a slot whose bucket has refilled completely holds
no information and is reused when the table is full. Behind a load balancer with
several hosts, give each host its share of the limit (the gateway's usual semantics).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import threading
import time
from pathlib import Path

from recsys_serving.logging import get_logger

# The bucket clock, one module attribute so tests can move time instead of sleeping.
clock = time.monotonic

log = get_logger(__name__)

# hash of the key id (0 = empty), tokens, last update, time at which the bucket is full
_SLOT = struct.Struct("<Qddd")
DEFAULT_SLOTS = 4096
TABLE_FILE = "token-buckets.bin"


def _key_hash(key_id: str) -> int:
    value = int.from_bytes(hashlib.blake2b(key_id.encode(), digest_size=8).digest(), "little")
    return value or 1


class TokenBuckets:
    """``take(key_id, rps, burst)`` -> 0.0 when allowed, else seconds until a token."""

    def __init__(self, path: Path | None = None, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self.size = slots * _SLOT.size
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        if path is None:
            self._map = mmap.mmap(-1, self.size)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._fd).st_size < self.size:
                    os.ftruncate(self._fd, self.size)  # zero-filled: every slot empty
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(self._fd, self.size)
        self._warned_full = False

    @classmethod
    def for_run_dir(cls, run_dir: Path | None) -> TokenBuckets:
        return cls(run_dir / TABLE_FILE if run_dir is not None else None)

    def take(self, key_id: str, rps: float, burst: int, now: float | None = None) -> float:
        h = _key_hash(key_id)
        with self._thread_lock:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                now = clock() if now is None else now
                return self._take_locked(h, float(rps), float(burst), now)
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _take_locked(self, h: int, rps: float, burst: float, now: float) -> float:
        buf = self._map
        start = h % self.slots
        reusable = -1
        for i in range(self.slots):
            slot = (start + i) % self.slots
            off = slot * _SLOT.size
            slot_h, tokens, updated, full_at = _SLOT.unpack_from(buf, off)
            if slot_h == h:
                break
            if slot_h == 0:
                tokens, updated = burst, now
                break
            if reusable < 0 and now >= full_at:
                reusable = off
        else:
            if reusable < 0:
                # Every slot holds a key that is being throttled right now: thousands
                # of keys at their limit. Let the request through rather than punish an
                # innocent key, and say so once.
                if not self._warned_full:
                    log.warning("throttle.table_full", slots=self.slots)
                    self._warned_full = True
                return 0.0
            off = reusable
            tokens, updated = burst, now
        tokens = min(burst, tokens + max(0.0, now - updated) * rps)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / rps
        _SLOT.pack_into(buf, off, h, tokens, now, now + (burst - tokens) / rps)
        return wait

    def close(self) -> None:
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def retry_after_header(wait_seconds: float) -> str:
    """``Retry-After`` takes whole seconds; round up so a client that obeys succeeds."""
    return str(max(1, math.ceil(wait_seconds)))
