"""What this process may use of the machine it runs on."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on: a container's cpuset or a ``taskset`` counts,
    where ``os.cpu_count()`` would give the whole host's (and oversubscribe it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not Linux


__all__ = ["usable_cores"]
