"""A real OCI registry for tests: Debian's ``docker-registry`` (the CNCF distribution
registry) on 127.0.0.1 with filesystem storage in a temp dir.

Use the fixtures ``oci_registry`` (anonymous) and ``oci_registry_basic`` (htpasswd
Basic auth) by importing them into a test module (``from oci_support import
oci_registry``), or :func:`running_registry` directly. ``.ci/run`` installs the
``docker-registry`` package where it is missing.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml

from support import free_port

REGISTRY_BINARY = "docker-registry"


@dataclass(frozen=True)
class OciRegistryServer:
    host: str  # 127.0.0.1:<port>
    storage: Path  # filesystem driver root
    username: str | None = None
    password: str | None = None

    def repository(self, name: str = "recsys/model") -> str:
        return f"{self.host}/{name}"

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (tests tamper with it)."""
        hexa = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def auth(self) -> tuple[str, str] | None:
        if self.username and self.password:
            return (self.username, self.password)
        return None


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (the only scheme distribution accepts), via libxcrypt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib until 3.13; the project supports 3.11 and 3.12

    # Cost 4: the registry checks the hash on every request; tests need no brute-force margin.
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        pytest.fail("the system crypt() cannot make bcrypt hashes for the registry htpasswd")
    return hashed


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """The token service of a Bearer-auth registry (Docker Hub, GHCR and Harbor work this
    way): checks Basic credentials and returns a JWT, signed with a self-signed key the
    registry trusts, granting the scopes asked for. Records every scope it granted."""

    username: str
    password: str
    service: str = "recsys-test-registry"
    issuer: str = "recsys-test-issuer"
    granted: list[str] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def granted_actions(self, repository: str) -> list[frozenset[str]]:
        """The action sets granted on one repository, in grant order. Sets, because the
        registry's challenge lists actions in no fixed order ("pull,push" or "push,pull")."""
        grants = []
        for scope in self.granted:
            kind, name, actions = scope.split(":")
            if kind == "repository" and name == repository:
                grants.append(frozenset(actions.split(",")))
        return grants

    def token(self, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": self.username,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


@contextmanager
def running_token_issuer(username: str, password: str) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer(username, password)
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            if self.headers.get("Authorization") != expected:
                self._reply(401, {"details": "bad credentials"})
                return
            scopes = query.get("scope", [])
            issuer.granted.extend(scopes)
            token = issuer.token(scopes)
            self._reply(200, {"token": token, "access_token": token, "expires_in": 300})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    issuer.url = f"http://127.0.0.1:{httpd.server_address[1]}/token"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def registry_binary() -> str:
    exe = shutil.which(REGISTRY_BINARY)
    if exe is None:
        pytest.fail(
            f"{REGISTRY_BINARY} is not installed (apt-get install -y docker-registry; "
            ".ci/run does it)"
        )
    return exe


@contextmanager
def running_registry(
    workdir: Path,
    *,
    username: str | None = None,
    password: str | None = None,
    token_issuer: TokenIssuer | None = None,
) -> Iterator[OciRegistryServer]:
    """Start ``docker-registry serve`` on a free loopback port; stop it on exit.

    ``username``/``password``: htpasswd Basic auth. ``token_issuer``: Bearer token auth.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if username and password:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{username}:{bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "recsys-test", "path": str(htpasswd)}}
    if token_issuer is not None:
        bundle = workdir / "token-issuer.pem"
        bundle.write_bytes(token_issuer.cert_pem)
        config["auth"] = {
            "token": {
                "realm": token_issuer.url,
                "service": token_issuer.service,
                "issuer": token_issuer.issuer,
                "rootcertbundle": str(bundle),
            }
        }
        username, password = token_issuer.username, token_issuer.password
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [registry_binary(), "serve", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin"},  # no REGISTRY_* overrides from the caller
        )
    server = OciRegistryServer(f"127.0.0.1:{port}", storage, username, password)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status = requests.get(server.url("/v2/"), timeout=1).status_code
                if status in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def oci_registry(tmp_path: Path) -> Iterator[OciRegistryServer]:
    """An anonymous registry over plain HTTP (use ``insecure=True``)."""
    with running_registry(tmp_path / "oci-registry") as server:
        yield server


@pytest.fixture
def oci_registry_basic(tmp_path: Path) -> Iterator[OciRegistryServer]:
    """A registry that requires HTTP Basic auth (htpasswd, bcrypt) over plain HTTP."""
    with running_registry(
        tmp_path / "oci-registry-basic", username="recsys", password="s3cret-pw"
    ) as server:
        yield server


# Headers that describe one hop, not the message: never copied by the ECR front.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@contextmanager
def running_ecr_front(upstream: OciRegistryServer, ecr_host: str) -> Iterator[str]:
    """A registry that authenticates like Amazon ECR, on 127.0.0.1: requests pass through
    to ``upstream`` (htpasswd Basic auth holding the GetAuthorizationToken password), and
    its 401 challenge is rewritten to ECR's ``Basic realm="https://<ecr_host>/",
    service="ecr.amazonaws.com"``, the form oras' ECR backend answers. Yields host:port."""
    session = requests.Session()
    challenge = f'Basic realm="https://{ecr_host}/",service="ecr.amazonaws.com"'

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            # Host passes through, so the registry's Location headers point back here.
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            reply = session.request(
                self.command,
                upstream.url(self.path),
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=30,
            )
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                skip = _HOP_BY_HOP | {"www-authenticate", "content-length"}
                if key.lower() not in skip:
                    self.send_header(key, value)
            if reply.status_code == 401:
                self.send_header("Www-Authenticate", challenge)
            if self.command == "HEAD":
                self.send_header("Content-Length", reply.headers.get("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(reply.content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.content)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        session.close()
