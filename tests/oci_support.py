"""A real OCI registry for tests: Debian's ``docker-registry`` (the CNCF distribution
registry) on 127.0.0.1 with filesystem storage in a temp dir.

Use the fixtures ``oci_registry`` (anonymous) and ``oci_registry_basic`` (htpasswd
Basic auth) by importing them into a test module (``from oci_support import
oci_registry``), or :func:`running_registry` directly. ``.ci/run`` installs the
``docker-registry`` package where it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
    workdir: Path, *, username: str | None = None, password: str | None = None
) -> Iterator[OciRegistryServer]:
    """Start ``docker-registry serve`` on a free loopback port; stop it on exit."""
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
