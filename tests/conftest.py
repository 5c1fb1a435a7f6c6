"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# --- environment ----------------------------------------------------------------------

# Kept from the caller's environment: where embedded state lives (CI sets a fresh one),
# and the real backends the live integration tests run against when they are given.
_KEPT_VARIABLES = {"RECSYS_HOME", "RECSYS_MONGO_URI", "RECSYS_ES_URL"}


@pytest.fixture(autouse=True, scope="session")
def _no_deployment_settings_from_the_caller() -> Iterator[None]:
    """Run every test on the defaults it states, whatever the developer's shell exports.

    ``Settings()`` reads every ``RECSYS_*`` variable a test does not pass: an SMTP host, a
    lake on S3 or a switched-off ranker compiler in a developer's shell would change
    what a test checks, in-process and in every child process the tests start.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            stray = name.startswith("RECSYS_") and name not in _KEPT_VARIABLES
            if stray or name.startswith("DAGSTER_PG_") or name == "PROMETHEUS_MULTIPROC_DIR":
                mp.delenv(name)
        # No MLflow mirror unless a test asks for one
        # (tests/assets/tracking/test_mlflow_mirror.py): its import and SQLite store cost
        # seconds per process the suite starts.
        mp.setenv("RECSYS_MLFLOW_TRACKING_URI", "off")
        yield


# --- alert channel servers (test_notifier.py, test_freshness.py) ---------------------
# Real servers on 127.0.0.1, so the notifier is tested over real SMTP and HTTP.


def _free_localhost_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CapturedMail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: str | None


@dataclass
class AlertSmtpServer:
    host: str
    port: int
    user: str
    password: str
    messages: list[CapturedMail] = field(default_factory=list)


class _MailSink:
    def __init__(self, server: AlertSmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(message, EmailMessage)
        auth = session.auth_data
        login = auth.login.decode() if auth is not None else None
        self.server.messages.append(
            CapturedMail(envelope.mail_from, list(envelope.rcpt_tos), message, login)
        )
        return "250 Message accepted for delivery"


@pytest.fixture
def alert_smtp_server() -> Iterator[AlertSmtpServer]:
    """An aiosmtpd server capturing messages; AUTH (plain/login) optional, no TLS."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    server = AlertSmtpServer("127.0.0.1", _free_localhost_port(), "alerts", "s3cret")

    def authenticate(
        _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == server.user
            and data.password.decode() == server.password
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    controller = Controller(
        _MailSink(server),
        hostname=server.host,
        port=server.port,
        authenticator=authenticate,
        auth_require_tls=False,
        ready_timeout=30,  # start-up on a busy machine; the default is 5 s
    )
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


@dataclass
class AlertWebhookServer:
    url: str
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)


@pytest.fixture
def alert_webhook_server() -> Iterator[AlertWebhookServer]:
    """A stdlib HTTP server recording JSON POST bodies; set ``.status`` to make it fail."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    capture = AlertWebhookServer(url=f"http://127.0.0.1:{httpd.server_address[1]}/hooks/alerts")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            capture.requests.append(json.loads(body))
            capture.content_types.append(self.headers.get("Content-Type", ""))
            reply = b"ok" if capture.status < 300 else b"internal error"
            self.send_response(capture.status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd.RequestHandlerClass = Handler
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield capture
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_localhost_port() -> int:
    """A 127.0.0.1 port nothing listens on: connecting is refused at once."""
    return _free_localhost_port()


# --- end of alert channel servers ----------------------------------------------------


# --- document store (test_docstore.py, test_catalog_assets.py) ------------------------
@pytest.fixture
def mongomock_bulk_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    """mongomock 4.3's bulk builder predates pymongo 4.11's ``sort`` keyword (mongomock
    issue #912); let the pymongo double accept it when unused, as DocStore calls it."""
    import mongomock

    builder = mongomock.collection.BulkOperationBuilder
    original = builder.add_replace

    def add_replace(self: Any, selector: Any, doc: Any, upsert: Any, **kw: Any) -> Any:
        assert kw.pop("sort", None) is None
        return original(self, selector, doc, upsert, **kw)

    monkeypatch.setattr(builder, "add_replace", add_replace)


# --- Dagster hygiene ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_leaked_dagster_instance() -> Iterator[None]:
    """Fail the test that leaves a Dagster instance's state storage current.

    Entering an instance (or a sensor/schedule context built with resources) and never
    leaving it keeps that instance's storage in a context variable; once the instance
    is garbage collected, every later ``Definitions`` build in the process fails with
    "Attempted to resolve undefined DagsterInstance weakref", far from the cause.
    """
    # Private on purpose: the state storage's context variable has no public accessor,
    # and the symptom it guards against shows only after the instance is collected.
    from dagster._core.storage.defs_state.base import DefsStateStorage

    before = DefsStateStorage.get()
    yield
    after = DefsStateStorage.get()
    assert after is before, (
        "this test left a Dagster instance entered: use `with` for instances and for "
        "sensor/schedule contexts built with resources"
    )
