"""Durable before the answer, proven on the order of system calls.

The README promises that an accepted event is fsynced to a landing segment before the
collector answers 202, and that a recommendation's impressions are fsynced before the
answer leaves. Reading the segment after the answer cannot prove that: the bytes are in
the page cache whether or not they were ever fsynced. These tests journal two things in
one ordered log: every completed ``os.fsync`` of a regular file (with what the file held
when the fsync began, so only bytes already written count as made durable), and the
moment the application hands the status line of an answer to the server. An event is
durable before its answer when an fsync holding its bytes precedes that answer.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from model_support import tiny_bundle, tiny_outcome, tiny_world

from recsys_serving.api.app import create_app
from recsys_serving.lake import LocalLake
from recsys_serving.model.recommender import Recommender
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings
from serving_support import new_key, service_settings, wait_for

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Journal:
    """Completed fsyncs and answers, in the order they happened (any thread)."""

    entries: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, value: Any) -> None:
        with self.lock:
            self.entries.append((kind, value))

    def answer_index(self, request_id: str) -> int:
        found = [n for n, (k, v) in enumerate(self.entries) if k == "answer" and v == request_id]
        assert len(found) == 1, f"answer {request_id} journaled {len(found)} times"
        return found[0]

    def durable_before(self, index: int, landing_root: Path) -> dict[str, dict[str, Any]]:
        """The events, by id, in landing files an fsync completed on before entry ``index``."""
        events: dict[str, dict[str, Any]] = {}
        for kind, value in self.entries[:index]:
            path, data = value if kind == "fsync" else (None, b"")
            if path is None or not path.is_relative_to(landing_root):
                continue
            for line in data.split(b"\n")[:-1]:  # only whole lines count
                event = orjson.loads(line)
                events[event["event_id"]] = event
        return events


class JournaledApp:
    """ASGI wrapper that journals each answer's status line when the app sends it
    (before the server writes it to the socket), keyed by the request's id."""

    def __init__(self, app: Any, journal: Journal) -> None:
        self.app = app
        self.journal = journal

    async def __call__(self, scope: Message, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = dict(scope.get("headers") or []).get(b"x-test-request", b"").decode()

        async def journaled(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                request_id = headers.get(b"x-request-id", b"").decode()
                self.journal.add("answer", key or request_id)
            await send(message)

        await self.app(scope, receive, journaled)


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    """Journals every fsync of a regular file; what it held before the fsync began."""
    journal = Journal()
    real_fsync = os.fsync

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        try:
            path = Path(os.readlink(f"/proc/self/fd/{number}"))
        except OSError:
            path = None
        data = path.read_bytes() if path is not None and path.is_file() else None
        real_fsync(fd)
        if path is not None and data is not None:
            journal.add("fsync", (path, data))

    monkeypatch.setattr(os, "fsync", fsync)
    return journal


def _events(tag: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{tag}-{i}",
            "event_type": "click",
            "user_id": f"u{i}",
            "item_id": "i1",
            "ts": time.time() - 30,
        }
        for i in range(n)
    ]


def _assert_events_durable_before_202(
    client: TestClient, journal: Journal, lake_root: Path
) -> None:
    for batch in range(3):  # the first batch opens a segment, later ones append to it
        tag = f"dur-{uuid.uuid4().hex[:8]}"
        r = client.post("/events", json=_events(tag, 5), headers={"x-test-request": tag})
        assert r.status_code == 202 and r.json()["accepted"] == 5, r.text
        durable = journal.durable_before(journal.answer_index(tag), lake_root / "landing")
        for i in range(5):
            assert f"{tag}-{i}" in durable, (
                f"batch {batch}: event {tag}-{i} was answered 202 before an fsync made it durable"
            )


def test_collector_fsyncs_events_before_answering_202(tmp_path: Path, journal: Journal) -> None:
    settings = Settings(home=tmp_path, auth_enabled=False)
    app = create_app(settings, collector_only=True)
    with TestClient(JournaledApp(app, journal)) as client:
        _assert_events_durable_before_202(client, journal, settings.resolved_home / "lake")


def test_service_fsyncs_events_and_impressions_before_answering(
    tmp_path: Path,
    journal: Journal,
    tiny_bundle: Path,
) -> None:
    settings = service_settings(tmp_path / "home")
    assert settings.serving.impression_sync  # the default the README describes
    lake_root = Path(settings.resolved_lake_uri)
    registry = ModelRegistry(LocalLake(lake_root))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    headers = {"X-API-Key": new_key(settings, "recommend,events")}
    model = Recommender.load(tiny_bundle)
    users = [u for u in model.state.user_ids.tolist() if model.knows_user(u)][:3]
    app = create_app(settings, docstore=None)
    with TestClient(JournaledApp(app, journal), headers=headers) as client:
        wait_for(lambda: app.state.manager.state.ready, 30, "model")
        _assert_events_durable_before_202(client, journal, lake_root)
        for user in [*users, "somebody-new"]:
            r = client.get(f"/recommendations/{user}", params={"k": 6})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["items"]) == 6
            durable = journal.durable_before(
                journal.answer_index(body["request_id"]), lake_root / "landing"
            )
            for position, item in enumerate(body["items"]):
                event_id = f"{body['request_id']}-{position}"
                assert event_id in durable, f"impression {event_id} answered before its fsync"
                shown = durable[event_id]
                assert (shown["event_type"], shown["user_id"], shown["item_id"]) == (
                    "impression",
                    user,
                    item["item_id"],
                )


def test_a_failed_fsync_is_never_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer waits for the fsync's outcome: a disk error is a 5xx, not a 202, and
    the client's retry is accepted (the event was not remembered as landed)."""
    settings = Settings(home=tmp_path, auth_enabled=False)
    real_fsync = os.fsync
    failing = threading.Event()

    def fsync(fd: Any) -> None:
        if failing.is_set():
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with TestClient(create_app(settings, collector_only=True), raise_server_exceptions=False) as c:
        failing.set()
        r = c.post("/events", json=_events("eio", 2))
        assert r.status_code >= 500, r.text
        assert r.headers["content-type"].startswith("application/json")
        failing.clear()
        retry = c.post("/events", json=_events("eio", 2))
        assert retry.status_code == 202 and retry.json()["accepted"] == 2, retry.text
