"""A real PostgreSQL server for tests (Debian ``postgresql``), started on 127.0.0.1.

PostgreSQL refuses to run as root, and tests run as root in CI: the cluster then belongs
to the ``postgres`` system user (``runuser``), in a temp directory it owns, with its
Unix socket there too, so nothing touches a system cluster or ``/var/run/postgresql``.

Use it from a test module (the Postgres Dagster instance, the closed loop, the browser
tests)::

    from pg_support import PostgresServer, postgres_db, postgres_server  # noqa: F401

    def test_x(postgres_db: str) -> None:  # a fresh, empty database per test
        ...

Tests are skipped, naming the reason, only when the PostgreSQL binaries are missing;
``.ci/run`` installs them so CI never skips.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

PG_USER = "recsys"
PG_PASSWORD = "pg-test-secret"  # reaches the server over TCP with scram-sha-256 auth
SYSTEM_USER = "postgres"


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server binaries (``/usr/lib/postgresql/<v>/bin``)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        initdb = shutil.which("initdb")
        return Path(initdb).parent if initdb else None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    socket_dir: Path
    data_dir: Path
    bindir: Path
    run_as: str | None

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://user:password@127.0.0.1:port/dbname`` (password-authenticated)."""
        return (
            f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{dbname}"
        )

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; returns unaligned output."""
        result = _run(
            [
                str(self.bindir / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SYSTEM_USER,
                "-d",
                dbname,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            self.run_as,
        )
        return result.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by the test role; returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(cmd: list[str], run_as: str | None) -> subprocess.CompletedProcess[str]:
    argv = ["runuser", "-u", run_as, "--", *cmd] if run_as else cmd
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL cluster for the session (about 2 s to start)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`)")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to own the cluster")
        run_as = SYSTEM_USER
    root = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if run_as:
        for path in (root, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
    pwfile = root / "superuser.pw"
    pwfile.write_text(uuid.uuid4().hex + "\n")
    if run_as:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    # Local (socket) connections trust the OS user; TCP always needs a password, like
    # a real server, so the URL's credentials are exercised.
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            SYSTEM_USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ],
        run_as,
    )
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    _run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        run_as,
    )
    server = PostgresServer(
        host="127.0.0.1",
        port=port,
        user=PG_USER,
        password=PG_PASSWORD,
        socket_dir=sockets,
        data_dir=data,
        bindir=bindir,
        run_as=run_as,
    )
    try:
        server.psql(f"CREATE ROLE \"{PG_USER}\" LOGIN PASSWORD '{PG_PASSWORD}'")
        yield server
    finally:
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], run_as)
        finally:
            # Give the postmaster a moment to remove its socket before the directory goes.
            time.sleep(0.1)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh database on the session server, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
