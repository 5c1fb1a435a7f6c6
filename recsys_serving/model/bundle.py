"""The model bundle: a directory of files plus ``manifest.json``, written atomically.

A bundle is what training hands to serving. The server must never load a half-written
or tampered bundle, so the writer builds it in a temporary directory beside the target
and renames it into place only once every file is checksummed and the manifest (written
last) is on disk; readers verify every checksum before trusting a byte of it.

Usage::

    with BundleWriter(target_dir) as w:          # version defaults to new_version()
        np.save(w.path / "item_factors.npy", factors)
        w.manifest.update(seed=42, params=..., metrics=..., feature_names=...)
    manifest = verify_bundle(target_dir)         # BundleError if anything is wrong
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import uuid
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from recsys_serving.lake import fsync_path

BUNDLE_FORMAT = 1
SUPPORTED_FORMATS = frozenset({BUNDLE_FORMAT})
MANIFEST = "manifest.json"
VERSION_PATTERN = re.compile(r"^v\d{14}-[0-9a-f]{8}$")
_CHUNK = 1024 * 1024


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with or of an unknown format.

    The message names the bundle (and the file) and says what is wrong, because it ends
    up in the server's logs when a model is refused.
    """


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique version: ``v<YYYYmmddHHMMSS>-<8 hex>`` in UTC."""
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"v{moment.astimezone(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def is_version(value: str) -> bool:
    """Whether ``value`` is a well-formed bundle version (safe as a path component)."""
    return bool(VERSION_PATTERN.match(value))


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of one file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def to_jsonable(value: Any) -> Any:
    """Make manifest values strict JSON: numpy scalars/arrays, dates, paths, sets; NaN/inf
    become ``null`` so any JSON reader (jq, browsers) can read the manifest."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path | PurePosixPath):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"manifest value of type {type(value).__name__} is not JSON: {value!r}")


def check_file_name(name: str, where: str) -> None:
    """Refuse manifest entries that would escape the bundle directory when copied."""
    pure = PurePosixPath(name)
    if (
        not name
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in name
        or pure.as_posix() != name
        or name == MANIFEST
    ):
        raise BundleError(f"{where}: invalid file entry {name!r} in 'files'")


def scan_files(root: Path) -> dict[str, dict[str, Any]]:
    """Checksum every regular file under ``root`` except the manifest; symlinks are refused
    (a bundle must be self-contained to be copied to another machine)."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST:
                continue
            if full.is_symlink():
                raise BundleError(f"{full}: symlinks are not allowed in a bundle")
            if not full.is_file():
                raise BundleError(f"{full}: not a regular file")
            sha, size = file_digest(full)
            files[rel] = {"sha256": sha, "size": size}
    return files


class BundleWriter:
    """Context manager that writes a bundle atomically at ``target``.

    Write files into ``w.path`` and fill ``w.manifest``. On a clean exit every file is
    checksummed into ``manifest["files"]``, ``format``/``version`` (and ``created_at``,
    ``code_sha`` unless given) are set, ``manifest.json`` is written last, everything is
    fsynced and the temporary directory is renamed to ``target``. On an exception the
    temporary directory is removed: nothing is left behind. An existing ``target`` is
    never overwritten.
    """

    def __init__(self, target: str | Path, *, version: str | None = None) -> None:
        self.target = Path(target).expanduser().absolute()
        self.version = version or new_version()
        if not is_version(self.version):
            raise BundleError(
                f"{self.target}: invalid version {self.version!r} "
                "(expected v<YYYYmmddHHMMSS>-<8 hex>)"
            )
        self.path = self.target.parent / f".{self.target.name}.{uuid.uuid4().hex[:12]}.tmp"
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> BundleWriter:
        if self.target.exists():
            raise BundleError(f"{self.target}: refusing to overwrite an existing bundle")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _finish(self) -> None:
        if (self.path / MANIFEST).exists():
            raise BundleError(
                f"{self.path / MANIFEST}: written by the caller; fill w.manifest instead"
            )
        files = scan_files(self.path)
        for rel in files:
            fsync_path(self.path / rel)
        manifest = dict(self.manifest)
        manifest.setdefault("created_at", datetime.now(UTC).isoformat())
        manifest.setdefault("code_sha", code_sha())
        manifest["format"] = BUNDLE_FORMAT
        manifest["version"] = self.version
        manifest["files"] = files
        text = json.dumps(to_jsonable(manifest), indent=2, sort_keys=True, allow_nan=False)
        with open(self.path / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for dirpath, _dirnames, _filenames in os.walk(self.path):
            fsync_path(Path(dirpath))
        if self.target.exists():
            raise BundleError(f"{self.target}: refusing to overwrite an existing bundle")
        os.rename(self.path, self.target)
        fsync_path(self.target.parent)
        self.manifest = json.loads(text)


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and shape-check manifest bytes (``where`` names the source in errors)."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a JSON object")
    fmt = manifest.get("format")
    if fmt not in SUPPORTED_FORMATS or isinstance(fmt, bool):
        raise BundleError(
            f"{where}: unknown bundle format {fmt!r} (this code reads {sorted(SUPPORTED_FORMATS)})"
        )
    version = manifest.get("version")
    if not isinstance(version, str) or not is_version(version):
        raise BundleError(f"{where}: invalid or missing version {version!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: 'files' must be an object of path -> sha256/size")
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise BundleError(f"{where}: entry for {name!r} needs 'sha256' and 'size'")
        check_file_name(name, where)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at ``path`` (shape-checked, checksums not verified)."""
    manifest_path = Path(path) / MANIFEST
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"{manifest_path}: missing (not a bundle, or incomplete)") from exc
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read ({exc})") from exc
    return parse_manifest(data, str(manifest_path))


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check the bundle at ``path`` and return its manifest.

    Every file listed must exist with its recorded size and sha256, and no unlisted file
    may be present (it could only be a leftover or an injection); raises ``BundleError``
    naming the file otherwise.
    """
    root = Path(path)
    manifest = read_manifest(root)
    for name, entry in manifest["files"].items():
        full = root / name
        if not full.is_file():
            raise BundleError(f"{full}: listed in the manifest but missing")
        size = full.stat().st_size
        if size != entry["size"]:
            raise BundleError(
                f"{full}: size {size} bytes, manifest says {entry['size']} (truncated or modified)"
            )
        sha, _ = file_digest(full)
        if sha != entry["sha256"]:
            raise BundleError(f"{full}: sha256 mismatch (file modified or corrupt)")
    try:
        present = scan_names(root)
    except OSError as exc:
        raise BundleError(f"{root}: cannot list files ({exc})") from exc
    extra = sorted(present - set(manifest["files"]))
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in the manifest")
    return manifest


def scan_names(root: Path) -> set[str]:
    """Relative posix paths of every file under ``root`` except the manifest."""
    names: set[str] = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                names.add(rel)
    return names


@lru_cache(maxsize=1)
def code_sha() -> str:
    """The git commit of the code that runs (``-dirty`` if tracked files differ), else the
    installed package version + ``+unknown``. Never fails: it is provenance, not logic."""
    source = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if re.fullmatch(r"[0-9a-f]{40}", sha):
            dirty = subprocess.run(
                ["git", "diff", "--quiet", "HEAD", "--"],
                cwd=source,
                capture_output=True,
                timeout=10,
            ).returncode
            return f"{sha}-dirty" if dirty == 1 else sha
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"{version('recsys')}+unknown"
    except Exception:
        return "unknown"
