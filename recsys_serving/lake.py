"""The data lake: a local directory by default, S3 (or any S3-compatible store) when
``RECSYS_LAKE_URI`` is ``s3://bucket/prefix``.

Both backends expose the same small set of operations with the same guarantees
(objects appear whole or not at all), so the collector, the weblogs asset and the
registry never branch on where the lake lives.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import polars as pl


@dataclass(frozen=True, slots=True)
class LakeObject:
    key: str
    size: int
    mtime: float


class Lake(Protocol):
    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[LakeObject]: ...
    def delete(self, key: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    def uri_for(self, key: str) -> str: ...


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that a rename or a new entry in it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, *, sync_dir: bool = True) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` whole or not at all.

    Written to a temp file beside ``path`` (same filesystem, so the rename is atomic),
    fsynced, renamed over ``path`` when the block exits cleanly (and the directory
    fsynced unless ``sync_dir`` is False); removed if the block raises. Every local
    write of the lake, the registry cache, the OCI layout and the instance files goes
    through here.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_path(path.parent)


class LocalLake:
    """A lake on a local (or network-mounted) filesystem; atomic by write-then-rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"key escapes the lake: {key!r}")
        return path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            fh.write(data)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> Iterator[LakeObject]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return
        if base.is_file():
            st = base.stat()
            yield LakeObject(prefix, st.st_size, st.st_mtime)
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue  # in-flight temporary files are never visible
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                yield LakeObject(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class S3Lake:
    """A lake under ``s3://bucket/prefix`` through boto3; a PUT is atomic per object."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: object | None = None,
    ) -> None:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = uri.rstrip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def local_path(self, key: str) -> None:
        return None

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def list(self, prefix: str) -> Iterator[LakeObject]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield LakeObject(
                    obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp()
                )

    def delete(self, key: str) -> None:
        keys = [o.key for o in self.list(key)] or [key]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in keys[i : i + 1000]]},
            )


def open_lake(uri: str, endpoint_url: str | None = None, region: str = "us-east-1") -> Lake:
    if uri.startswith("s3://"):
        return S3Lake(uri, endpoint_url=endpoint_url, region=region)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported lake URI {uri!r}: use a local path or s3://bucket/prefix")
    return LocalLake(uri.removeprefix("file://"))


def write_parquet(lake: Lake, key: str, df: pl.DataFrame) -> int:
    """Write a Parquet object atomically; returns its size in bytes."""
    path = lake.local_path(key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            df.write_parquet(tmp, compression="zstd", statistics=True)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path.stat().st_size
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    data = buf.getvalue()
    lake.put_bytes(key, data)
    return len(data)


def read_parquet(lake: Lake, key: str, columns: list[str] | None = None) -> pl.DataFrame:
    path = lake.local_path(key)
    if path is not None:
        return pl.read_parquet(path, columns=columns)
    return pl.read_parquet(io.BytesIO(lake.get_bytes(key)), columns=columns)
