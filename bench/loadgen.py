"""Load generator for ``POST /events``: raw HTTP/1.1 over asyncio keep-alive connections.

It runs as its own process (started by ``bench/ingest.py``) so it never shares the
collector's GIL, and it speaks minimal HTTP by hand instead of through httpx: at
~100-300 requests/s the client then costs a few percent of one core, which it
measures and reports, so the server figure is not flattered or hidden by client
overhead. Every body is generated before the clock starts and every event_id is
new, otherwise the run would measure the duplicate-reject path.

Prints progress to stderr and one JSON object (the result) as the last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import resource
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

EVENTS_PATH = "/events"
N_USERS = 20_000
N_ITEMS = 5_000
SLATE = 10
CLICK_RATE = 0.3
MODEL_VERSION = "two-stage-v1"
MAX_ERROR_SAMPLES = 10


@dataclass
class LoadResult:
    connections: int
    batch: int
    duration_target_s: float
    bodies_generated: int
    body_bytes_avg: float
    generate_s: float
    warmup_requests: int = 0
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    accepted_total: int = 0  # warm-up included: what the landing zone must hold
    accepted_timed: int = 0
    wall_s: float = 0.0
    events_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    client_cpu_s: float = 0.0
    client_cpu_cores: float = 0.0
    exhausted: bool = False


def make_bodies(n_bodies: int, batch: int, seed: int) -> list[bytes]:
    """NDJSON bodies shaped like a recommendation front end's log shipper output.

    Slates of impressions share a request_id and session_id with positions 0..9,
    about a third of slates get a click; event ids look like UUIDs (36 chars) and
    are unique across runs because the prefix comes from a fresh uuid4.
    """
    rng = random.Random(seed)
    prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-xxxx-xxxx-"; 12 hex digits follow
    req_prefix = str(uuid.uuid4())[:24]
    now = time.time()
    bodies: list[bytes] = []
    lines: list[bytes] = []
    counter = 0
    request_no = 0

    def emit(line: str) -> None:
        nonlocal counter
        lines.append(line.encode())
        counter += 1
        if len(lines) == batch:
            bodies.append(b"\n".join(lines) + b"\n")
            lines.clear()

    while len(bodies) < n_bodies:
        request_no += 1
        user = rng.randrange(N_USERS)
        session = f"s-{user:05d}-{rng.randrange(1_000):03d}"
        request_id = f"{req_prefix}{request_no:012x}"
        ts = now - 60.0 + rng.random() * 50.0  # the last minute; never in the future
        items = rng.sample(range(N_ITEMS), SLATE)
        common = (
            f'"user_id":"u{user:06d}","session_id":"{session}",'
            f'"request_id":"{request_id}","model_version":"{MODEL_VERSION}"'
        )
        for pos, item in enumerate(items):
            emit(
                f'{{"event_id":"{prefix}{counter:012x}","event_type":"impression",'
                f'"item_id":"i{item:05d}","ts":{ts:.3f},"position":{pos},{common}}}'
            )
        if rng.random() < CLICK_RATE:
            pos = min(int(rng.expovariate(0.4)), SLATE - 1)
            emit(
                f'{{"event_id":"{prefix}{counter:012x}","event_type":"click",'
                f'"item_id":"i{items[pos]:05d}","ts":{ts + 1.0 + rng.random() * 8:.3f},'
                f'"position":{pos},{common}}}'
            )
    return bodies


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are strictly sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            await self.open()
        assert self.writer is not None and self.reader is not None
        head = (
            f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head)
        self.writer.write(body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length = -1
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"connection" and value.strip().lower() == b"close":
                close = True
        if length < 0:
            raise ConnectionError(f"response without Content-Length (status {status})")
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


async def run_load(
    host: str,
    port: int,
    bodies: list[bytes],
    connections: int,
    duration: float,
    batch: int,
    warmup: float,
) -> dict[str, Any]:
    """Warm up for ``warmup`` seconds, then send for ``duration`` seconds and measure."""
    conns = [Connection(host, port) for _ in range(connections)]
    for c in conns:
        await c.open()
    next_body = 0
    latencies: list[float] = []
    stats: dict[str, Any] = {
        "requests": 0,
        "ok": 0,
        "errors": 0,
        "error_samples": [],
        "accepted_total": 0,
        "accepted_timed": 0,
        "warmup_requests": 0,
        "exhausted": False,
    }

    def note_error(problem: str) -> None:
        stats["errors"] += 1
        if len(stats["error_samples"]) < MAX_ERROR_SAMPLES:
            stats["error_samples"].append(problem)

    def check(status: int, payload: bytes, timed: bool) -> None:
        accepted = 0
        problem = None
        try:
            answer = orjson.loads(payload)
            accepted = int(answer.get("accepted", 0))
            if status != 202 or accepted != batch or answer.get("rejected", 0):
                problem = f"status {status}: {payload[:300]!r}"
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            problem = f"status {status}: unparseable body {payload[:300]!r}"
        stats["accepted_total"] += accepted
        if timed:
            stats["accepted_timed"] += accepted
            stats["ok"] += problem is None
        if problem is not None:
            note_error(problem)

    deadline = 0.0

    async def drive(conn: Connection, timed: bool) -> None:
        nonlocal next_body
        while time.perf_counter() < deadline:
            if next_body >= len(bodies):
                stats["exhausted"] = True
                return
            body = bodies[next_body]
            next_body += 1
            stats["requests" if timed else "warmup_requests"] += 1
            t0 = time.perf_counter()
            try:
                status, payload = await conn.post(body)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                note_error(f"transport: {exc!r}")
                await conn.close()
                continue
            if timed:
                latencies.append(time.perf_counter() - t0)
            check(status, payload, timed)

    # Warm-up lets every worker settle (first-request imports, allocator growth);
    # its events are not in the rate but are in the landing-zone accounting.
    deadline = time.perf_counter() + warmup
    await asyncio.gather(*(drive(c, timed=False) for c in conns))

    async def report() -> None:
        last = 0
        while time.perf_counter() < deadline:
            await asyncio.sleep(1.0)
            done = stats["accepted_timed"]
            print(f"    load: {done - last:>8,} events/s", file=sys.stderr, flush=True)
            last = done

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + duration
    reporter = asyncio.create_task(report())
    await asyncio.gather(*(drive(c, timed=True) for c in conns))
    wall = time.perf_counter() - started
    reporter.cancel()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns:
        await c.close()
    latencies.sort()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stats.update(
        wall_s=wall,
        events_per_s=stats["accepted_timed"] / wall if wall else 0.0,
        requests_per_s=stats["requests"] / wall if wall else 0.0,
        p50_ms=_percentile(latencies, 0.50) * 1e3,
        p90_ms=_percentile(latencies, 0.90) * 1e3,
        p99_ms=_percentile(latencies, 0.99) * 1e3,
        max_ms=(latencies[-1] if latencies else 0.0) * 1e3,
        client_cpu_s=cpu,
        client_cpu_cores=cpu / wall if wall else 0.0,
    )
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--max-rate",
        type=float,
        default=200_000,
        help="events/s the pre-generated bodies must last for (the run stops early if not)",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    n_bodies = math.ceil((args.duration + args.warmup) * args.max_rate / args.batch)
    print(
        f"    load: generating {n_bodies:,} bodies x {args.batch} events",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    bodies = make_bodies(n_bodies, args.batch, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"    load: generated in {gen_s:.1f}s; sending", file=sys.stderr, flush=True)
    coro = run_load(
        args.host,
        args.port,
        bodies,
        args.connections,
        args.duration,
        args.batch,
        args.warmup,
    )
    try:
        import uvloop
    except ImportError:  # plain asyncio is fine, just a little more client CPU
        stats = asyncio.run(coro)
    else:
        stats = uvloop.run(coro)
    result = LoadResult(
        connections=args.connections,
        batch=args.batch,
        duration_target_s=args.duration,
        bodies_generated=len(bodies),
        body_bytes_avg=sum(map(len, bodies)) / len(bodies),
        generate_s=gen_s,
        **stats,
    )
    sys.stdout.write(orjson.dumps(asdict(result)).decode() + "\n")


if __name__ == "__main__":
    main()
