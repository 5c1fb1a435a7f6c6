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
