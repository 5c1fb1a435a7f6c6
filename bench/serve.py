"""Serving throughput and latency: ``recsys serve`` driven by wrk over loopback.

Builds a demo-sized model the way a user would (``recsys simulate``, ``recsys catalog
load``, ``recsys ingest``, ``recsys retrain`` twice for two versions), starts
``recsys serve --workers N`` and drives it from wrk (a second process; Lua script
``bench/serve.lua`` picks a random user per request from the simulated users plus
some unknown ones) for a fixed time per scenario:

1. ``GET /healthz``: the ceiling of the HTTP stack on this machine;
2. ``GET /recommendations/{user}?k=10``: embedded document store and index, impression
   logging included (every answer's impressions are fsynced before it leaves), at the
   same concurrency and at 2 connections per worker (latency at a lighter load);
3. the same while the production model is swapped twice (promote v2 at 1/3 of the run,
   back to v1 at 2/3): both workers must report each version in ``/metrics``;
4. the same without waiting for the impressions' fsync (``RECSYS_IMPRESSION_SYNC=false``,
   a fresh server), to show what the durability choice costs.

It prints throughput and p50/p95/p99 per scenario, with the CPU the server and wrk
used per request (wrk shares the machine's cores with the server), fails if any
request errored or got a non-2xx, and writes the figures as JSON.

Then it measures where a request's CPU goes, in-process on the same model: the model
stages (user context, candidates, features, ranking compiled and with LightGBM) and
the service around them (``/healthz`` and ``/recommendations`` through the ASGI app,
without HTTP, and with the model replaced by a fixed answer).

Two worlds: ``--world demo`` (the simulated clickstream above) and ``--world long``,
heavy users (5,000 users rating 50 to 2,000 items each, Zipf-distributed over users,
see :func:`long_history_world`), where per-request work that grows with a user's
history would show; the stage budget also reports ``Recommender.recommend``'s wall
latency (p50/p90/p99) over the known users. ``--keep`` keeps the working directory;
``--reuse DIR`` serves its models again and ``--stages-only DIR`` measures only the
in-process stages on them: the same bundles under two versions of the code.

Usage::

    .venv/bin/python bench/serve.py                          # 20 s per scenario
    .venv/bin/python bench/serve.py --world long --connections 32 --duration 10 --keep
    .venv/bin/python bench/serve.py --world long --connections 32 --reuse /tmp/recsys-bench-serve-x
    .venv/bin/python bench/serve.py --stages-only /tmp/recsys-bench-serve-x
    .venv/bin/python bench/serve.py --reuse /tmp/recsys-bench-serve-x --declared-route
    .venv/bin/python bench/serve.py --duration 10 --connections 16
    .venv/bin/python bench/serve.py --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

# The stage budget runs the model in this process: single-threaded BLAS like the server.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RECSYS = str(Path(PYTHON).parent / "recsys")
LUA = ROOT / "bench" / "serve.lua"
SCENARIOS = (
    "healthz",
    "recommendations",
    "recommendations_light",
    "recommendations_hot_swap",
    "recommendations_async_impressions",
    "recommendations_declared_route",
)


def say(message: str) -> None:
    print(f"[bench/serve] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str], what: str) -> str:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    say(f"{what}: {time.perf_counter() - started:.1f}s")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The long-history world: users' event counts follow Zipf's law by activity rank, from
# LONG_MAX_EVENTS (the most active user) down to LONG_MIN_EVENTS (the least active).
LONG_MIN_EVENTS = 50
LONG_MAX_EVENTS = 2_000
LONG_DAYS = 60.0


def long_history_world(out: Path, n_users: int, n_items: int, seed: int = 42) -> dict[str, Any]:
    """Write a world of heavy users (items, users, rating events as NDJSON).

    Like ``bench/datasets.py``'s organic shape (each user rates distinct items chosen
    by taste under the simulator's ground truth, at random times), but the number of
    items per user is Zipf-distributed over users, from ``LONG_MAX_EVENTS`` down to
    ``LONG_MIN_EVENTS``: the regime where per-request work that grows with the
    history shows. Returns the per-user event-count quantiles.
    """
    import numpy as np
    import polars as pl

    from recsys_assets.simulation.truth import GroundTruth

    end = datetime(2024, 6, 1, tzinfo=UTC)
    start = end.timestamp() - LONG_DAYS * 86_400.0
    truth = GroundTruth.generate(
        n_users, n_items, 24, seed, datetime.fromtimestamp(start, tz=UTC), end
    )
    rng = np.random.default_rng([seed, 0x10C6])
    # Zipf over activity ranks: count(rank r) = max * r ** -s, s chosen so the last
    # rank gets the minimum; ranks are shuffled over users.
    s = np.log(LONG_MAX_EVENTS / LONG_MIN_EVENTS) / np.log(max(n_users, 2))
    ranks = rng.permutation(n_users) + 1
    per_user = np.minimum(np.rint(LONG_MAX_EVENTS * ranks**-s).astype(int), n_items)
    users: list[Any] = []
    items: list[Any] = []
    ts: list[Any] = []
    values: list[Any] = []
    for lo in range(0, n_users, 256):
        block = np.arange(lo, min(lo + 256, n_users))
        rel = truth.relevance_matrix(block)
        keys = 3.0 * np.log(rel) - np.log(-np.log(rng.random(rel.shape)))
        for row, user in enumerate(block.tolist()):
            n = int(per_user[user])
            chosen = np.argpartition(-keys[row], n - 1)[:n]
            users.append(np.full(n, user))
            items.append(chosen)
            ts.append(np.sort(rng.uniform(start, end.timestamp(), size=n)))
            noise = rng.normal(0.0, 0.7, size=n)
            values.append(np.clip(np.rint(1 + 4 * rel[row, chosen] + noise), 1, 5))
    events = pl.DataFrame(
        {
            "user_id": truth.format_user_ids(np.concatenate(users)).tolist(),
            "item_id": truth.format_item_ids(np.concatenate(items)).tolist(),
            "ts": np.concatenate(ts),
            "value": np.concatenate(values),
        }
    ).sort("ts")
    out.mkdir(parents=True, exist_ok=True)
    events.with_row_index("n").select(
        pl.format("long{}", pl.col("n")).alias("event_id"),
        pl.lit("rating").alias("event_type"),
        "user_id",
        "item_id",
        "ts",
        "value",
    ).write_ndjson(out / "events.ndjson")
    cat_ids = truth.category_ids
    pl.DataFrame(
        {
            "item_id": truth.item_ids,
            "title": [f"item {i}" for i in range(truth.n_items)],
            "categories": [[cat_ids[c] for c in row if c >= 0] for row in truth.item_categories],
        }
    ).write_ndjson(out / "items.ndjson")
    pl.DataFrame({"user_id": truth.user_ids}).write_ndjson(out / "users.ndjson")
    q = np.quantile(per_user, [0.0, 0.5, 0.9, 0.99, 1.0]).tolist()
    return {
        "users": n_users,
        "items": n_items,
        "events": int(per_user.sum()),
        "events_per_user": dict(zip(("min", "p50", "p90", "p99", "max"), q, strict=True)),
    }


def build_models(home: Path, env: dict[str, str], args: argparse.Namespace) -> list[str]:
    """Two versions of a model of the chosen world, the first one in production."""
    sim = home.parent / "sim"
    if args.world == "long":
        started = time.perf_counter()
        args.long_world = long_history_world(sim, args.long_users, args.long_items)
        say(f"long-history world {args.long_world}: {time.perf_counter() - started:.1f}s")
        events = [sim / "events.ndjson"]
    else:
        run(
            [
                RECSYS,
                "simulate",
                "--out",
                str(sim),
                "--users",
                str(args.users),
                "--items",
                str(args.items),
                "--events",
                str(args.events),
                "--days",
                str(args.days),
                "--seed",
                "42",
            ],
            env,
            f"simulate {args.events:,} events",
        )
        events = sorted((sim / "weblogs").glob("*.ndjson*"))
    run(
        [
            RECSYS,
            "catalog",
            "load",
            "--items",
            str(sim / "items.ndjson"),
            "--users",
            str(sim / "users.ndjson"),
        ],
        env,
        "catalog load",
    )
    run([RECSYS, "ingest", *map(str, events)], env, "ingest + process")
    return _retrain(home, env, args.models)


def _retrain(home: Path, env: dict[str, str], models: int) -> list[str | None]:
    run([RECSYS, "retrain"], env, "retrain (v1)")
    if models > 1:
        run([RECSYS, "retrain"], {**env, "RECSYS_SEED": "7"}, "retrain (v2)")
    return model_versions(home)


def model_versions(home: Path) -> list[str | None]:
    """(production, the other version or None) of a lake with one or two models."""
    from recsys_serving.lake import LocalLake
    from recsys_serving.layout import CANDIDATE, PRODUCTION
    from recsys_serving.registry import ModelRegistry

    registry = ModelRegistry(LocalLake(home / "lake"))
    versions = registry.version_ids()
    production = registry.alias(PRODUCTION)
    if production is None or production.version is None:
        # The first-model rule kept the model out of production (it did not beat
        # popularity on the holdout): the bench serves it anyway.
        registry.promote(versions[-1], reason="bench: serve the trained model")
        production = registry.alias(PRODUCTION)
    assert production is not None and production.version is not None, versions
    v1 = production.version
    v2 = next((v for v in reversed(versions) if v != v1), None)
    if registry.alias(CANDIDATE) is not None:
        registry.clear_alias(CANDIDATE, reason="bench: v2 is swapped in by hand")
    return [v1, v2]


def user_ids(home: Path, path: Path, n_unknown: int = 100) -> int:
    import orjson

    ids = [
        orjson.loads(line)["user_id"]
        for line in (home.parent / "sim" / "users.ndjson").read_bytes().splitlines()
        if line.strip()
    ]
    ids += [f"bench-new-user-{i}" for i in range(n_unknown)]
    path.write_text("\n".join(ids) + "\n")
    return len(ids)


class Server:
    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [RECSYS, "serve", "--port", str(self.port), "--workers", str(workers)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the server and its workers so far."""
        return process_tree_cpu(self.proc.pid)

    def models(self) -> dict[str, set[str]]:
        from recsys_serving.api.metrics import parse_metrics

        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        found: dict[str, set[str]] = {}
        for labels, value in parse_metrics(text).get("recsys_model_info", []):
            if value == 1 and labels["alias"] == "production":
                found.setdefault(labels["worker"], set()).add(labels["version"])
        return found

    def wait_serving(self, version: str, workers: int, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"recsys serve exited with {self.proc.returncode}")
            try:
                models = self.models()
                if len(models) == workers and all(v == {version} for v in models.values()):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"workers not all on {version} after {timeout:.0f}s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def declared_route_overlay(work: Path) -> Path:
    """A copy of ``recsys_serving`` whose recommendations router is a plain APIRouter
    (no ``FastRoute``: every request goes through FastAPI's parameter resolution), to
    put on a server's PYTHONPATH: what the bypass is worth, measured, not assumed."""
    import recsys_serving

    target = work / "declared-route"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        Path(recsys_serving.__file__).parent,
        target / "recsys_serving",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    module = target / "recsys_serving" / "api" / "recommendations.py"
    text = module.read_text()
    patched = text.replace(
        'APIRouter(tags=["recommendations"], route_class=FastRoute)',
        'APIRouter(tags=["recommendations"])',
    )
    if patched == text:
        raise SystemExit(f"{module}: no FastRoute router to replace")
    module.write_text(patched)
    return target


def process_tree_cpu(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live descendants (/proc)."""
    parents: dict[int, int] = {}
    times: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]), int(fields[12]))
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    tick = os.sysconf("SC_CLK_TCK")
    user = sum(times.get(p, (0, 0))[0] for p in tree) / tick
    system = sum(times.get(p, (0, 0))[1] for p in tree) / tick
    return user, system


def wrk(
    url: str,
    duration: float,
    connections: int,
    script_args: list[str] | None,
    server: Server | None = None,
) -> dict:
    """Run wrk; with ``server``, also the CPU it and wrk used per request."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if script_args is not None:
        cmd += ["-s", str(LUA), url, "--", *script_args]
    else:
        cmd += ["-s", str(LUA), url, "--", "", "-", "10", "/healthz"]
    load_before = os.getloadavg()[0]
    server_before = server.cpu_seconds() if server is not None else (0.0, 0.0)
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_after = server.cpu_seconds() if server is not None else (0.0, 0.0)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    result = json.loads(line.removeprefix("WRK_JSON "))
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds
    result["errors"] = sum(
        result[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    result["loadavg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if server is not None and result["requests"]:
        n = result["requests"]
        user = server_after[0] - server_before[0]
        system = server_after[1] - server_before[1]
        wrk_cpu = (wrk_after.ru_utime - wrk_before.ru_utime) + (
            wrk_after.ru_stime - wrk_before.ru_stime
        )
        result["cpu"] = {
            "server_us_per_request": round((user + system) / n * 1e6, 1),
            "server_system_us_per_request": round(system / n * 1e6, 1),
            "server_cores": round((user + system) / seconds, 2),
            "wrk_us_per_request": round(wrk_cpu / n * 1e6, 1),
            "wrk_cores": round(wrk_cpu / seconds, 2),
        }
    return result


def group_commit(lake_dir: Path, seconds: float = 3.0) -> dict[str, Any]:
    """Impression logging alone, on the bench's disk: answers/s with one request at a
    time (every answer pays its own fsync) and with 32 concurrent requests (grouped)."""
    import asyncio

    from recsys_serving.api.impressions import ImpressionLog, Shown, impression_events
    from recsys_serving.api.metrics import ServiceMetrics
    from recsys_serving.lake import LocalLake
    from recsys_serving.settings import Settings

    def events(n: int) -> list[dict[str, Any]]:
        shown = [Shown(f"i{p}", p) for p in range(10)]
        return impression_events(f"bench-{n}", "u1", shown, "v-bench", "champion")

    async def drive(log: ImpressionLog, concurrency: int) -> int:
        end = time.monotonic() + seconds
        answers = 0

        async def client(c: int) -> None:
            nonlocal answers
            n = 0
            while time.monotonic() < end:
                await log.log(events(c * 10_000_000 + n))
                n += 1
                answers += 1

        await asyncio.gather(*(client(c) for c in range(concurrency)))
        return answers

    out: dict[str, Any] = {}
    for concurrency in (1, 32):
        log = ImpressionLog(LocalLake(lake_dir), Settings(home=lake_dir.parent), ServiceMetrics())
        answers = asyncio.run(drive(log, concurrency))
        log.close()
        out[f"concurrency_{concurrency}"] = {
            "answers_per_s": answers / seconds,
            "fsyncs_per_s": log.groups / seconds,
            "answers_per_group": answers / max(log.groups, 1),
        }
    return out


def stage_budget(
    home: Path, users_file: Path, key: str, n: int = 2000, only_model: bool = False
) -> dict[str, Any]:
    """CPU microseconds per request, in-process: the model's stages over ``n`` random
    users (process time), then the service around the model through its ASGI app
    (no HTTP): /healthz, /recommendations, and /recommendations with a fixed answer
    instead of the model."""
    import random

    from recsys_serving.lake import LocalLake
    from recsys_serving.layout import PRODUCTION
    from recsys_serving.model import candidates as cand
    from recsys_serving.model.context import user_context
    from recsys_serving.model.features import assemble_features
    from recsys_serving.model.recommender import Recommender
    from recsys_serving.registry import ModelRegistry

    registry = ModelRegistry(LocalLake(home / "lake"))
    production = registry.alias(PRODUCTION)
    assert production is not None and production.version is not None
    cache = home / "cache" / "models"
    model = Recommender.load(registry.fetch(production.version, cache))
    lightgbm = model.ranker
    model.compile_ranker(cache / ".compiled")
    users = users_file.read_text().split()
    rnd = random.Random(7)
    sample = [rnd.choice(users) for _ in range(n)]
    clock = time.process_time_ns
    state = model.state
    spent = dict.fromkeys(("context", "candidates", "features", "ranking_compiled"), 0)
    spent["ranking_lightgbm"] = 0
    for user in sample[:200]:  # warm up
        model.recommend(user, 10)
    for user in sample:
        t0 = clock()
        ctx = user_context(state, user)
        t1 = clock()
        allowed = cand.allowed_mask(state, ctx)
        pool = cand.generate(state, ctx, allowed, model.pool, None, model._retrieve)
        t2 = clock()
        features = assemble_features(state, ctx, pool.items)
        t3 = clock()
        model.ranker.score(features)
        t4 = clock()
        lightgbm.score(features)
        t5 = clock()
        spent["context"] += t1 - t0
        spent["candidates"] += t2 - t1
        spent["features"] += t3 - t2
        spent["ranking_compiled"] += t4 - t3
        spent["ranking_lightgbm"] += t5 - t4
    t0 = clock()
    for user in sample:
        model.recommend(user, 10)
    spent["recommend_total"] = clock() - t0
    # The live path alone (code with precomputed answers: what every request costs
    # that the bundle's answer table does not cover).
    live = getattr(model, "ranked", None)
    if live is not None:
        t0 = clock()
        for user in sample:
            model._scored(live(user, 10))
        spent["recommend_live"] = clock() - t0
    out: dict[str, Any] = {"model": {k: round(v / n / 1e3, 1) for k, v in spent.items()}}
    table = getattr(model, "answers", None)
    out["answers"] = {"depth": table.depth, "ranker": table.ranker} if table is not None else None
    # Latency of one call (wall clock, known users only: the long histories are theirs),
    # as served (from the answer table when the bundle has one) and on the live path.
    known = [u for u in sample if model.knows_user(u)]
    calls = {"recommend_known_ms": lambda user: model.recommend(user, 10)}
    if live is not None:
        calls["recommend_known_live_ms"] = lambda user: model._scored(live(user, 10))
    for name, call in calls.items():
        wall = []
        c0 = clock()
        for user in known:
            t0 = time.perf_counter_ns()
            call(user)
            wall.append(time.perf_counter_ns() - t0)
        cpu_us = (clock() - c0) / max(len(known), 1) / 1e3
        wall.sort()
        out[name] = {
            f"p{q}": round(wall[min(len(wall) - 1, len(wall) * q // 100)] / 1e6, 3)
            for q in (50, 90, 99)
        } | {"users": len(known), "cpu_us": round(cpu_us, 1)}
    if only_model:
        return out
    out["service"] = asgi_budget(sample, key, n)
    return out


def asgi_budget(sample: list[str], key: str, n: int) -> dict[str, float]:
    """Process CPU per request through the service's ASGI app (8 concurrent requests)."""
    import asyncio

    from recsys_serving.api.app import create_app
    from recsys_serving.settings import Settings

    app = create_app(Settings())
    header = [(b"host", b"bench"), (b"x-api-key", key.encode())]

    async def call(path: str, query: bytes = b"") -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": header,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    async def measure(requests: list[tuple[str, bytes]]) -> float:
        for path, query in requests[:200]:
            await call(path, query)

        async def client(part: list[tuple[str, bytes]]) -> None:
            for path, query in part:
                status = await call(path, query)
                assert status == 200, (path, status)

        started = time.process_time()
        await asyncio.gather(*(client(requests[i::8]) for i in range(8)))
        return round((time.process_time() - started) / len(requests) * 1e6, 1)

    async def main() -> dict[str, float]:
        from urllib.parse import quote

        async with app.router.lifespan_context(app):
            while not app.state.manager.state.ready:
                await asyncio.sleep(0.1)
            recs = [(f"/recommendations/{quote(u, safe='')}", b"k=10") for u in sample[:n]]
            found = {
                "healthz": await measure([("/healthz", b"")] * n),
                "recommendations": await measure(recs),
            }
            model = app.state.manager.state.production.model
            fixed = model.recommend(sample[0], 10)
            model.recommend = lambda *args, **kwargs: fixed
            found["recommendations_fixed_answer"] = await measure(recs)
            return found

    try:
        import uvloop

        factory = uvloop.new_event_loop  # what uvicorn runs the workers on
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds per scenario.")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--days", type=float, default=14)
    parser.add_argument(
        "--world",
        choices=("demo", "long"),
        default="demo",
        help="demo: `recsys simulate` (--users/--items/--events/--days); long: heavy users, "
        f"{LONG_MIN_EVENTS}-{LONG_MAX_EVENTS} rated items each, Zipf over users.",
    )
    parser.add_argument("--long-users", type=int, default=5_000)
    parser.add_argument("--long-items", type=int, default=3_000)
    parser.add_argument(
        "--stages-only",
        type=Path,
        default=None,
        metavar="WORKDIR",
        help="Only the in-process model stages, on a working directory kept by --keep "
        "(to compare two versions of the code on the same bundle).",
    )
    parser.add_argument(
        "--models",
        type=int,
        choices=(1, 2),
        default=2,
        help="Models to train: 1 skips the second retrain and the hot-swap scenario.",
    )
    parser.add_argument(
        "--train-params",
        default=None,
        help="RECSYS_TRAIN_PARAMS for the retrains (JSON), e.g. to train a big world faster.",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        metavar="WORKDIR",
        help="Serve the models of a working directory kept by --keep instead of building "
        "new ones (the same bundles under two versions of the runtime code).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    parser.add_argument("--keep", action="store_true", help="Keep the working directory.")
    parser.add_argument(
        "--no-stages", action="store_true", help="Skip the in-process per-stage CPU budget."
    )
    parser.add_argument(
        "--declared-route",
        action="store_true",
        help="Also serve /recommendations without the FastRoute bypass (a patched copy of "
        "the package on the server's PYTHONPATH), right after the main scenario.",
    )
    args = parser.parse_args()
    if args.stages_only is not None:
        work = args.stages_only
        os.environ["RECSYS_HOME"] = str(work / "home")
        stages = stage_budget(work / "home", work / "users.txt", "", only_model=True)
        print(json.dumps(stages, indent=2))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    work = args.reuse or Path(tempfile.mkdtemp(prefix="recsys-bench-serve-"))
    home = work / "home"
    env = {
        # RECSYS_BENCH (the shared machine's "this is a measurement" flag) reaches the
        # server and the CLI runs; no other RECSYS_ setting of the caller leaks in.
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RECSYS_") or k == "RECSYS_BENCH"
        },
        "RECSYS_HOME": str(home),
        "RECSYS_LOG_LEVEL": "WARNING",
        "OPENBLAS_NUM_THREADS": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }
    if args.train_params:
        env["RECSYS_TRAIN_PARAMS"] = args.train_params
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ["RECSYS_HOME"] = str(home)
    results: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    server: Server | None = None
    try:
        if args.reuse is not None:
            v1, v2 = model_versions(home)
            world = work / "world.json"
            if world.exists():
                args.long_world = json.loads(world.read_text())
        else:
            v1, v2 = build_models(home, env, args)
            if args.world == "long":
                (work / "world.json").write_text(json.dumps(args.long_world))
        users_file = work / "users.txt"
        n_users = user_ids(home, users_file)
        key = run(
            [
                RECSYS,
                "keys",
                "create",
                "--scopes",
                "recommend",
                "--rps",
                "1000000",
                "--burst",
                "1000000",
                "--name",
                "bench",
            ],
            env,
            "bench key",
        ).strip()
        server = Server(env, args.workers, work / "serve.log")
        ready = server.wait_serving(v1, args.workers)
        say(f"recsys serve --workers {args.workers} on {server.url}: both on {v1} in {ready:.1f}s")
        rec_args = [key, str(users_file), "10"]
        # Warm up (first requests touch lazily built structures), not measured.
        wrk(server.url, 3, args.connections, rec_args)

        say(f"healthz: {args.duration:g}s, {args.connections} connections")
        results["healthz"] = wrk(server.url, args.duration, args.connections, None, server)
        say(f"recommendations: {args.duration:g}s over {n_users:,} user ids")
        results["recommendations"] = wrk(
            server.url, args.duration, args.connections, rec_args, server
        )
        if args.declared_route:
            # The same requests through FastAPI's parameter resolution (issue 14: keep
            # the FastRoute bypass only while it pays), on a second server, then the
            # first one again so the two sit side by side in time.
            server.stop()
            overlay = declared_route_overlay(work)
            path = os.pathsep.join(p for p in (str(overlay), env.get("PYTHONPATH")) if p)
            server = Server({**env, "PYTHONPATH": path}, args.workers, work / "s-declared.log")
            server.wait_serving(v1, args.workers)
            wrk(server.url, 3, args.connections, rec_args)
            say(f"recommendations without FastRoute: {args.duration:g}s")
            results["recommendations_declared_route"] = wrk(
                server.url, args.duration, args.connections, rec_args, server
            )
            server.stop()
            server = Server(env, args.workers, work / "serve-2.log")
            server.wait_serving(v1, args.workers)
            wrk(server.url, 3, args.connections, rec_args)
            say("recommendations with FastRoute again")
            results["recommendations_fast_route_again"] = wrk(
                server.url, args.duration, args.connections, rec_args, server
            )
        light = max(1, args.workers * 2)
        say(f"recommendations at {light} connections (latency at a lighter load)")
        results["recommendations_light"] = wrk(server.url, args.duration, light, rec_args, server)
        results["recommendations_light"]["connections"] = light

        swaps: list[dict[str, Any]] = []

        def swapper() -> None:
            assert v2 is not None
            from recsys_serving.lake import LocalLake
            from recsys_serving.registry import ModelRegistry

            registry = ModelRegistry(LocalLake(home / "lake"))
            for at, version in ((args.duration / 3, v2), (2 * args.duration / 3, v1)):
                time.sleep(max(0.0, at - (time.monotonic() - swap_started)))
                registry.promote(version, reason="bench: hot swap under load")
                took = server.wait_serving(version, args.workers, timeout=args.duration)
                swaps.append({"version": version, "at_s": round(at, 1), "converged_s": took})

        if v2 is not None:
            say(f"recommendations during hot swaps: {args.duration:g}s ({v1} -> {v2} -> {v1})")
            swap_started = time.monotonic()
            thread = threading.Thread(target=swapper, daemon=True)
            thread.start()
            results["recommendations_hot_swap"] = wrk(
                server.url, args.duration, args.connections, rec_args, server
            )
            thread.join(timeout=args.duration)
            results["recommendations_hot_swap"]["swaps"] = swaps
        results["versions"] = [v1, v2]
        server.stop()
        server = Server({**env, "RECSYS_IMPRESSION_SYNC": "false"}, args.workers, work / "s2.log")
        server.wait_serving(v1, args.workers)
        wrk(server.url, 3, args.connections, rec_args)
        say("recommendations, impressions committed in the background (IMPRESSION_SYNC=false)")
        results["recommendations_async_impressions"] = wrk(
            server.url, args.duration, args.connections, rec_args, server
        )
        server.stop()
        server = None
        say("impression group commit alone (1 and 32 concurrent answers, 3 s each)")
        results["impression_group_commit"] = group_commit(work / "group-commit" / "lake")
        if not args.no_stages:
            say("CPU per request by stage, in-process (same model, same users)")
            results["stages"] = stage_budget(home, users_file, key)
    finally:
        if server is not None:
            server.stop()
        if not args.keep and args.reuse is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")

    if args.world == "long" and hasattr(args, "long_world"):
        results["long_world"] = args.long_world
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {args.out}")
    failed = [
        name
        for name in (*SCENARIOS, "recommendations_fast_route_again")
        if name in results and results[name]["errors"]
    ]
    if (
        "recommendations_hot_swap" in results
        and len(results["recommendations_hot_swap"]["swaps"]) != 2
    ):
        failed.append("hot swap did not converge twice")
    if failed:
        raise SystemExit(f"errors in: {', '.join(failed)}")


def report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\nmachine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"load average at start {m['loadavg_at_start'][0]:.2f}"
    )
    print(
        f"{'scenario':34} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
        f" {'server us/req':>14} {'wrk us/req':>11} {'load':>11}"
    )
    for name in (*SCENARIOS, "recommendations_fast_route_again"):
        if name not in results:
            continue
        r = results[name]
        cpu = r.get("cpu", {})
        print(
            f"{name:34} {r['rps']:9,.0f} {r['p50_us'] / 1e3:8.2f} {r['p95_us'] / 1e3:8.2f} "
            f"{r['p99_us'] / 1e3:8.2f} {r['errors']:7d} "
            f"{cpu.get('server_us_per_request', float('nan')):14.0f} "
            f"{cpu.get('wrk_us_per_request', float('nan')):11.0f} "
            f"{r['loadavg'][0]:5.2f}-{r['loadavg'][1]:<5.2f}"
        )
    gc = results["impression_group_commit"]
    print(
        "impression logging alone (10 events per answer): "
        f"{gc['concurrency_1']['answers_per_s']:,.0f} answers/s one at a time (one fsync each), "
        f"{gc['concurrency_32']['answers_per_s']:,.0f} answers/s with 32 concurrent "
        f"({gc['concurrency_32']['answers_per_group']:.1f} answers per fsync)"
    )
    if "long_world" in results:
        print(f"long-history world: {results['long_world']}")
    if "stages" in results:
        latency = results["stages"]["recommend_known_ms"]
        print(f"Recommender.recommend, known users, wall ms: {latency}")
        if "recommend_known_live_ms" in results["stages"]:
            live = results["stages"]["recommend_known_live_ms"]
            print(f"  the live path alone (answers {results['stages']['answers']}): {live}")
        model = results["stages"]["model"]
        service = results["stages"]["service"]
        print(
            "CPU us per request in-process: "
            + ", ".join(f"{k} {v:.0f}" for k, v in model.items())
            + " | "
            + ", ".join(f"{k} {v:.0f}" for k, v in service.items())
        )
    ceiling = results["healthz"]["rps"]
    rec = results["recommendations"]
    print(
        f"/recommendations at {rec['rps'] / ceiling:.0%} of the /healthz ceiling; "
        f"p99 {rec['p99_us'] / 1e3:.1f} ms; "
        f"swaps: {results.get('recommendations_hot_swap', {}).get('swaps')}"
    )


if __name__ == "__main__":
    main()
