"""The model registry: versioned bundles and the aliases that say which one serves.

It lives in the lake (local directory or S3), so every process that can read the lake
(Dagster runs, serving workers on other machines, the CLI) sees the same registry with no
extra service. Layout::

    registry/models/<version>/<files>      the bundle's files, uploaded first
    registry/models/<version>/manifest.json uploaded LAST: without it the version does
                                            not exist for any reader
    registry/registrations/<version>.json  tags and registration time (before the manifest)
    registry/aliases/<alias>.json          one object per alias, replaced in one write
    registry/history/<ts>-<alias>-<n>.json one immutable record per alias move

Every move to a version first verifies that version's files against its manifest's
checksums (``verify``): a damaged bundle is refused with :class:`InvalidBundle` and no
alias moves, whoever asks (the CLI, the admin API, the promotion sensor).

Alias moves are single-object writes (local: write + fsync + rename; S3: one PUT), so a
serving worker polling ``alias()`` sees the old record or the new one, never a torn one.
Compare-and-set (``expected=``) is a file lock on a local lake and a conditional PUT
(``If-Match`` / ``If-None-Match``) on S3; on an S3-compatible store that ignores those
headers the registry assumes a single writer (the closed loop runs one move at a time).

``decide_promotion`` is THE promotion rule: the evaluation asset, the closed loop and the
CLI all call it, so "better model" means one thing everywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from filelock import Timeout as LockTimeout

from recsys_serving.lake import Lake, S3Lake, fsync_path
from recsys_serving.layout import CANDIDATE, PRODUCTION, REGISTRY_PREFIX, parse_utc
from recsys_serving.logging import get_logger
from recsys_serving.model.bundle import (
    MANIFEST,
    BundleError,
    is_version,
    parse_manifest,
    to_jsonable,
    verify_bundle,
)
from recsys_serving.policies import PromotionRule

log = get_logger(__name__)

PREFIX = REGISTRY_PREFIX
MODELS = f"{PREFIX}/models"
REGISTRATIONS = f"{PREFIX}/registrations"
ALIASES = f"{PREFIX}/aliases"
HISTORY = f"{PREFIX}/history"
RELOAD = f"{PREFIX}/reload.json"  # a forced reload, asked of every serving worker
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_PREVIOUS = 20  # rollback depth kept in an alias record
LOCK_TIMEOUT_SECONDS = 30.0


class RegistryError(Exception):
    """A registry operation was refused; the message says why in one line."""


class UnknownVersion(RegistryError):
    """The version is not registered (or its upload never completed)."""


class AliasConflict(RegistryError):
    """Compare-and-set failed: the alias moved since the caller looked at it."""


class NothingToRollBack(RegistryError):
    """Rollback asked for, but there is no candidate and no previous production model."""


class InvalidBundle(RegistryError):
    """The version's bundle in the registry fails verification: no alias may point at it."""


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""Default of ``expected=``: move the alias whatever it points to now."""


def _now() -> datetime:
    return datetime.now(UTC)


def _dumps(value: Any) -> bytes:
    return (
        json.dumps(to_jsonable(value), indent=2, sort_keys=True, allow_nan=False) + "\n"
    ).encode()


def _check_alias(name: str) -> None:
    if not ALIAS_NAME.match(name):
        raise RegistryError(f"invalid alias name {name!r} (lowercase letters, digits, - and _)")


def _check_version(version: str) -> None:
    if not isinstance(version, str) or not is_version(version):
        raise UnknownVersion(
            f"{version!r} is not a model version (expected v<YYYYmmddHHMMSS>-<8 hex>)"
        )


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered bundle as readers see it."""

    version: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime | None
    registered_at: datetime | None
    tags: dict[str, str]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


@dataclass(frozen=True, slots=True)
class AliasState:
    """Where an alias points now; ``share`` is the fraction of users it serves."""

    alias: str
    version: str
    share: float
    updated_at: datetime
    reason: str
    previous: str | None
    evidence: dict[str, Any]
    previous_versions: tuple[str, ...] = ()
    seq: int = 0


@dataclass(frozen=True, slots=True)
class AliasEvent:
    """One immutable audit record of an alias move (``version`` is None for a clear)."""

    key: str
    at: datetime
    alias: str
    action: Literal["set", "clear"]
    version: str | None
    previous: str | None
    share: float | None
    reason: str
    evidence: dict[str, Any]
    seq: int

    def as_dict(self) -> dict[str, Any]:
        """The move as `recsys models history --json` prints it."""
        return {
            "at": self.at.isoformat(),
            "alias": self.alias,
            "action": self.action,
            "version": self.version,
            "previous": self.previous,
            "share": self.share,
            "reason": self.reason,
            "evidence": self.evidence,
        }


# --- object transfer: stream files instead of holding bundles in memory -------------


def _s3_location(lake: S3Lake, key: str) -> tuple[str, str]:
    bucket, _, full = lake.uri_for(key).removeprefix("s3://").partition("/")
    return bucket, full


def _put_file(lake: Lake, key: str, source: Path) -> None:
    """Upload one file so that the object appears whole or not at all."""
    local = lake.local_path(key)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(source, tmp)
            fsync_path(tmp)
            os.replace(tmp, local)
            fsync_path(local.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    elif isinstance(lake, S3Lake):
        bucket, full = _s3_location(lake, key)
        lake.client.upload_file(str(source), bucket, full)  # multipart for large files
    else:
        lake.put_bytes(key, source.read_bytes())


def _get_file(lake: Lake, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = lake.local_path(key)
    if local is not None:
        try:
            shutil.copyfile(local, dest)
        except FileNotFoundError as exc:
            raise BundleError(f"{lake.uri_for(key)}: missing from the registry") from exc
    elif isinstance(lake, S3Lake):
        from botocore.exceptions import ClientError

        bucket, full = _s3_location(lake, key)
        try:
            lake.client.download_file(bucket, full, str(dest))
        except ClientError as exc:
            raise BundleError(f"{lake.uri_for(key)}: cannot download ({exc})") from exc
    else:
        dest.write_bytes(lake.get_bytes(key))


# --- alias objects: one atomic write each, optional compare-and-set -----------------


class _AliasObjects:
    """Reads and conditionally replaces alias objects; the one place that knows how
    compare-and-set works on each kind of lake."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        lock_path = lake.local_path(f"{PREFIX}/.aliases.lock")
        self._lock: FileLock | None = None
        if lock_path is not None:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(lock_path, timeout=LOCK_TIMEOUT_SECONDS)

    def locked(self) -> AbstractContextManager[Any]:
        return self._lock if self._lock is not None else nullcontext()

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        """(object bytes or None, a token for ``write``); exactly one object read."""
        if isinstance(self.lake, S3Lake):
            from botocore.exceptions import ClientError

            bucket, full = _s3_location(self.lake, key)
            try:
                response = self.lake.client.get_object(Bucket=bucket, Key=full)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None, None
                raise
            return response["Body"].read(), response.get("ETag")
        local = self.lake.local_path(key)
        if local is not None:
            try:
                return local.read_bytes(), None
            except FileNotFoundError:
                return None, None
        return (self.lake.get_bytes(key) if self.lake.exists(key) else None), None

    def write(self, key: str, data: bytes, token: str | None, existed: bool) -> None:
        if not isinstance(self.lake, S3Lake):
            self.lake.put_bytes(key, data)  # under the file lock (local) or single writer
            return
        from botocore.exceptions import ClientError

        bucket, full = _s3_location(self.lake, key)
        condition = {"IfMatch": token} if existed and token else {"IfNoneMatch": "*"}
        try:
            self.lake.client.put_object(Bucket=bucket, Key=full, Body=data, **condition)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {
                409,
                412,
            }:
                raise AliasConflict(
                    f"alias object {key} changed while it was being moved; retry"
                ) from exc
            raise


def _alias_from_record(name: str, record: Mapping[str, Any]) -> AliasState | None:
    version = record.get("version")
    if not version:
        return None  # cleared
    return AliasState(
        alias=name,
        version=str(version),
        share=float(record.get("share", 1.0)),
        updated_at=parse_utc(record.get("updated_at")) or datetime.fromtimestamp(0, UTC),
        reason=str(record.get("reason", "")),
        previous=record.get("previous"),
        evidence=dict(record.get("evidence") or {}),
        previous_versions=tuple(record.get("previous_versions") or ()),
        seq=int(record.get("seq", 0)),
    )


def _event_from_record(key: str, record: Mapping[str, Any]) -> AliasEvent:
    share = record.get("share")
    return AliasEvent(
        key=key,
        at=parse_utc(record.get("at")) or datetime.fromtimestamp(0, UTC),
        alias=str(record.get("alias", "")),
        action="clear" if record.get("action") == "clear" else "set",
        version=record.get("version"),
        previous=record.get("previous"),
        share=float(share) if share is not None else None,
        reason=str(record.get("reason", "")),
        evidence=dict(record.get("evidence") or {}),
        seq=int(record.get("seq", 0)),
    )


def _history_alias(key: str) -> str:
    """The alias of a ``<ts>-<alias>-<n>.json`` history key (aliases may contain '-')."""
    return key.rsplit("/", 1)[-1].removesuffix(".json").split("-", 1)[-1].rsplit("-", 1)[0]


# A move computes (new version or None to clear, share, previous_versions) from the
# current record, under the lock, so read-decide-write is one step.
_Plan = Callable[[dict[str, Any] | None], tuple[str | None, float | None, list[str]]]


class ModelRegistry:
    """Registered model versions and their aliases in a lake."""

    def __init__(self, lake: Lake, *, clock: Callable[[], datetime] = _now) -> None:
        self.lake = lake
        self.clock = clock
        self._aliases = _AliasObjects(lake)

    # --- versions ------------------------------------------------------------------

    @staticmethod
    def model_key(version: str, name: str = MANIFEST) -> str:
        return f"{MODELS}/{version}/{name}"

    def uri(self, version: str) -> str:
        return self.lake.uri_for(f"{MODELS}/{version}")

    def exists(self, version: str) -> bool:
        return is_version(version) and self.lake.exists(self.model_key(version))

    def register(
        self,
        bundle_dir: str | Path,
        *,
        tags: Mapping[str, str] | None = None,
        on_file: Callable[[str, int], None] | None = None,
    ) -> ModelVersion:
        """Verify a bundle and upload it; the manifest goes last, so a crash at any point
        leaves no visible version and never touches an alias. Registering the same
        version again (same files) returns the registered one; re-running after a crash
        overwrites the partial upload."""
        bundle = Path(bundle_dir)
        manifest = verify_bundle(bundle)
        version = manifest["version"]
        clean_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if self.exists(version):
            existing = self.get(version)
            if existing.files != manifest["files"]:
                raise RegistryError(
                    f"version {version} is already registered with different files; "
                    "a bundle version must be unique"
                )
            log.info("registry.register.exists", version=version)
            return existing
        for name in sorted(manifest["files"]):
            _put_file(self.lake, self.model_key(version, name), bundle / name)
            if on_file is not None:
                on_file(name, int(manifest["files"][name]["size"]))
        registration = {
            "version": version,
            "registered_at": self.clock().isoformat(),
            "tags": clean_tags,
            "source": str(bundle.resolve()),
        }
        self.lake.put_bytes(f"{REGISTRATIONS}/{version}.json", _dumps(registration))
        _put_file(self.lake, self.model_key(version), bundle / MANIFEST)  # commit point
        log.info(
            "registry.register",
            version=version,
            files=len(manifest["files"]),
            bytes=sum(int(f["size"]) for f in manifest["files"].values()),
            lake=self.lake.uri,
        )
        return self.get(version)

    def _manifest_bytes(self, version: str) -> bytes:
        _check_version(version)
        key = self.model_key(version)
        try:
            return self.lake.get_bytes(key)
        except FileNotFoundError as exc:
            raise UnknownVersion(f"model version {version} is not registered") from exc
        except Exception as exc:
            if not self.lake.exists(key):
                raise UnknownVersion(f"model version {version} is not registered") from exc
            raise

    def get(self, version: str) -> ModelVersion:
        where = self.lake.uri_for(self.model_key(version))
        manifest = parse_manifest(self._manifest_bytes(version), where)
        if manifest["version"] != version:
            raise BundleError(f"{where}: manifest says version {manifest['version']}")
        registration: dict[str, Any] = {}
        reg_key = f"{REGISTRATIONS}/{version}.json"
        if self.lake.exists(reg_key):
            registration = json.loads(self.lake.get_bytes(reg_key))
        metrics = manifest.get("metrics")
        return ModelVersion(
            version=version,
            manifest=manifest,
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            created_at=parse_utc(manifest.get("created_at")),
            registered_at=parse_utc(registration.get("registered_at")),
            tags=dict(registration.get("tags") or {}),
        )

    def version_ids(self) -> list[str]:
        """Sorted versions whose upload completed (one listing, no object reads)."""
        found: set[str] = set()
        for obj in self.lake.list(f"{MODELS}/"):
            parts = obj.key[len(MODELS) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and is_version(parts[0]):
                found.add(parts[0])
        return sorted(found)

    def versions(self) -> list[ModelVersion]:
        return [self.get(v) for v in self.version_ids()]

    def fetch(self, version: str, dest_root: str | Path) -> Path:
        """Download ``version`` into ``dest_root/<version>`` and verify it.

        Idempotent (an existing verified copy is returned; a corrupt one is replaced)
        and safe when several processes fetch at once: a file lock per version
        serializes them and the copy is built in a temp dir renamed into place.
        """
        _check_version(version)
        root = Path(dest_root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        dest = root / version
        with FileLock(root / f".{version}.lock"):
            if dest.exists():
                try:
                    verify_bundle(dest)
                    return dest
                except BundleError as exc:
                    log.warning("registry.fetch.corrupt_copy", version=version, error=str(exc))
                    trash = root / f".{version}.{uuid.uuid4().hex[:8]}.corrupt"
                    os.rename(dest, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            manifest_bytes = self._manifest_bytes(version)
            manifest = parse_manifest(manifest_bytes, self.lake.uri_for(self.model_key(version)))
            tmp = root / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir()
            try:
                for name in sorted(manifest["files"]):
                    _get_file(self.lake, self.model_key(version, name), tmp / name)
                (tmp / MANIFEST).write_bytes(manifest_bytes)
                if verify_bundle(tmp)["version"] != version:
                    raise BundleError(
                        f"{self.lake.uri_for(self.model_key(version))}: "
                        f"manifest says version {manifest['version']}"
                    )
                for dirpath, _dirs, files in os.walk(tmp):
                    for f in files:
                        fsync_path(Path(dirpath) / f)
                    fsync_path(Path(dirpath))
                os.rename(tmp, dest)
                fsync_path(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("registry.fetch", version=version, dest=str(dest))
        return dest

    def verify(self, version: str) -> dict[str, Any]:
        """Check every file of ``version`` in the registry against its manifest's checksums
        (in place on a local lake, through a temporary download on S3); the manifest.

        Raises :class:`InvalidBundle` naming the damaged file: every alias move calls this
        first, so a corrupt bundle can never become what a restarting server must load.
        """
        _check_version(version)
        where = self.lake.uri_for(f"{MODELS}/{version}")
        try:
            local = self.lake.local_path(f"{MODELS}/{version}")
            if local is not None:
                manifest = verify_bundle(local)
            else:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="recsys-verify-") as tmp:
                    manifest = verify_bundle(self.fetch(version, tmp))
        except BundleError as exc:
            raise InvalidBundle(
                f"model version {version} fails verification ({exc}); "
                "no alias was moved: register a good copy of it first"
            ) from exc
        if manifest.get("version") != version:
            raise InvalidBundle(f"{where}: manifest says version {manifest.get('version')}")
        return manifest

    # --- forced reloads ------------------------------------------------------------

    def request_reload(self, reason: str) -> str:
        """Ask every serving worker that follows this registry to retry the versions it
        refused, at its next poll (the channel they already poll for alias moves)."""
        token = uuid.uuid4().hex
        record = {"token": token, "at": self.clock().isoformat(), "reason": reason}
        self.lake.put_bytes(RELOAD, _dumps(record))
        log.info("registry.reload_requested", token=token, reason=reason)
        return token

    def reload_token(self) -> str | None:
        """The last forced reload asked for (None if never): one small object read."""
        try:
            raw = self.lake.get_bytes(RELOAD)
        except FileNotFoundError:
            return None
        try:
            return str(json.loads(raw).get("token")) or None
        except (json.JSONDecodeError, AttributeError):
            return None

    # --- aliases -------------------------------------------------------------------

    @staticmethod
    def alias_key(name: str) -> str:
        return f"{ALIASES}/{name}.json"

    def _read_record(self, name: str) -> tuple[dict[str, Any] | None, str | None, bool]:
        raw, token = self._aliases.read(self.alias_key(name))
        if raw is None:
            return None, None, False
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.lake.uri_for(self.alias_key(name))}: {exc}") from exc
        return record, token, True

    def alias(self, name: str) -> AliasState | None:
        """Where ``name`` points now (None if unset or cleared): one small object read."""
        _check_alias(name)
        record, _token, _ = self._read_record(name)
        return _alias_from_record(name, record) if record else None

    def aliases(self) -> dict[str, AliasState]:
        found: dict[str, AliasState] = {}
        for obj in self.lake.list(f"{ALIASES}/"):
            name = obj.key.rsplit("/", 1)[-1].removesuffix(".json")
            if ALIAS_NAME.match(name) and (state := self.alias(name)) is not None:
                found[name] = state
        return dict(sorted(found.items()))

    def _move(
        self,
        name: str,
        plan: _Plan,
        *,
        reason: str,
        evidence: Mapping[str, Any] | None,
        expected: Any,
    ) -> AliasEvent:
        _check_alias(name)
        if not reason or not reason.strip():
            raise RegistryError("an alias move needs a reason")
        try:
            with self._aliases.locked():
                return self._move_locked(name, plan, reason, evidence, expected)
        except LockTimeout as exc:
            raise RegistryError(
                f"another process has held the registry alias lock for over "
                f"{LOCK_TIMEOUT_SECONDS:.0f}s ({exc.lock_file}); retry"
            ) from exc

    def _move_locked(
        self,
        name: str,
        plan: _Plan,
        reason: str,
        evidence: Mapping[str, Any] | None,
        expected: Any,
    ) -> AliasEvent:
        current, token, existed = self._read_record(name)
        current_version = current.get("version") if current else None
        if expected is not ANY and expected != current_version:
            raise AliasConflict(
                f"alias {name!r} points to {current_version or 'nothing'}, "
                f"expected {expected or 'nothing'}"
            )
        version, share, stack = plan(current)
        at = self.clock()
        seq = int(current.get("seq", 0)) + 1 if current else 1
        record = {
            "alias": name,
            "version": version,
            "share": share,
            "updated_at": at.isoformat(),
            "reason": reason.strip(),
            "previous": current_version,
            "previous_versions": stack[:MAX_PREVIOUS],
            "evidence": dict(evidence or {}),
            "seq": seq,
        }
        self._aliases.write(self.alias_key(name), _dumps(record), token, existed)
        event = {
            "at": at.isoformat(),
            "alias": name,
            "action": "set" if version else "clear",
            "version": version,
            "previous": current_version,
            "share": share,
            "reason": record["reason"],
            "evidence": record["evidence"],
            "seq": seq,
        }
        key = f"{HISTORY}/{at.astimezone(UTC):%Y%m%dT%H%M%S%fZ}-{name}-{seq:06d}.json"
        self.lake.put_bytes(key, _dumps(event))
        log.info(
            "registry.alias",
            alias=name,
            version=version,
            previous=current_version,
            share=share,
            reason=record["reason"],
        )
        return _event_from_record(key, json.loads(_dumps(event)))

    def set_alias(
        self,
        name: str,
        version: str,
        *,
        reason: str,
        share: float | None = None,
        evidence: Mapping[str, Any] | None = None,
        expected: Any = ANY,
    ) -> AliasEvent:
        """Point ``name`` at ``version`` in one atomic write and record it in history.

        ``share`` is 1.0 for production (and the default for other aliases is refused:
        a phased-in alias must say how many users it gets). ``expected`` (a version, or
        None for "unset") makes the move a compare-and-set: ``AliasConflict`` if the
        alias points elsewhere.
        """
        _check_alias(name)
        if share is None:
            if name != PRODUCTION:
                raise RegistryError(f"alias {name!r} needs a share in (0, 1]")
            share = 1.0
        if not (0.0 < float(share) <= 1.0) or math.isnan(float(share)):
            raise RegistryError(f"share must be in (0, 1], got {share}")
        if name == PRODUCTION and float(share) != 1.0:
            raise RegistryError("production always serves share 1.0; use the candidate alias")
        if not self.exists(version):
            raise UnknownVersion(f"model version {version} is not registered")
        self.verify(version)

        def plan(current: dict[str, Any] | None) -> tuple[str | None, float | None, list[str]]:
            stack = list(current.get("previous_versions") or []) if current else []
            old = current.get("version") if current else None
            if old and old != version:
                stack = [old, *stack]
            return version, float(share), stack

        return self._move(name, plan, reason=reason, evidence=evidence, expected=expected)

    def clear_alias(
        self,
        name: str,
        *,
        reason: str,
        evidence: Mapping[str, Any] | None = None,
        expected: Any = ANY,
    ) -> AliasEvent:
        """Unset ``name`` (readers then get None); the record keeps what it pointed to."""

        def plan(current: dict[str, Any] | None) -> tuple[str | None, float | None, list[str]]:
            if not current or not current.get("version"):
                raise NothingToRollBack(f"alias {name!r} is not set")
            stack = list(current.get("previous_versions") or [])
            return None, None, [current["version"], *stack]

        return self._move(name, plan, reason=reason, evidence=evidence, expected=expected)

    def promote(
        self, version: str, *, reason: str, evidence: Mapping[str, Any] | None = None
    ) -> AliasEvent:
        """production <- ``version``; a candidate pointing at it is cleared (phase-in done)."""
        event = self.set_alias(PRODUCTION, version, reason=reason, evidence=evidence)
        candidate = self.alias(CANDIDATE)
        if candidate is not None and candidate.version == version:
            # If someone moved the candidate meanwhile, leave their decision alone.
            with suppress(AliasConflict, NothingToRollBack):
                self.clear_alias(
                    CANDIDATE,
                    reason=f"promoted to production: {reason}",
                    evidence=evidence,
                    expected=version,
                )
        return event

    def rollback(
        self,
        *,
        reason: str,
        alias: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> AliasEvent:
        """Undo the last step: stop a candidate's phase-in if one is running (or if
        ``alias="candidate"``), else move production back to its previous version."""
        if alias is None:
            alias = CANDIDATE if self.alias(CANDIDATE) is not None else PRODUCTION
        _check_alias(alias)
        if alias != PRODUCTION:
            if self.alias(alias) is None:
                raise NothingToRollBack(f"nothing to roll back: alias {alias!r} is not set")
            return self.clear_alias(alias, reason=reason, evidence=evidence)

        def plan(current: dict[str, Any] | None) -> tuple[str | None, float | None, list[str]]:
            stack = list(current.get("previous_versions") or []) if current else []
            now = current.get("version") if current else None
            while stack and stack[0] == now:
                stack.pop(0)
            if not stack:
                raise NothingToRollBack("nothing to roll back: production has no previous version")
            target, rest = stack[0], stack[1:]
            if not self.exists(target):
                raise NothingToRollBack(
                    f"cannot roll back: previous production version {target} is not registered"
                )
            self.verify(target)
            return target, 1.0, rest

        return self._move(PRODUCTION, plan, reason=reason, evidence=evidence, expected=ANY)

    def history(self, limit: int = 100, *, alias: str | None = None) -> list[AliasEvent]:
        """Alias moves, newest first."""
        keys = sorted((o.key for o in self.lake.list(f"{HISTORY}/")), reverse=True)
        events: list[AliasEvent] = []
        for key in keys:
            if len(events) >= limit:
                break
            if alias is not None and _history_alias(key) != alias:
                continue
            events.append(_event_from_record(key, json.loads(self.lake.get_bytes(key))))
        return events


# --- the promotion rule --------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class PromotionDecision:
    promote: bool
    reason: str
    evidence: dict[str, Any]


def _relative_change(new: float, old: float) -> float:
    if old == 0:
        return 0.0 if new == old else math.copysign(math.inf, new - old)
    return (new - old) / abs(old)


def decide_promotion(
    challenger_metrics: Mapping[str, Any],
    production_metrics: Mapping[str, Any] | None,
    rule: PromotionRule,
) -> PromotionDecision:
    """Promote the challenger iff it beats production on ``rule.metric`` by at least
    ``rule.min_lift`` (relative) and no guardrail metric drops by more than its
    tolerance. With no production model the first valid challenger is promoted. A
    missing or non-finite metric never promotes: the reason names it."""
    evidence: dict[str, Any] = {
        "metric": rule.metric,
        "min_lift": rule.min_lift,
        "challenger": _finite(challenger_metrics.get(rule.metric)),
        "production": None,
        "lift": None,
        "guardrails": {},
    }
    challenger = evidence["challenger"]
    if challenger is None:
        return PromotionDecision(
            False,
            f"challenger has no finite {rule.metric} (got {challenger_metrics.get(rule.metric)!r})",
            evidence,
        )
    if production_metrics is None:
        return PromotionDecision(
            True, f"first model: no production model ({rule.metric}={challenger:.4g})", evidence
        )
    production = _finite(production_metrics.get(rule.metric))
    evidence["production"] = production
    if production is None:
        return PromotionDecision(
            False,
            f"production has no finite {rule.metric} "
            f"(got {production_metrics.get(rule.metric)!r}); cannot compare",
            evidence,
        )
    lift = _relative_change(challenger, production)
    evidence["lift"] = lift if math.isfinite(lift) else None
    problems: list[str] = []
    for name, tolerance in sorted(rule.guardrails.items()):
        c = _finite(challenger_metrics.get(name))
        p = _finite(production_metrics.get(name))
        entry: dict[str, Any] = {"challenger": c, "production": p, "max_drop": tolerance}
        evidence["guardrails"][name] = entry
        if c is None or p is None:
            entry["ok"] = False
            side = "challenger" if c is None else "production"
            problems.append(f"guardrail {name} missing or not finite for the {side}")
            continue
        drop = -_relative_change(c, p)
        entry["drop"] = drop if math.isfinite(drop) else None
        entry["ok"] = drop <= tolerance
        if not entry["ok"]:
            problems.append(f"guardrail {name} dropped {drop:.1%} (tolerance {tolerance:.1%})")
    if problems:
        return PromotionDecision(False, "; ".join(problems), evidence)
    summary = f"{rule.metric} {challenger:.4g} vs production {production:.4g}"
    if challenger > production and lift >= rule.min_lift:
        lift_text = f"{lift:+.1%}" if math.isfinite(lift) else "from 0"
        return PromotionDecision(
            True, f"{summary} ({lift_text}, needs {rule.min_lift:+.1%})", evidence
        )
    return PromotionDecision(
        False,
        f"{summary} ({lift:+.1%}) does not beat production by {rule.min_lift:.1%}",
        evidence,
    )


# --- the first-model rule -------------------------------------------------------------
# While production has no model that beat popularity, its alias record says so in its
# evidence (``answers: popularity``): serving then answers with the model's popular
# items (``served_by: fallback``, reason ``below_popularity``) instead of its ranking.
ANSWERS = "answers"
POPULARITY_ANSWERS = "popularity"


def serves_popularity(state: AliasState | None) -> bool:
    """True when this alias's model is registered but must answer with popularity."""
    return state is not None and state.evidence.get(ANSWERS) == POPULARITY_ANSWERS


@dataclass(frozen=True, slots=True)
class FirstModelDecision:
    """``serve``: the model's own answers go out; otherwise popularity does, with
    ``warning`` saying why."""

    serve: bool
    reason: str
    warning: str | None
    evidence: dict[str, Any]


def decide_first_model(
    comparisons: Mapping[str, Mapping[str, Any] | None],
    rule: PromotionRule,
    impressions: int = 0,
) -> FirstModelDecision:
    """May a model serve its own answers when none has beaten popularity yet?

    ``comparisons`` maps a holdout name (``holdout``, ``per_user``) to the paired
    comparison of the challenger with popularity on its users (``users``, mean NDCG of
    ``challenger`` and ``popularity``, mean per-user ``difference`` and its
    ``stderr``). Only holdouts with at least ``rule.first_model_min_users`` users judge.
    The model serves when no judging holdout finds it clearly below popularity (the
    difference's one-sided upper bound at ``rule.first_model_z`` is below 0) and at least
    one finds it above. A tiny holdout (23 users) cannot block a model by noise, and a
    per-user holdout of hundreds of users can still catch a model that only follows
    recency. With no judging holdout at all nothing can be told: the model serves, with
    a warning.

    When the holdouts disagree, one finding the model clearly below popularity and
    another clearly above (lower bound above 0), neither vetoes alone: the mean
    difference over all their users (each holdout weighted by its users) decides, and
    the model serves with a warning when it is positive. On logs where users rate in
    bursts the time holdout (users active right after the cut, a few dozen) can favour
    recent popularity while the per-user one (hundreds of users at their own times) finds
    the model far better; a veto by the smaller side made every answer popularity, which
    lost per-user by 40% (bench/RESULTS.md, issue 11).

    By default (``rule.first_model_gate`` None) the rule is not applied to a log with
    logged ``impressions``: there the next clicks follow what was shown (mostly popular
    items), so an offline comparison favours popularity and the closed loop's online
    canary is the judge; the figures are still reported.
    """
    minimum = rule.first_model_min_users
    judged: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, comp in comparisons.items():
        users = int(comp.get("users") or 0) if comp else 0
        diff = _finite(comp.get("difference")) if comp else None
        if comp is None or diff is None or users < minimum:
            skipped[name] = f"{users} users (fewer than {minimum})" if comp else "not computed"
            continue
        stderr = _finite(comp.get("stderr"))
        upper = diff + rule.first_model_z * (stderr if stderr is not None else math.inf)
        judged[name] = {
            **{k: comp.get(k) for k in ("users", "challenger", "popularity", "difference")},
            "stderr": stderr,
            "upper_bound": upper if math.isfinite(upper) else None,
            "clearly_below": bool(upper < 0),
            "clearly_above": bool(stderr is not None and diff - rule.first_model_z * stderr > 0),
            "above": bool(diff > 0),
        }
    evidence: dict[str, Any] = {
        "min_users": minimum,
        "z": rule.first_model_z,
        "judged": judged,
        "skipped": skipped,
    }

    def figures(name: str) -> str:
        j = judged[name]
        return (
            f"{name} NDCG@10 {j['challenger']:.4f} vs popularity {j['popularity']:.4f} "
            f"({j['users']:.0f} users)"
        )

    if rule.first_model_gate is False or (rule.first_model_gate is None and impressions > 0):
        why = (
            "switched off"
            if rule.first_model_gate is False
            else f"the log has {impressions:,} logged impressions: offline figures favour "
            "what was shown, the online canary judges"
        )
        evidence["skipped_rule"] = why
        return FirstModelDecision(True, f"first-model rule not applied ({why})", None, evidence)
    if not judged:
        warning = (
            "no holdout has enough users to compare with popularity ("
            + "; ".join(f"{n}: {why}" for n, why in sorted(skipped.items()))
            + "): serving the model unchecked"
        )
        return FirstModelDecision(True, warning, warning, evidence)
    below = sorted(n for n, j in judged.items() if j["clearly_below"])
    above = sorted(n for n, j in judged.items() if j["above"])
    clearly_above = sorted(n for n, j in judged.items() if j["clearly_above"])
    if below and clearly_above:
        users = sum(float(judged[n]["users"]) for n in judged)
        pooled = sum(float(j["users"]) * float(j["difference"]) for j in judged.values()) / users
        evidence["pooled"] = {"users": users, "difference": pooled}
        disagreement = (
            "holdouts disagree: clearly below popularity on "
            + "; ".join(figures(n) for n in below)
            + ", clearly above on "
            + "; ".join(figures(n) for n in clearly_above)
            + f"; mean difference over their {users:.0f} users {pooled:+.4f}"
        )
        if pooled > 0:
            warning = f"{disagreement}: serving the model"
            return FirstModelDecision(True, warning, warning, evidence)
        reason = disagreement
    elif below:
        reason = "clearly below popularity: " + "; ".join(figures(n) for n in below)
    elif not above:
        reason = "not above popularity: " + "; ".join(figures(n) for n in sorted(judged))
    else:
        return FirstModelDecision(
            True, "beats popularity: " + "; ".join(figures(n) for n in above), None, evidence
        )
    warning = f"{reason}; serving popularity answers until a model beats it"
    return FirstModelDecision(False, reason, warning, evidence)
