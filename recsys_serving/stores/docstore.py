"""The document store: users and items over the MongoDB API.

Two backends sit behind one class, :class:`DocStore`, and it only ever calls the pymongo
``Collection`` API (``bulk_write`` of ``ReplaceOne``, ``find``/``find_one`` by ``_id``,
``estimated_document_count``), so swapping the embedded default for MongoDB/DocumentDB is
a change of ``RECSYS_MONGO_URI``, never of code:

- ``mongodb://`` / ``mongodb+srv://``: a real server through ``pymongo.MongoClient``.
- unset or ``mongomock://``: the embedded store, :class:`EmbeddedDatabase`: one SQLite
  file in WAL mode shared by the pipeline, the CLI and every server worker (separate
  processes). Its collections answer the same pymongo calls; a document is one row
  (``(collection, _id)`` primary key, the document as MongoDB extended JSON text, so
  datetimes survive), ``_id`` lookups and ranges are primary-key searches, and any other
  filter is matched by mongomock's query engine while paging through the collection.

Why SQLite: the JSON file of earlier versions was rewritten whole on every write and
re-read whole by every reader after it, so both grew with the catalogue. Here a write
touches its rows, a reader's next query simply sees the last commit of any process (WAL:
readers never wait for the writer), and a catalogue load is one transaction. Durability:
``synchronous=FULL``, so every commit fsyncs the WAL and an acknowledged write survives
a power cut, as the JSON store's fsync-and-rename did; ``NORMAL`` would save that fsync
but may lose the last commits on power loss, and commits are few (a load is one) so the
cost is small. Writers wait up to ``lock_timeout_seconds`` for SQLite's write lock
(``busy_timeout``); readers up to ``READ_BUSY_SECONDS``, which WAL makes rare.

A JSON store of an earlier version (``<db>.json`` beside ``<db>.sqlite``) is imported in
the transaction that creates the SQLite file and then renamed ``<db>.json.imported``, so
it is imported once and never again over newer data.

A file that disappears under a process that had opened it is a loss, never an empty
store: the process keeps answering from the file it holds open (SQLite keeps reading
the unlinked file), logs ``docstore_file_missing`` (error) once, and ``ping`` fails with
the reason, so ``/readyz`` is 503 naming the file until it is restored (from a backup,
or by ``recsys catalog load``). The deleted file's ``-wal``/``-shm`` are removed then, so
a new file at that path is never paired with them. A write in such a process recreates
the file from what it holds plus the write, with a ``docstore_file_recreated`` warning.
A process that starts after the deletion cannot tell it from a new, empty store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
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
FILE_VERSION = 2  # the SQLite layout; 1 was the single JSON file, still imported
LEGACY_FILE_VERSION = 1
READ_BUSY_SECONDS = 2.0
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL is truncated back to this after a big load
WRITER_CACHE_KIB = -64 * 1024  # 64 MiB page cache for the writer connection (loads)
SQL_IN_CHUNK = 500
SCAN_PAGE = 1000
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
def _bson_default(obj: Any) -> Any:
    """BSON types as relaxed extended JSON, the text MongoDB tools write.

    Datetimes are what a MongoDB round trip gives back: UTC (naive ones taken as UTC, as
    pymongo does) at millisecond precision. The common case is formatted here, as
    ``bson.json_util`` would but without its ``strftime``: a catalogue load encodes
    millions of them.
    """
    if isinstance(obj, datetime):
        t = obj.replace(tzinfo=UTC) if obj.tzinfo is None else obj.astimezone(UTC)
        if 1970 <= t.year <= 9999:
            ms = t.microsecond // 1000
            return {
                "$date": f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:"
                f"{t.second:02d}{f'.{ms:03d}' if ms else ''}Z"
            }
    return json_util.default(obj, json_options=_JSON_OPTIONS)


def _encode(doc: Mapping[str, Any]) -> str:
    """A document as MongoDB extended JSON (relaxed), the text one row holds."""
    return orjson.dumps(doc, default=_bson_default, option=orjson.OPT_PASSTHROUGH_DATETIME).decode()


def _revive(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _revive(v) for k, v in value.items()}
        if any(k.startswith("$") for k in out):  # {"$date": ...} and the other BSON types
            return json_util.object_hook(out, _JSON_OPTIONS)
        return out
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def _decode(text: str) -> dict[str, Any]:
    # orjson parses; only documents holding a BSON type ("$date"...) take the slow walk.
    # Field names starting with "$" are refused on the way in, so "$ means a BSON type.
    parsed = orjson.loads(text)
    return _revive(parsed) if '"$' in text else parsed


class _BulkRecorder:
    """Receives pymongo write models through their ``_add_to_bulk`` protocol.

    This is how pymongo's own bulk API consumes ``ReplaceOne`` & co; accepting the
    options as keywords keeps it working when pymongo adds one (mongomock's builder
    breaks on pymongo >= 4.11 for exactly that reason, mongomock issue #912).
    """

    def __init__(self) -> None:
        self.replacements: list[tuple[str, Mapping[str, Any], bool]] = []

    def add_replace(
        self, selector: Mapping[str, Any], doc: Mapping[str, Any], upsert: bool, **_: Any
    ) -> None:
        if set(selector) != {"_id"} or isinstance(selector["_id"], dict):
            raise ValueError(f"the embedded store replaces by _id only, got filter {selector!r}")
        if not isinstance(selector["_id"], str):
            raise ValueError(f"the embedded store keys documents by string _id, got {selector!r}")
        if "_id" in doc and doc["_id"] != selector["_id"]:
            raise ValueError("the replacement's _id differs from the filter's")
        self.replacements.append((selector["_id"], doc, bool(upsert)))

    def _unsupported(self, *_: Any, **__: Any) -> None:
        raise TypeError("the embedded store's bulk_write accepts ReplaceOne operations only")

    add_insert = add_update = add_delete = _unsupported


def _chunks(values: Sequence[Any], size: int = SQL_IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class EmbeddedCollection:
    """One collection of :class:`EmbeddedDatabase`, speaking the pymongo calls DocStore uses.

    Rows of one table keyed by ``(collection, _id)``: ``_id`` lookups, ``$in`` and
    ``$gt``/``$gte`` ranges are primary-key searches; any other filter pages through
    the collection in ``_id`` order and applies mongomock's matcher to each document.
    """

    def __init__(self, database: EmbeddedDatabase, name: str) -> None:
        self.database = database
        self.name = name

    def find(
        self,
        filter: Mapping[str, Any] | None = None,
        *,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Matching documents (fresh copies); ``_id`` lookups and ranges never scan."""
        direction = 0
        if sort:
            if len(sort) != 1 or sort[0][0] != "_id" or sort[0][1] not in (1, -1):
                raise ValueError(f"the embedded store sorts by _id only, got {sort!r}")
            direction = sort[0][1]
        return self._find(dict(filter or {}), direction, limit)

    def _find(self, flt: dict[str, Any], direction: int, limit: int) -> Iterator[dict[str, Any]]:
        cond = flt.get("_id", _MISSING)
        if list(flt) == ["_id"] and not isinstance(cond, dict):
            if not isinstance(cond, str):
                return  # only string ids are stored
            row = self.database.fetch_one(
                "SELECT doc FROM documents WHERE collection = ? AND _id = ?", (self.name, cond)
            )
            if row is not None:
                yield _decode(row[0])
            return
        if list(flt) == ["_id"] and set(cond) == {"$in"}:
            wanted = list(dict.fromkeys(i for i in cond["$in"] if isinstance(i, str)))
            if direction:
                wanted.sort(reverse=direction < 0)
            found = self._texts(wanted)
            chosen = [i for i in wanted if i in found]
            for i in chosen[:limit] if limit else chosen:
                yield _decode(found[i])
            return
        lower: tuple[str, str] | None = None
        match: dict[str, Any] | None = flt or None
        if (
            list(flt) == ["_id"]
            and set(cond) in ({"$gt"}, {"$gte"})
            and isinstance(next(iter(cond.values())), str)
        ):
            lower = (">" if "$gt" in cond else ">=", next(iter(cond.values())))
            match = None
        yield from self._scan(lower, direction >= 0, limit, match)

    def _texts(self, ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            found.update(
                self.database.fetch_all(
                    f"SELECT _id, doc FROM documents WHERE collection = ? AND _id IN ({marks})",
                    (self.name, *chunk),
                )
            )
        return found

    def _scan(
        self,
        lower: tuple[str, str] | None,
        ascending: bool,
        limit: int,
        match: dict[str, Any] | None,
    ) -> Iterator[dict[str, Any]]:
        # Keyset pages, each its own short read: no cursor (and no WAL snapshot) stays
        # open while the caller consumes, so a slow consumer never holds up checkpoints.
        page = min(limit, SCAN_PAGE) if limit and match is None else SCAN_PAGE
        after: str | None = None
        yielded = 0
        while True:
            where, params = ["collection = ?"], [self.name]
            if lower is not None:
                where.append(f"_id {lower[0]} ?")
                params.append(lower[1])
            if after is not None:
                where.append("_id > ?" if ascending else "_id < ?")
                params.append(after)
            rows = self.database.fetch_all(
                f"SELECT _id, doc FROM documents WHERE {' AND '.join(where)} "
                f"ORDER BY _id {'ASC' if ascending else 'DESC'} LIMIT ?",
                (*params, page),
            )
            for _, text in rows:
                doc = _decode(text)
                if match is None or filter_applies(match, doc):
                    yield doc
                    yielded += 1
                    if limit and yielded >= limit:
                        return
            if len(rows) < page:
                return
            after = rows[-1][0]

    def find_one(self, filter: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return next(self.find(filter, limit=1), None)

    def estimated_document_count(self) -> int:
        row = self.database.fetch_one(
            "SELECT count(*) FROM documents WHERE collection = ?", (self.name,)
        )
        return int(row[0]) if row else 0

    def count_documents(self, filter: Mapping[str, Any]) -> int:
        if not filter:
            return self.estimated_document_count()
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
            current = self._texts(list(dict.fromkeys(k for k, _, _ in recorder.replacements)))
            changed: dict[str, str] = {}
            for index, (key, doc, upsert) in enumerate(recorder.replacements):
                old = current.get(key)
                if old is None and not upsert:
                    continue
                # Encoded now: later changes by the caller cannot reach the store.
                text = _encode(doc if "_id" in doc else {"_id": key, **doc})
                if old is None:
                    upserted.append({"index": index, "_id": key})
                else:
                    matched += 1
                    # Same text, or same document in another field order: unchanged.
                    if old == text or _decode(old) == _decode(text):
                        continue
                    modified += 1
                current[key] = changed[key] = text
            if changed:
                self.database.execute_many(
                    "INSERT INTO documents (collection, _id, doc) VALUES (?, ?, ?) "
                    "ON CONFLICT (collection, _id) DO UPDATE SET doc = excluded.doc",
                    [(self.name, key, text) for key, text in changed.items()],
                )
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


Identity = tuple[int, int]  # (st_dev, st_ino) of the database file a connection opened

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS documents (collection TEXT NOT NULL, _id TEXT NOT NULL, "
    "doc TEXT NOT NULL, PRIMARY KEY (collection, _id)) WITHOUT ROWID",
)


class EmbeddedDatabase:
    """Collections in one SQLite file (WAL mode) shared by every process.

    Each thread reads through its own connection in autocommit mode, so a read sees the
    last committed write of any process and costs one primary-key search, whatever the
    size of the file. Writes go through one connection per process inside
    :meth:`write`, one transaction each (``BEGIN IMMEDIATE``: SQLite's write lock
    serialises writers across processes; WAL lets readers go on meanwhile).
    """

    def __init__(
        self,
        path: Path,
        *,
        refresh_seconds: float = 1.0,
        lock_timeout_seconds: float = 600.0,
        read_busy_seconds: float = READ_BUSY_SECONDS,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix == ".json":
            raise DocStoreError(
                f"{self.path}: the embedded store is a SQLite file; name it .sqlite (a "
                ".json store of an earlier version beside it is imported on first open)"
            )
        self.legacy_path = self.path.with_suffix(".json")
        self.refresh_seconds = refresh_seconds
        self.lock_timeout_seconds = lock_timeout_seconds
        self.read_busy_seconds = read_busy_seconds
        self._open_lock = FileLock(
            self.path.with_name(self.path.name + ".lock"), timeout=lock_timeout_seconds
        )
        self._mutex = threading.RLock()  # the write session and (re)opening the file
        self._local = threading.local()  # each thread's read connection
        self._collections: dict[str, EmbeddedCollection] = {}
        self._conn: sqlite3.Connection | None = None  # this process's writer connection
        self._identity: Identity | None = None
        self._generation = 0  # bumped whenever another file is opened at the path
        self._checked_at = -math.inf
        self._writer: int | None = None  # thread id holding the write session
        self.lost: str | None = None  # why the opened file is gone, while it is

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
        self.fetch_one("SELECT value FROM meta WHERE key = 'format'", ())
        return {"ok": 1.0}

    def close(self) -> None:
        with self._mutex:
            for conn in (self._conn, getattr(self._local, "conn", None)):
                if conn is not None:
                    conn.close()
            self._conn = self._identity = None
            self._local = threading.local()
            self._generation += 1

    # -- errors
    def _corrupt(self, detail: str) -> DocStoreError:
        return DocStoreError(
            f"{self.path}: corrupt document store file ({detail}); restore it from "
            "a backup, or move it away and run `recsys catalog load` again"
        )

    def _failure(self, exc: sqlite3.Error, op: str) -> DocStoreError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreUnavailable(
                f"{self.path}: {op}: the database stayed locked ({text})", timeout=True
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return self._corrupt(text)
        return DocStoreError(f"{self.path}: {op} failed: {text}")

    # -- opening and watching the file
    def _connect(self, *, create: bool, busy_seconds: float) -> sqlite3.Connection:
        mode = "rwc" if create else "rw"
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode={mode}",
            uri=True,
            timeout=busy_seconds,
            isolation_level=None,  # autocommit: every read sees the latest commit
            check_same_thread=False,  # used under self._mutex, or by its own thread only
            cached_statements=64,
        )
        try:
            # FULL: each commit fsyncs the WAL, so a write acknowledged is on disk even
            # after a power cut, as the JSON store's fsync-and-rename was (see module doc).
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _stat_identity(self) -> Identity | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _open_file(self) -> None:
        """(Re)open the file at the path: create it, or import a JSON store, if needed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._open_lock:
                if not self.path.exists():
                    self._remove_orphans()
                conn = self._connect(create=True, busy_seconds=self.lock_timeout_seconds)
                try:
                    conn.execute(f"PRAGMA cache_size = {WRITER_CACHE_KIB}")
                    self._initialize(conn)
                    identity = self._stat_identity()
                except BaseException:
                    conn.close()
                    raise
        except Timeout as exc:
            raise DocStoreError(
                f"{self._open_lock.lock_file}: held by another process for more than "
                f"{self.lock_timeout_seconds:.0f}s"
            ) from exc
        except sqlite3.Error as exc:
            raise self._failure(exc, "open") from exc
        old, self._conn = self._conn, conn
        if old is not None:
            # SQLite neither checkpoints nor deletes the WAL when closing a connection
            # whose file has been unlinked or replaced, so this cannot harm the new file.
            old.close()
        self._identity = identity
        self._generation += 1
        if self.lost is not None:
            log.info("docstore_file_restored", path=str(self.path))
            self.lost = None

    def _initialize(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            row = None
        if row is None:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise DocStoreError(f"{self.path}: SQLite refused WAL mode on this file system")
            conn.execute("BEGIN IMMEDIATE")
            try:
                foreign = conn.execute(
                    "SELECT count(*) FROM sqlite_schema WHERE type = 'table' "
                    "AND name NOT IN ('meta', 'documents')"
                ).fetchone()[0]
                if foreign:
                    raise self._corrupt(f"not a {FILE_FORMAT} database")
                for statement in _SCHEMA:
                    conn.execute(statement)
                row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                imported = None
                if row is None:  # another process did not initialize it meanwhile
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [
                            ("format", FILE_FORMAT),
                            ("version", str(FILE_VERSION)),
                            ("created_at", datetime.now(UTC).isoformat(timespec="seconds")),
                        ],
                    )
                    imported = self._import_legacy(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if imported is not None:
                done = self.legacy_path.with_name(self.legacy_path.name + ".imported")
                os.replace(self.legacy_path, done)
                log.info(
                    "docstore_imported", source=str(self.legacy_path), kept_as=str(done), **imported
                )
            return
        if row[0] != FILE_FORMAT:
            raise self._corrupt(f"not a {FILE_FORMAT} database")
        version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if version is None or version[0] != str(FILE_VERSION):
            raise self._corrupt(f"unsupported version {version and version[0]!r}")

    def _import_legacy(self, conn: sqlite3.Connection) -> dict[str, int] | None:
        """The JSON store of earlier versions, into this new file, in its transaction."""
        try:
            data = self.legacy_path.read_bytes()
        except FileNotFoundError:
            return None
        contents = _parse_legacy(data, self.legacy_path)
        for name, docs in contents.items():
            conn.executemany(
                "INSERT INTO documents (collection, _id, doc) VALUES (?, ?, ?)",
                ((name, key, _encode(doc)) for key, doc in docs.items()),
            )
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('imported_from', ?)", (str(self.legacy_path),)
        )
        return {name: len(docs) for name, docs in sorted(contents.items())}

    def _remove_orphans(self) -> None:
        """Drop the WAL and shared-memory files of a database file that is gone.

        A WAL replayed onto another database file corrupts it, and a new file must not
        share the wal-index of the deleted one that running processes still map. Called
        with the open lock held and the database file absent.
        """
        for suffix in ("-wal", "-shm"):
            orphan = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                orphan.unlink()
                log.warning("docstore_orphan_removed", path=str(orphan))

    def refresh(self, force: bool = False) -> None:
        """Open the file on first use, then notice (at most every ``refresh_seconds``)
        that it was deleted or replaced. Nothing is reloaded: reads go to SQLite."""
        if self._writer == threading.get_ident():
            return  # inside our own write session, which checked when it began
        now = time.monotonic()
        if self._conn is not None and not force and now - self._checked_at < self.refresh_seconds:
            return
        if self._conn is None:
            with self._mutex:
                if self._conn is None:
                    self._open_file()
            self._checked_at = now
            return
        identity = self._stat_identity()
        self._checked_at = now
        if identity == self._identity:
            return
        with self._mutex:
            identity = self._stat_identity()
            if identity == self._identity:
                return
            if identity is None:
                self._mark_lost()
            else:
                self._open_file()  # restored from a backup, or recreated by another process

    def _held(self) -> dict[str, int]:
        assert self._conn is not None
        return dict(
            self._conn.execute(
                "SELECT collection, count(*) FROM documents GROUP BY collection ORDER BY 1"
            ).fetchall()
        )

    def _mark_lost(self) -> None:
        if self.lost is not None:
            return
        held = self._held()
        self.lost = (
            f"{self.path}: the document store file was deleted; this process answers from "
            f"the copy it opened ({', '.join(f'{n} {k}' for k, n in held.items()) or 'empty'}); "
            "restore the file from a backup or run `recsys catalog load`"
        )
        log.error("docstore_file_missing", path=str(self.path), held=held)
        with self._open_lock:
            if not self.path.exists():
                self._remove_orphans()

    # -- reading
    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        if self._writer == threading.get_ident():
            assert self._conn is not None
            yield self._conn  # sees the session's own uncommitted writes
            return
        self.refresh()
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.generation != self._generation:
            conn.close()
            conn = local.conn = None
        if conn is None and self.lost is None:
            generation = self._generation
            try:
                conn = self._connect(create=False, busy_seconds=self.read_busy_seconds)
            except sqlite3.OperationalError:
                conn = None  # deleted meanwhile: the next check marks it lost
            local.conn, local.generation = conn, generation
        if conn is not None:
            yield conn
            return
        with self._mutex:  # the file is gone: read what the writer connection still holds
            assert self._conn is not None
            yield self._conn

    def fetch_one(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        try:
            with self._reading() as conn:
                return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc, "read") from exc

    def fetch_all(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            with self._reading() as conn:
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(exc, "read") from exc

    # -- writing
    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self._writer != threading.get_ident() or self._conn is None:
            raise RuntimeError("execute_many outside a write session")
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self._failure(exc, "write") from exc

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write session: one transaction, exclusive across processes.

        A failure inside the session rolls it back, so the file keeps the last committed
        state. A session in a process whose file was deleted first recreates the file
        from what that process still holds.
        """
        if self._writer == threading.get_ident():
            yield  # nested: the outer session commits
            return
        with self._mutex:
            conn = self._begin()
            self._writer = threading.get_ident()
            try:
                yield
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._failure(exc, "commit") from exc
            finally:
                self._writer = None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _begin(self) -> sqlite3.Connection:
        """BEGIN IMMEDIATE on the file now at the path (never on a deleted one)."""
        for _ in range(3):
            self.refresh(force=True)
            if self.lost is not None:
                self._recreate()
            conn = self._conn
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise DocStoreError(
                        f"{self.path}: another writer held the document store for more "
                        f"than {self.lock_timeout_seconds:.0f}s"
                    ) from exc
                raise self._failure(exc, "write") from exc
            except sqlite3.Error as exc:
                raise self._failure(exc, "write") from exc
            # The wait for the write lock can be long: the file may have been deleted or
            # replaced meanwhile, and a commit to a deleted file would be lost silently.
            if self._stat_identity() == self._identity:
                return conn
            conn.execute("ROLLBACK")
            self._checked_at = -math.inf
        raise DocStoreError(f"{self.path}: the file kept changing under this writer")

    def _recreate(self) -> None:
        """Write what this process holds to a new file at the path (the old one is gone)."""
        assert self._conn is not None
        with self._open_lock:
            if self.path.exists():  # restored by someone else meanwhile: use theirs
                self._open_file()
                return
            self._remove_orphans()
            held = self._held()
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            try:
                copy = sqlite3.connect(tmp)
                try:
                    self._conn.backup(copy)
                finally:
                    copy.close()
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.lost = None
            self._open_file()
        log.warning("docstore_file_recreated", path=str(self.path), from_memory=held)


def _parse_legacy(data: bytes, path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The collections of a JSON store written by earlier versions (one JSON document)."""

    def corrupt(detail: str) -> DocStoreError:
        return DocStoreError(
            f"{path}: corrupt document store file ({detail}); it was not imported: restore "
            "it from a backup, or move it away and run `recsys catalog load` again"
        )

    try:
        parsed = json_util.loads(data, json_options=_JSON_OPTIONS)
    except json.JSONDecodeError as exc:
        raise corrupt(f"invalid JSON at line {exc.lineno}, column {exc.colno}") from exc
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise corrupt(str(exc)) from exc
    if not isinstance(parsed, dict) or parsed.get("format") != FILE_FORMAT:
        raise corrupt(f"not a {FILE_FORMAT} file")
    if parsed.get("version") != LEGACY_FILE_VERSION:
        raise corrupt(f"unsupported version {parsed.get('version')!r}")
    collections = parsed.get("collections")
    if not isinstance(collections, dict):
        raise corrupt("no collections")
    contents: dict[str, dict[str, dict[str, Any]]] = {}
    for name, docs in collections.items():
        if not isinstance(docs, list):
            raise corrupt(f"collection {name!r} is not a list")
        by_id: dict[str, dict[str, Any]] = {}
        for n, doc in enumerate(docs):
            if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str):
                raise corrupt(f"document {n} of {name!r} has no string _id")
            by_id[doc["_id"]] = doc
        contents[name] = by_id
    return contents


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
        if isinstance(self.database, EmbeddedDatabase):
            self.database.close()

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
        """Group many upserts: the embedded store writes them in one transaction.

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
        settings.stores.mongo_uri,
        settings.stores.mongo_db,
        settings.docstore_path,
        store_timeout_ms=settings.serving.store_timeout_ms,
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
