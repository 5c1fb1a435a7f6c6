"""CPU cost of landing a log in-process: ``ingest_files`` into a fresh local lake.

On a machine shared with others, wall time measures the queue for the CPU; the CPU
seconds of the process (user + sys, every thread: the read-ahead's gzip inflation
included) compare two versions of the code fairly. Run it with this tree's code, then
with another checkout's first on the path::

    .venv/bin/python bench/landing_cpu.py FILE...
    PYTHONPATH=../other-checkout .venv/bin/python bench/landing_cpu.py FILE...

Prints one JSON line: events, accepted, landing lines (accounting), CPU s, wall s.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from recsys_assets.ingest import ingest_files
from recsys_serving.events.intake import EventIntake
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv]
    tmp = Path(tempfile.mkdtemp(prefix="landing-cpu-"))
    try:
        intake = EventIntake(LocalLake(tmp / "lake"), Settings(home=tmp / "home"))
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        report = ingest_files(paths, intake)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        landed = sum(
            p.read_bytes().count(b"\n") for p in (tmp / "lake" / "landing").rglob("*.ndjson")
        )
        n = report.result.received
        print(
            json.dumps(
                {
                    "files": [p.name for p in paths],
                    "events": n,
                    "accepted": report.result.accepted,
                    "rejected": report.result.rejected,
                    "landing_lines": landed,
                    "cpu_s": round(cpu, 2),
                    "wall_s": round(wall, 2),
                    "events_per_cpu_s": round(n / cpu) if cpu else 0,
                    "events_per_wall_s": round(n / wall) if wall else 0,
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
