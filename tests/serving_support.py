"""Helpers for the serving tests: settings, keys, apps with injected dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from recsys_serving.api.app import create_app
from recsys_serving.keys import KeyFile
from recsys_serving.settings import Settings


def service_settings(home: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "home": home,
        "model_poll_seconds": 0.2,
        "store_timeout_ms": 100.0,
        "rate_limit_rps": 10_000.0,
        "rate_limit_burst": 10_000,
    }
    return Settings(**{**defaults, **overrides})


def new_key(settings: Settings, scopes: str, **limits: Any) -> str:
    _, secret = KeyFile.in_home(settings.resolved_home).create(scopes.split(","), **limits)
    return secret


@contextmanager
def serving_client(settings: Settings, **app_kwargs: Any) -> Iterator[TestClient]:
    app_kwargs.setdefault("docstore", None)
    with TestClient(create_app(settings, **app_kwargs)) as client:
        yield client


@contextmanager
def running_app(app: Any, wait_ready: bool = True) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on 127.0.0.1 in a thread; yields the URL.

    The model loads in the background after start-up, so by default this also waits
    until the full service is ready (a model is loaded): requests sent earlier get 503.
    """
    import socket
    import threading
    import time

    import uvicorn

    # Bound here and handed to uvicorn: a port picked now and bound later could be
    # taken in between by another server or an outgoing connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    from recsys_serving.api.http import UVICORN_HTTP

    server = uvicorn.Server(  # the HTTP protocol `recsys serve` runs (JSON parser errors)
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            http=UVICORN_HTTP,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        manager = getattr(app.state, "manager", None)
        while wait_ready and manager is not None and not manager.state.ready:
            if time.time() > deadline + 30:
                raise RuntimeError("the service loaded no model within 60 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    import time

    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
