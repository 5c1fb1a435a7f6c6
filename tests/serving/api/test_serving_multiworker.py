"""A real ``recsys serve --workers 2``: both workers converge on a promoted version (seen
in /metrics) and one key's rate limit holds across the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_world, train_tiny  # noqa: F401

from recsys_serving.api.metrics import parse_metrics
from recsys_serving.keys import KeyFile
from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from serving_support import wait_for
from support import free_port

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_bundle(tiny_world: TinyWorld) -> Path:  # noqa: F811
    return train_tiny(tiny_world, seed=2).bundle_path


class Server:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.home = home
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc

    def models(self) -> dict[str, set[str]]:
        """worker -> versions it serves, from recsys_model_info."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        found: dict[str, set[str]] = {}
        for labels, value in parse_metrics(text).get("recsys_model_info", []):
            if value == 1:
                found.setdefault(labels["worker"], set()).add(labels["version"])
        return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    home = tmp_path / "home"
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "RECSYS_MODEL_POLL_SECONDS": "0.5",
        "OPENBLAS_NUM_THREADS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("RECSYS_RUN_DIR", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "recsys"), "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    srv = Server(home, port, proc)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "serve.log").read_text())
        try:
            return httpx.get(f"{srv.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 60, "recsys serve")
        yield srv
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # The per-run directory (token buckets, metrics files) is removed on exit.
    assert not list((home / "run").glob("serve-*"))


def test_both_workers_converge_on_a_promoted_version(
    server: Server,
    tiny_bundle: Path,  # noqa: F811
    other_bundle: Path,
) -> None:
    registry = ModelRegistry(LocalLake(server.home / "lake"))
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(other_bundle).version
    registry.promote(v1, reason="test")
    converged = wait_for(
        lambda: (m := server.models()) and len(m) == 2 and all(v == {v1} for v in m.values()) and m,
        60,
        "both workers on v1",
    )
    workers = set(converged)
    registry.promote(v2, reason="test: promotion")
    promoted_at = time.monotonic()
    wait_for(
        lambda: (m := server.models()) and all(v == {v2} for v in m.values()) and len(m) == 2,
        30,
        "both workers on v2",
    )
    # Bounded: a poll interval (0.5 s) plus a load, not a restart.
    assert time.monotonic() - promoted_at < 15
    assert set(server.models()) == workers
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert parse_metrics(text)["recsys_model_ready"] == [({}, 1.0)]


def test_one_keys_rate_limit_holds_across_workers(server: Server) -> None:
    # A slow refill (one token per 5 s) makes the outcome independent of how fast this
    # machine sends: a per-worker limit would let 2 x burst through, one shared bucket
    # burst + rps x elapsed, far below that for any run shorter than a minute.
    rps, burst = 0.2, 10
    _, secret = KeyFile.in_home(server.home).create(["admin"], rps=rps, burst=burst)

    def one(_: int) -> tuple[int, str | None]:
        # A new connection per request, so the kernel spreads them over both workers.
        r = httpx.get(f"{server.url}/admin/models", headers={"X-API-Key": secret}, timeout=10)
        worker = r.json().get("worker") if r.status_code == 200 else r.headers.get("Retry-After")
        return r.status_code, worker

    started = time.monotonic()
    results: list[tuple[int, str | None]] = []
    with ThreadPoolExecutor(8) as pool:
        # Until both workers have let some through and the bucket has refused some: the
        # kernel does not promise to hand a few dozen connections to both of them, and a
        # worker answers 401 until it has read the new key file (within a second).
        while time.monotonic() - started < 60:
            results += [r for r in pool.map(one, range(16)) if r[0] != 401]
            answered = {w for code, w in results if code == 200}
            if len(answered) == 2 and any(code == 429 for code, _ in results):
                break
    elapsed = time.monotonic() - started
    codes = Counter(code for code, _ in results)
    assert set(codes) == {200, 429}, codes
    assert burst <= codes[200] <= burst + rps * elapsed + 1, (codes, elapsed)
    assert codes[200] < 2 * burst, (codes, elapsed)  # not one bucket per worker
    assert len({w for code, w in results if code == 200}) == 2  # both workers answered
    assert all(w is not None and int(w) >= 1 for code, w in results if code == 429)
    samples = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=5).text)
    ((_, throttled),) = samples["recsys_throttled_total"]
    assert throttled == codes[429]


def test_a_forced_reload_reaches_every_worker(
    server: Server,
    tiny_bundle: Path,  # noqa: F811
    other_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = ModelRegistry(LocalLake(server.home / "lake"))
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(other_bundle).version
    registry.promote(v1, reason="test")
    _, secret = KeyFile.in_home(server.home).create(["admin"])
    wait_for(
        lambda: (m := server.models()) and len(m) == 2 and all(v == {v1} for v in m.values()),
        60,
        "both workers on v1",
    )
    # v2 is damaged when production moves to it (an older recsys did not verify): both
    # workers refuse it and keep v1, each with a 5-minute back-off before retrying.
    ranker = Path(registry.lake.local_path(registry.model_key(v2, "ranker.txt")))  # type: ignore[arg-type]
    good = ranker.read_text()
    ranker.write_text(good.replace("tree", "TREE", 1))
    monkeypatch.setattr(ModelRegistry, "verify", lambda self, version: {})
    registry.promote(v2, reason="test: damaged")
    headers = {"X-API-Key": secret}

    def refused_by(worker_count: int) -> bool:
        seen: dict[str, bool] = {}
        for _ in range(20):  # new connections, spread over the workers by the kernel
            r = httpx.get(f"{server.url}/admin/models", headers=headers, timeout=10)
            if r.status_code == 200:
                seen[r.json()["worker"]] = v2 in r.json()["refused"]
        return len(seen) == worker_count and all(seen.values())

    wait_for(lambda: refused_by(2), 30, "both workers refusing v2")
    assert all(v == {v1} for v in server.models().values())

    ranker.write_text(good)  # repaired; one forced reload, answered by one worker
    reloaded_at = time.monotonic()
    r = httpx.post(f"{server.url}/admin/models/reload?force=true", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: (m := server.models()) and len(m) == 2 and all(v == {v2} for v in m.values()),
        30,
        "both workers on v2",
    )
    assert time.monotonic() - reloaded_at < 15  # a poll interval and a load, not 5 minutes
