"""API keys: who may call the service, with which scopes and at what rate.

Keys are high-entropy random strings, so a plain SHA-256 of the key is a safe thing
to store (slow hashes exist to protect low-entropy passwords; they would only cost
every request a few milliseconds here). The secret is shown once, at creation, and
never written anywhere.

Two sources are merged:

* the key file ``$RECSYS_HOME/keys.json``, written by ``recsys keys create|revoke``
  (atomic replace under a file lock) and re-read by every worker when it changes, so a
  revocation takes effect without a restart;
* ``RECSYS_API_KEYS`` (``{"<key>": ["recommend", "events"]}``) for deployments that
  inject secrets through the environment.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock

from recsys_serving.logging import get_logger

log = get_logger(__name__)

SCOPES: tuple[str, ...] = ("recommend", "events", "admin")
KEY_PREFIX = "rsk_"
FILE_FORMAT = "recsys-keys/1"
KEY_FILE_NAME = "keys.json"


class KeyStoreError(ValueError):
    """The key file or the environment's keys cannot be used; the message says where."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's public record: everything but the secret."""

    key_id: str
    scopes: frozenset[str]
    rps: float | None = None
    burst: int | None = None
    name: str = ""
    created_at: str = ""
    revoked_at: str | None = None
    source: str = "file"

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "scopes": sorted(self.scopes),
            "rps": self.rps,
            "burst": self.burst,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "source": self.source,
        }


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_scopes(scopes: Iterable[str], where: str) -> frozenset[str]:
    cleaned = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(cleaned - set(SCOPES))
    if unknown:
        raise KeyStoreError(f"{where}: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
    if not cleaned:
        raise KeyStoreError(f"{where}: a key needs at least one scope ({', '.join(SCOPES)})")
    return cleaned


def check_limits(rps: float | None, burst: int | None, where: str) -> None:
    if rps is not None and not (rps > 0 and rps < float("inf")):
        raise KeyStoreError(f"{where}: rps must be a positive number, got {rps!r}")
    if burst is not None and burst < 1:
        raise KeyStoreError(f"{where}: burst must be at least 1, got {burst!r}")


def _record_to_key(record: Any, where: str) -> tuple[str, ApiKey]:
    if not isinstance(record, dict):
        raise KeyStoreError(f"{where}: a key record must be an object")
    try:
        digest = record["sha256"]
        key_id = record["key_id"]
        scopes = check_scopes(record["scopes"], where)
        rps = None if record.get("rps") is None else float(record["rps"])
        burst = None if record.get("burst") is None else int(record["burst"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, KeyStoreError):
            raise
        raise KeyStoreError(f"{where}: malformed key record ({exc!r})") from exc
    if not isinstance(digest, str) or len(digest) != 64:
        raise KeyStoreError(f"{where}: sha256 must be 64 hex characters")
    check_limits(rps, burst, where)
    return digest, ApiKey(
        key_id=str(key_id),
        scopes=scopes,
        rps=rps,
        burst=burst,
        name=str(record.get("name") or ""),
        created_at=str(record.get("created_at") or ""),
        revoked_at=record.get("revoked_at"),
        source="file",
    )


def env_keys(api_keys: Mapping[str, list[str]] | None) -> dict[str, ApiKey]:
    """Keys injected through ``RECSYS_API_KEYS``, by digest (the secrets are not kept)."""
    found: dict[str, ApiKey] = {}
    for n, (secret, scopes) in enumerate((api_keys or {}).items(), 1):
        where = f"RECSYS_API_KEYS entry {n}"
        if not secret or len(secret) < 16:
            raise KeyStoreError(f"{where}: a key must be at least 16 characters")
        if isinstance(scopes, str):
            scopes = scopes.split(",")
        digest = hash_key(secret)
        found[digest] = ApiKey(
            key_id=f"env-{digest[:8]}", scopes=check_scopes(scopes, where), source="env"
        )
    return found


class KeyFile:
    """The key file the CLI manages; every write is an atomic replace under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = FileLock(str(path) + ".lock")

    @classmethod
    def in_home(cls, home: Path) -> KeyFile:
        return cls(home / KEY_FILE_NAME)

    def read(self) -> dict[str, ApiKey]:
        """Keys by digest; a missing file is an empty store."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise KeyStoreError(f"{self.path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            raise KeyStoreError(f"{self.path}: not a recsys key file (format {FILE_FORMAT!r})")
        keys: dict[str, ApiKey] = {}
        for n, record in enumerate(doc.get("keys") or [], 1):
            digest, key = _record_to_key(record, f"{self.path}: key #{n}")
            keys[digest] = key
        return keys

    def _write(self, keys: dict[str, ApiKey]) -> None:
        records = []
        for digest, key in keys.items():
            record = key.as_dict()
            record.pop("source")
            records.append({"sha256": digest, **record})
        data = orjson.dumps({"format": FILE_FORMAT, "keys": records}, option=orjson.OPT_INDENT_2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create(
        self,
        scopes: Iterable[str],
        rps: float | None = None,
        burst: int | None = None,
        name: str = "",
    ) -> tuple[ApiKey, str]:
        """A new key; returns its record and the secret (the only time it exists)."""
        checked = check_scopes(scopes, "scopes")
        check_limits(rps, burst, "limits")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            key_id="k_" + secrets.token_hex(4),
            scopes=checked,
            rps=rps,
            burst=burst,
            name=name,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._lock:
            keys = self.read()
            keys[hash_key(secret)] = key
            self._write(keys)
        return key, secret

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (kept in the file, so `keys list` shows what happened)."""
        with self._lock:
            keys = self.read()
            for digest, key in keys.items():
                if key.key_id == key_id:
                    if key.active:
                        key = replace(
                            key, revoked_at=datetime.now(UTC).isoformat(timespec="seconds")
                        )
                        keys[digest] = key
                        self._write(keys)
                    return key
        raise KeyStoreError(f"{self.path}: no key with id {key_id!r}")

    def list(self) -> list[ApiKey]:
        return sorted(self.read().values(), key=lambda k: (k.created_at, k.key_id))


class KeyRing:
    """What a worker authenticates against: env keys plus the key file, kept fresh.

    The file is re-read when its (inode, size, mtime) changes, checked at most every
    ``check_seconds``; a file that became unreadable keeps the last good keys (an
    operator's typo must not lock every client out) and logs the error.
    """

    def __init__(
        self,
        key_file: KeyFile,
        api_keys: Mapping[str, list[str]] | None = None,
        check_seconds: float = 1.0,
    ) -> None:
        self.key_file = key_file
        self.check_seconds = check_seconds
        self._env = env_keys(api_keys)
        self._file: dict[str, ApiKey] = {}
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self.refresh(force=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.key_file.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_seconds:
            return
        with self._lock:
            self._checked_at = now
            signature = self._stat()
            if signature == self._signature and not force:
                return
            try:
                keys = self.key_file.read()
            except (KeyStoreError, OSError) as exc:
                log.error("keys.file_unreadable", path=str(self.key_file.path), error=str(exc))
                self._signature = signature
                return
            self._file = keys
            self._signature = signature
            log.info("keys.loaded", path=str(self.key_file.path), keys=len(keys))

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The active key for ``secret``, or None (unknown, revoked or missing)."""
        if not secret:
            return None
        self.refresh()
        digest = hash_key(secret)
        # A dict lookup on the digest is not a timing oracle: a caller controls the key,
        # not its SHA-256, so learning how much of a digest matched reveals nothing.
        key = self._env.get(digest) or self._file.get(digest)
        if key is None or not key.active:
            return None
        return key

    def all_keys(self) -> list[ApiKey]:
        return [*self._env.values(), *self._file.values()]
