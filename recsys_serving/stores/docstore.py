"""The document store: users and items over the MongoDB API.

Two backends sit behind one class, :class:`DocStore`, and it only ever calls the pymongo
``Collection`` API (``bulk_write`` of ``ReplaceOne``, ``find``/``find_one`` by ``_id``,
``estimated_document_count``), so swapping the embedded default for MongoDB/DocumentDB is
a change of ``RECSYS_MONGO_URI``, never of code:

- ``mongodb://`` / ``mongodb+srv://``: a real server through ``pymongo.MongoClient``.
- unset or ``mongomock://``: the embedded store, :class:`EmbeddedDatabase`. Its
  collections answer the same pymongo calls from an ``_id -> document`` dict (mongomock
  scans every document for ``find_one({"_id": ...})``, 120 ms at 100k users, and its
  upserts are O(n) each), match any other filter with mongomock's query engine, and
  persist to one JSON file so the pipeline, the CLI and every server worker (separate
  processes) see the same data.

Embedded persistence: a writer takes a ``filelock`` lock beside the file, reloads the
file if another process changed it, applies its writes in memory, then replaces the file
atomically (temp file + fsync + rename + fsync of the directory; ``bson.json_util``
keeps datetimes). A reader stats the file at most every ``refresh_seconds`` and reloads
when its inode, size or mtime changed, so a write is visible to every process within a
second and a reader never sees a half-written file.

A file that disappears under a process that had loaded it is a loss, never an empty
store: the process keeps answering from the copy it holds, logs
``docstore_file_missing`` (error) once, and ``ping`` fails with the reason, so
``/readyz`` is 503 naming the file until it is restored (from a backup, or by
``recsys catalog load``). A write in such a process recreates the file from its copy
plus the write, with a ``docstore_file_recreated`` warning. A process that starts
after the deletion cannot tell it from a new, empty store.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pymongo
from bson import json_util
from bson.json_util import JSONMode, JSONOptions
from filelock import FileLock, Timeout
from mongomock.filtering import filter_applies
from pymongo import ReplaceOne
from pymongo.errors import BulkWriteError, ConnectionFailure, PyMongoError
from pymongo.results import BulkWriteResult

from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

ITEMS = "items"
USERS = "users"
FILE_FORMAT = "recsys-docstore"
FILE_VERSION = 1
WRITE_BATCH = 1000
BULK_SOCKET_TIMEOUT_MS = 60_000
HEARTBEAT_MS = 2_000
_JSON_OPTIONS = JSONOptions(json_mode=JSONMode.RELAXED, tz_aware=True, tzinfo=UTC)
_MISSING = object()


class DocStoreError(Exception):
    """The store refused an operation, or its persistence file is unusable."""


class StoreUnavailable(DocStoreError):
    """The backend could not be reached in time; callers fall back rather than wait."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class UpsertResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.unchanged

    def __add__(self, other: UpsertResult) -> UpsertResult:
        return UpsertResult(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
        )


def redact_uri(uri: str) -> str:
    """The URI without user, password or options (options can carry tokens)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    return f"{scheme}://{rest.split('?', 1)[0].rsplit('@', 1)[-1].rstrip('/')}"


# ------------------------------------------------------------------ embedded backend
def _copy(value: Any) -> Any:
    """Hand out copies, like a driver does, so callers cannot corrupt the shared cache."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _stored(value: Any) -> Any:
    """What a MongoDB round trip would give back: a deep copy whose datetimes are
    tz-aware UTC with millisecond precision (naive ones are taken as UTC, as pymongo does)."""
    if isinstance(value, dict):
        return {k: _stored(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_stored(v) for v in value]
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.replace(microsecond=aware.microsecond // 1000 * 1000)
    return value


def _bson_default(obj: Any) -> Any:
    return json_util.default(obj, json_options=_JSON_OPTIONS)


class _BulkRecorder:
    """Receives pymongo write models through their ``_add_to_bulk`` protocol.

    This is how pymongo's own bulk API consumes ``ReplaceOne`` & co; accepting the
    options as keywords keeps it working when pymongo adds one (mongomock's builder
    breaks on pymongo >= 4.11 for exactly that reason, mongomock issue #912).
    """

    def __init__(self) -> None:
        self.replacements: list[tuple[Any, dict[str, Any], bool]] = []

    def add_replace(
        self, selector: Mapping[str, Any], doc: Mapping[str, Any], upsert: bool, **_: Any
    ) -> None:
        if set(selector) != {"_id"} or isinstance(selector["_id"], dict):
            raise ValueError(f"the embedded store replaces by _id only, got filter {selector!r}")
        if "_id" in doc and doc["_id"] != selector["_id"]:
            raise ValueError("the replacement's _id differs from the filter's")
        self.replacements.append((selector["_id"], _stored(doc), bool(upsert)))

    def _unsupported(self, *_: Any, **__: Any) -> None:
        raise TypeError("the embedded store's bulk_write accepts ReplaceOne operations only")

    add_insert = add_update = add_delete = _unsupported


class EmbeddedCollection:
    """One collection of :class:`EmbeddedDatabase`, speaking the pymongo calls DocStore uses."""

    def __init__(self, database: EmbeddedDatabase, name: str) -> None:
        self.database = database
        self.name = name
        self._docs: dict[Any, dict[str, Any]] = {}
        self._sorted_ids: list[Any] | None = None

    def _replace_all(self, docs: dict[Any, dict[str, Any]]) -> None:
        self._docs = docs
        self._sorted_ids = None

    def _current(self) -> dict[Any, dict[str, Any]]:
        self.database.refresh()
        return self._docs

    def _ids_in_order(self, docs: dict[Any, dict[str, Any]]) -> list[Any]:
        ids = self._sorted_ids
        if ids is None or docs is not self._docs:
            ids = sorted(docs)
            if docs is self._docs:
                self._sorted_ids = ids
        return ids

    def find(
        self,
        filter: Mapping[str, Any] | None = None,
        *,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Matching documents (copies); ``_id`` lookups and ranges never scan."""
        docs = self._current()
        direction = 0
        if sort:
            if len(sort) != 1 or sort[0][0] != "_id" or sort[0][1] not in (1, -1):
                raise ValueError(f"the embedded store sorts by _id only, got {sort!r}")
            direction = sort[0][1]
        found = self._select(docs, dict(filter or {}), direction)
        for n, doc in enumerate(found, 1):
            yield _copy(doc)
            if limit and n >= limit:
                return

    def _select(
        self, docs: dict[Any, dict[str, Any]], flt: dict[str, Any], direction: int
    ) -> Iterable[dict[str, Any]]:
        fast = self._by_id(docs, flt["_id"], direction) if list(flt) == ["_id"] else None
        if fast is not None:
            return fast
        ids = self._ids_in_order(docs) if direction else list(docs)
        order = ids[::-1] if direction < 0 else ids
        if not flt:
            return (docs[i] for i in order)
        return (docs[i] for i in order if filter_applies(flt, docs[i]))

    def _by_id(
        self, docs: dict[Any, dict[str, Any]], cond: Any, direction: int
    ) -> Iterable[dict[str, Any]] | None:
        """Equality, ``$in`` and ``$gt``/``$gte`` on ``_id`` without a scan (else None)."""
        if not isinstance(cond, dict):
            doc = docs.get(cond)
            return [doc] if doc is not None else []
        if set(cond) == {"$in"}:
            wanted = list(dict.fromkeys(cond["$in"]))
            if direction:
                wanted.sort(reverse=direction < 0)
            return [docs[i] for i in wanted if i in docs]
        if set(cond) in ({"$gt"}, {"$gte"}):
            ids = self._ids_in_order(docs)
            bound = cond.get("$gt", cond.get("$gte"))
            start = (bisect.bisect_right if "$gt" in cond else bisect.bisect_left)(ids, bound)
            chosen = ids[start:] if direction >= 0 else ids[start:][::-1]
            return (docs[i] for i in chosen if i in docs)
        return None

    def find_one(self, filter: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return next(self.find(filter, limit=1), None)

    def estimated_document_count(self) -> int:
        return len(self._current())

    def count_documents(self, filter: Mapping[str, Any]) -> int:
        return sum(1 for _ in self.find(filter))

    def bulk_write(
        self, requests: Sequence[Any], ordered: bool = True, **_: Any
    ) -> BulkWriteResult:
        recorder = _BulkRecorder()
        for op in requests:
            op._add_to_bulk(recorder)
        upserted: list[dict[str, Any]] = []
        matched = modified = 0
        with self.database.write():
            docs = self._docs
            for index, (key, doc, upsert) in enumerate(recorder.replacements):
                old = docs.get(key)
                if old is None and not upsert:
                    continue
                doc["_id"] = key
                if old is None:
                    upserted.append({"index": index, "_id": key})
                    self._sorted_ids = None
                else:
                    matched += 1
                    if old == doc:
                        continue
                    modified += 1
                docs[key] = doc
                self.database.mark_dirty()
        return BulkWriteResult(
            {
                "nInserted": 0,
                "nUpserted": len(upserted),
                "nMatched": matched,
                "nModified": modified,
                "nRemoved": 0,
                "upserted": upserted,
                "writeErrors": [],
                "writeConcernErrors": [],
            },
            True,
        )


Signature = tuple[int, int, int]


class EmbeddedDatabase:
    """Collections in memory, persisted to one JSON file shared by every process."""

    def __init__(
        self,
        path: Path,
        *,
        refresh_seconds: float = 1.0,
        lock_timeout_seconds: float = 600.0,
    ) -> None:
        self.path = Path(path)
        self.refresh_seconds = refresh_seconds
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout_seconds = lock_timeout_seconds
        self._file_lock: FileLock | None = None
        self._mutex = threading.RLock()
        self._collections: dict[str, EmbeddedCollection] = {}
        self._signature: Signature | None = None
        self._loaded = False
        self._checked_at = -math.inf
        self._writer: int | None = None  # thread id holding the write session
        self._dirty = False
        self.lost: str | None = None  # why the loaded file is gone, while it is

    def __getitem__(self, name: str) -> EmbeddedCollection:
        with self._mutex:
            coll = self._collections.get(name)
            if coll is None:
                coll = self._collections[name] = EmbeddedCollection(self, name)
            return coll

    def command(self, name: str) -> dict[str, Any]:
        if name != "ping":
            raise ValueError(f"the embedded store answers the ping command only, not {name!r}")
        self.refresh(force=True)
        if self.lost is not None:
            raise DocStoreError(self.lost)
        return {"ok": 1.0}

    # -- reading
    def _stat(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self, force: bool = False) -> None:
        """Reload when another process replaced the file (checked at most every interval)."""
        if self._writer == threading.get_ident():
            return  # inside our own write session, memory is ahead of the file
        now = time.monotonic()
        if not force and self._loaded and now - self._checked_at < self.refresh_seconds:
            return
        signature = self._stat()
        self._checked_at = now
        if self._loaded and signature == self._signature:
            return
        if self._loaded and signature is None and self._signature is not None:
            self._mark_lost()  # keep answering from memory: a deleted file is not "empty"
            return
        # One thread reloads; the others keep answering from the previous data rather
        # than queue behind a reload of a large catalogue (they wait only for the first).
        if not self._mutex.acquire(blocking=force or not self._loaded):
            return
        try:
            if self._loaded and self._stat() == self._signature:
                return
            self._load()
        finally:
            self._mutex.release()

    def _mark_lost(self) -> None:
        if self.lost is not None:
            return
        held = {name: len(c._docs) for name, c in sorted(self._collections.items())}
        self.lost = (
            f"{self.path}: the document store file was deleted; this process answers from "
            f"the copy it loaded ({', '.join(f'{n} {k}' for k, n in held.items()) or 'empty'}); "
            "restore the file from a backup or run `recsys catalog load`"
        )
        log.error("docstore_file_missing", path=str(self.path), held=held)

    def _load(self) -> None:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - fstat of the very file we read
        except FileNotFoundError:
            contents: dict[str, dict[Any, dict[str, Any]]] = {}
            signature = None
        else:
            with fh:
                st = os.fstat(fh.fileno())
                signature = (st.st_ino, st.st_size, st.st_mtime_ns)
                contents = self._parse(fh.read())
        for name in set(self._collections) | set(contents):
            self[name]._replace_all(contents.get(name, {}))
        if self.lost is not None and signature is not None:
            log.info("docstore_file_restored", path=str(self.path))
            self.lost = None
        self._signature = signature
        self._loaded = True
        self._checked_at = time.monotonic()

    def _parse(self, data: bytes) -> dict[str, dict[Any, dict[str, Any]]]:
        def corrupt(detail: str) -> DocStoreError:
            return DocStoreError(
                f"{self.path}: corrupt document store file ({detail}); restore it from a "
                "backup, or move it away and run `recsys catalog load` again"
            )

        try:
            parsed = json_util.loads(data, json_options=_JSON_OPTIONS)
        except json.JSONDecodeError as exc:
            raise corrupt(f"invalid JSON at line {exc.lineno}, column {exc.colno}") from exc
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise corrupt(str(exc)) from exc
        if not isinstance(parsed, dict) or parsed.get("format") != FILE_FORMAT:
            raise corrupt(f"not a {FILE_FORMAT} file")
        if parsed.get("version") != FILE_VERSION:
            raise corrupt(f"unsupported version {parsed.get('version')!r}")
        collections = parsed.get("collections")
        if not isinstance(collections, dict):
            raise corrupt("no collections")
        contents: dict[str, dict[Any, dict[str, Any]]] = {}
        for name, docs in collections.items():
            if not isinstance(docs, list):
                raise corrupt(f"collection {name!r} is not a list")
            by_id: dict[Any, dict[str, Any]] = {}
            for n, doc in enumerate(docs):
                if not isinstance(doc, dict) or "_id" not in doc:
                    raise corrupt(f"document {n} of {name!r} has no _id")
                by_id[doc["_id"]] = doc
            contents[name] = by_id
        return contents

    # -- writing
    def mark_dirty(self) -> None:
        self._dirty = True

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write session: exclusive across processes, persisted once when it ends.

        A failure inside the session discards its changes: memory is reloaded from the
        file, which still holds the last committed state.
        """
        if self._writer == threading.get_ident():
            yield  # nested: the outer session persists
            return
        with self._mutex:
            if self._file_lock is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file_lock = FileLock(self.lock_path, timeout=self.lock_timeout_seconds)
            try:
                self._file_lock.acquire()
            except Timeout as exc:
                raise DocStoreError(
                    f"{self.lock_path}: another writer held the document store lock for "
                    f"more than {self.lock_timeout_seconds:.0f}s"
                ) from exc
            try:
                self.refresh(force=True)
                self._writer = threading.get_ident()
                self._dirty = False
                committed = False
                try:
                    yield
                    if self._dirty:
                        self._persist()
                    committed = True
                finally:
                    self._writer = None
                    if not committed and self._dirty:
                        self._loaded = False  # the next access reloads the committed file
                    self._dirty = False
            finally:
                self._file_lock.release()

    def _persist(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        header = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "saved_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        try:
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(header)[:-1] + b',"collections":{\n')
                names = sorted(self._collections)
                for i, name in enumerate(names):
                    fh.write(orjson.dumps(name) + b":[\n")
                    docs = list(self._collections[name]._docs.values())
                    for start in range(0, len(docs), 10_000):
                        chunk = docs[start : start + 10_000]
                        if start:
                            fh.write(b",\n")
                        fh.write(
                            b",\n".join(
                                orjson.dumps(
                                    d, default=_bson_default, option=orjson.OPT_PASSTHROUGH_DATETIME
                                )
                                for d in chunk
                            )
                        )
                    fh.write(b"\n]" + (b",\n" if i < len(names) - 1 else b"\n"))
                fh.write(b"}}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._signature = self._stat()
        self._checked_at = time.monotonic()
        if self.lost is not None:
            log.warning(
                "docstore_file_recreated",
                path=str(self.path),
                from_memory={n: len(c._docs) for n, c in sorted(self._collections.items())},
            )
            self.lost = None


# ----------------------------------------------------------------------- the store
class DocStore:
    """Users and items, keyed by ``_id`` = ``user_id`` / ``item_id`` (the id field is kept).

    Request-time reads (``get_user``, ``get_items``, ``ping``) run under a pymongo client
    side timeout of ``request_timeout_ms``; a backend that is down or slow raises
    :class:`StoreUnavailable` at once so the server can answer from its fallback.
    """

    def __init__(
        self,
        database: Any,
        *,
        uri: str,
        backend: Literal["embedded", "mongodb"],
        request_timeout_ms: float,
        client: Any = None,
        write_batch: int = WRITE_BATCH,
    ) -> None:
        self.database = database
        self.uri = uri
        self.backend = backend
        self.last_error: str | None = None  # why the last ping failed
        self.request_timeout_s = request_timeout_ms / 1000.0
        self.write_batch = write_batch
        self._client = client
        self.items = database[ITEMS]
        self.users = database[USERS]
        self._indexes_ready = False

    @classmethod
    def from_client(
        cls, client: Any, database: str, *, uri: str, request_timeout_ms: float = 50.0
    ) -> DocStore:
        """A store on any pymongo-compatible client (a real one, or mongomock in tests)."""
        return cls(
            client[database],
            uri=redact_uri(uri),
            backend="mongodb",
            request_timeout_ms=request_timeout_ms,
            client=client,
        )

    @property
    def embedded(self) -> bool:
        return self.backend == "embedded"

    def __enter__(self) -> DocStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- errors
    def _known_down(self) -> str | None:
        """The monitor's last error when every server is known to be unreachable.

        pymongo's server selection sleeps in 0.5 s steps whatever the timeout, so a
        request would block a worker thread that long; when the background monitor
        already knows the servers are down, fail at once instead.
        """
        if not isinstance(self._client, pymongo.MongoClient):
            return None  # the embedded store, or a test double without a topology
        described = self._client.topology_description
        if described.has_readable_server():
            return None
        servers = list(described.server_descriptions().values())
        if not servers or any(sd.error is None for sd in servers):
            return None
        return str(servers[0].error)

    @contextmanager
    def _guard(self, op: str, request: bool = False) -> Iterator[None]:
        try:
            if request:
                down = self._known_down()
                if down is not None:
                    raise StoreUnavailable(
                        f"{self.uri}: {op}: server unreachable ({down[:200]})", timeout=False
                    )
                with pymongo.timeout(self.request_timeout_s):
                    yield
            else:
                yield
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            first = errors[0].get("errmsg", "") if errors else str(exc)
            raise DocStoreError(
                f"{self.uri}: {op}: {len(errors)} document(s) refused, first: {first}"
            ) from exc
        except PyMongoError as exc:
            detail = str(exc).split(", Topology Description")[0][:300]
            message = f"{self.uri}: {op} failed: {detail}"
            if exc.timeout or isinstance(exc, ConnectionFailure):
                raise StoreUnavailable(message, timeout=exc.timeout) from exc
            raise DocStoreError(message) from exc

    # -- writes
    def batch(self) -> AbstractContextManager[None]:
        """Group many upserts: the embedded store locks once and persists once at the end.

        A real backend writes each bulk as it goes (upserts are idempotent, so a failed
        load is simply run again).
        """
        if isinstance(self.database, EmbeddedDatabase):
            return self.database.write()
        return nullcontext()

    def upsert_items(
        self, docs: Iterable[Mapping[str, Any]], batch_size: int | None = None
    ) -> UpsertResult:
        if not self.embedded and not self._indexes_ready:
            with self._guard("create indexes"):
                self.items.create_index("categories")
                self.items.create_index("published_at")
            self._indexes_ready = True
        return self._upsert(self.items, "item_id", docs, batch_size)

    def upsert_users(
        self, docs: Iterable[Mapping[str, Any]], batch_size: int | None = None
    ) -> UpsertResult:
        return self._upsert(self.users, "user_id", docs, batch_size)

    def _upsert(
        self,
        collection: Any,
        id_field: str,
        docs: Iterable[Mapping[str, Any]],
        batch_size: int | None,
    ) -> UpsertResult:
        size = batch_size or self.write_batch
        total = UpsertResult()
        ops: list[ReplaceOne[Any]] = []

        def flush() -> None:
            nonlocal total
            with self._guard(f"upsert into {collection.name}"):
                res = collection.bulk_write(ops, ordered=True)
            total += UpsertResult(
                inserted=res.upserted_count,
                updated=res.modified_count,
                unchanged=res.matched_count - res.modified_count,
            )
            ops.clear()

        with self.batch():
            for doc in docs:
                ops.append(ReplaceOne({"_id": _doc_id(doc, id_field)}, _keyed(doc, id_field), True))
                if len(ops) >= size:
                    flush()
            if ops:
                flush()
        return total

    # -- reads
    def get_user(self, user_id: str) -> dict[str, Any] | None:
        with self._guard("get_user", request=True):
            return self.users.find_one({"_id": user_id})

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        with self._guard("get_item", request=True):
            return self.items.find_one({"_id": item_id})

    def get_items(self, item_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The known items among ``item_ids`` (unknown ids are simply absent)."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        with self._guard("get_items", request=True):
            return {d["_id"]: d for d in self.items.find({"_id": {"$in": ids}})}

    def iter_items(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every item in ``_id`` order, fetched ``batch_size`` at a time (bounded memory)."""
        return self._iterate(self.items, batch_size)

    def iter_users(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        return self._iterate(self.users, batch_size)

    def _iterate(self, collection: Any, batch_size: int) -> Iterator[dict[str, Any]]:
        # Keyset pagination: no server cursor stays open between batches, so a slow
        # consumer (a snapshot of millions of items) never hits a cursor timeout.
        after: Any = _MISSING
        while True:
            flt = {} if after is _MISSING else {"_id": {"$gt": after}}
            with self._guard(f"read {collection.name}"):
                page = list(collection.find(flt, sort=[("_id", 1)], limit=batch_size))
            yield from page
            if len(page) < batch_size:
                return
            after = page[-1]["_id"]

    def counts(self) -> dict[str, int]:
        with self._guard("count"):
            return {
                ITEMS: self.items.estimated_document_count(),
                USERS: self.users.estimated_document_count(),
            }

    def ping(self) -> bool:
        """Whether the store answers; ``last_error`` says why not (shown by ``/readyz``)."""
        try:
            with self._guard("ping", request=True):
                self.database.command("ping")
        except DocStoreError as exc:
            log.warning("docstore_ping_failed", uri=self.uri, error=str(exc))
            self.last_error = str(exc)
            return False
        self.last_error = None
        return True


def _doc_id(doc: Mapping[str, Any], id_field: str) -> str:
    value = doc.get(id_field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"document without a string {id_field}: {dict(doc)!r:.200}")
    return value


def _keyed(doc: Mapping[str, Any], id_field: str) -> dict[str, Any]:
    key = doc[id_field]
    if doc.get("_id", key) != key:
        raise ValueError(f"_id {doc['_id']!r} differs from {id_field} {key!r}")
    return {"_id": key, **{k: v for k, v in doc.items() if k != "_id"}}


# ---------------------------------------------------------------------- construction
_SCHEMES = re.compile(r"^mongodb(\+srv)?://")


def client_options(store_timeout_ms: float) -> dict[str, Any]:
    """Client timeouts: request-time calls get ``store_timeout_ms`` through
    ``pymongo.timeout``; these bound everything else (loads, snapshots, status) so a
    dead server is reported within a second or so instead of pymongo's default 30 s."""
    selection_ms = int(min(max(store_timeout_ms * 20, 1000), 10_000))
    return {
        "serverSelectionTimeoutMS": selection_ms,
        "connectTimeoutMS": selection_ms,
        "socketTimeoutMS": BULK_SOCKET_TIMEOUT_MS,
        # A server found down is probed again this often; requests fail fast meanwhile.
        "heartbeatFrequencyMS": HEARTBEAT_MS,
        "tz_aware": True,
        "appname": "recsys",
    }


def connect_docstore(
    mongo_uri: str | None,
    mongo_db: str,
    docstore_path: Path | str,
    *,
    store_timeout_ms: float = 50.0,
    refresh_seconds: float = 1.0,
    client_factory: Callable[..., Any] = pymongo.MongoClient,
) -> DocStore:
    """Open the store a URI names; the embedded one when it is unset or ``mongomock://``."""
    if not mongo_uri or mongo_uri.startswith("mongomock://"):
        database = EmbeddedDatabase(Path(docstore_path), refresh_seconds=refresh_seconds)
        return DocStore(
            database,
            uri=Path(docstore_path).resolve().as_uri(),
            backend="embedded",
            request_timeout_ms=store_timeout_ms,
        )
    if not _SCHEMES.match(mongo_uri):
        raise DocStoreError(
            f"unsupported RECSYS_MONGO_URI {redact_uri(mongo_uri)!r}: use mongodb://, "
            "mongodb+srv:// or mongomock:// (embedded; also the default when unset)"
        )
    try:
        client = client_factory(mongo_uri, **client_options(store_timeout_ms))
    except PyMongoError as exc:
        raise DocStoreError(f"{redact_uri(mongo_uri)}: cannot configure client: {exc}") from exc
    return DocStore.from_client(
        client, mongo_db, uri=mongo_uri, request_timeout_ms=store_timeout_ms
    )


def open_docstore(settings: Settings, *, refresh_seconds: float = 1.0) -> DocStore:
    return connect_docstore(
        settings.mongo_uri,
        settings.mongo_db,
        settings.docstore_path,
        store_timeout_ms=settings.store_timeout_ms,
        refresh_seconds=refresh_seconds,
    )


__all__ = [
    "ITEMS",
    "USERS",
    "DocStore",
    "DocStoreError",
    "EmbeddedDatabase",
    "StoreUnavailable",
    "UpsertResult",
    "connect_docstore",
    "open_docstore",
    "redact_uri",
]
