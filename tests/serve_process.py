"""A real ``recsys serve`` in a subprocess on a free loopback port, its output in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving_support import wait_for
from support import free_port

BIN = Path(sys.executable).parent


@dataclass
class ServeProcess:
    home: Path
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def recsys_serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ServeProcess]:
    """Start ``recsys serve`` (stdout and stderr both into ``serve.log``), wait until it
    answers /healthz, and stop it with SIGINT (as Ctrl-C or ``docker stop`` would)."""
    home = tmp_path / "home"
    port = free_port()
    environ = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "RECSYS_MODEL_POLL_SECONDS": "0.5",
        "OPENBLAS_NUM_THREADS": "1",
        **(env or {}),
    }
    for inherited in ("PROMETHEUS_MULTIPROC_DIR", "RECSYS_RUN_DIR", "RECSYS_LOG_FORMAT"):
        environ.pop(inherited, None)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "recsys"), "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServeProcess(home, f"http://127.0.0.1:{port}", port, proc, log)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"recsys serve exited:\n{server.output()[-3000:]}")
        try:
            return httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 90, "recsys serve to answer /healthz")
        yield server
    finally:
        stop(server)


def stop(server: ServeProcess) -> None:
    if server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
