"""A ``recsys serve`` worker keeps its long-lived heap out of the garbage collector's
way (``recsys_serving/api/heap.py``): full collections of the loaded models were the
whole p99 tail of ``/recommendations`` under load."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from model_support import tiny_bundle, tiny_outcome, tiny_world, train_tiny  # noqa: F401

from recsys_serving.api import app as app_module
from recsys_serving.api import heap
from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings
from serving_support import service_settings, serving_client, wait_for


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """Whatever a test froze goes back to the collector (the test process's heap is
    not ours to keep frozen)."""
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return service_settings(tmp_path / "home")


def frozen(obj: Any) -> bool:
    """True when ``obj`` sits in the permanent generation (``gc.get_objects`` lists the
    three collected generations only)."""
    assert gc.is_tracked(obj)
    return all(o is not obj for o in gc.get_objects())


def test_settle_exempts_what_lives_and_frees_what_was_let_go() -> None:
    class Node:
        me: Any

    node = Node()
    node.me = node  # a cycle: only the cyclic collector can free it
    ref = weakref.ref(node)
    heap.settle()
    assert frozen(node) and gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None  # frozen objects are skipped by every collection...
    heap.settle()
    assert ref() is None  # ...so settling unfreezes first: a swapped-out model is freed


def test_a_serve_worker_settles_its_heap_when_its_models_change(
    settings: Settings,
    tiny_bundle: Path,  # noqa: F811
    tiny_world: Any,  # noqa: F811
) -> None:
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(train_tiny(tiny_world, seed=1).bundle_path).version
    registry.promote(v1, reason="test")
    with serving_client(settings, owns_heap=True) as client:
        manager = client.app.state.manager

        def production() -> Any:
            loaded = manager.state.production
            return loaded.model if loaded is not None and loaded.version == v1 else None

        wait_for(lambda: production() is not None and frozen(production()), 20, "v1 frozen")
        registry.promote(v2, reason="test: a swap")

        def swapped() -> bool:
            loaded = manager.state.production
            return loaded is not None and loaded.version == v2 and frozen(loaded.model)

        wait_for(swapped, 20, "v2 loaded and frozen")


def test_an_app_inside_another_program_leaves_its_heap_alone(
    settings: Settings,
    tiny_bundle: Path,  # noqa: F811
) -> None:
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    with serving_client(settings) as client:
        manager = client.app.state.manager
        wait_for(lambda: manager.state.versions().get("production") == v1, 20, "v1")
        assert gc.get_freeze_count() == 0


def test_a_collector_worker_settles_its_heap_once_started(settings: Settings) -> None:
    app = app_module.create_app(settings, collector_only=True, owns_heap=True)
    assert gc.get_freeze_count() == 0
    with TestClient(app):
        assert frozen(app) and frozen(app.state.intake)


def test_the_server_entry_points_own_their_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict[str, Any]] = []
    monkeypatch.setattr(app_module, "create_app", lambda **kwargs: built.append(kwargs))
    app_module.service_app()
    app_module.collector_app()
    assert built == [{"owns_heap": True}, {"collector_only": True, "owns_heap": True}]
