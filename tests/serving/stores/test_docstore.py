"""The document store: one API over the embedded SQLite store and MongoDB (pymongo).

The MongoDB code path runs against ``mongomock.MongoClient`` as the pymongo double, and
against a real server when ``RECSYS_MONGO_URI`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mongomock
import pytest
from bson import json_util
from pymongo.errors import PyMongoError
from structlog.testing import capture_logs

from recsys_serving.settings import Settings
from recsys_serving.stores import docstore
from recsys_serving.stores.docstore import (
    READ_BUSY_SECONDS,
    DocStore,
    DocStoreError,
    EmbeddedDatabase,
    StoreUnavailable,
    UpsertResult,
    connect_docstore,
    open_docstore,
    redact_uri,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2024, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)


def _item(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "item_id": f"i{n:03d}",
        "title": f"Item {n}",
        "categories": ["a", "b"] if n % 2 else ["b"],
        "published_at": T0,
        "price": n + 0.5,
        **extra,
    }


def _embedded(path: Path, refresh_seconds: float = 0.0) -> DocStore:
    return connect_docstore(None, "recsys", path, refresh_seconds=refresh_seconds)


@pytest.fixture(params=["embedded", "mongomock", "mongodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DocStore]:
    if request.param == "embedded":
        yield _embedded(tmp_path / "docstore" / "recsys.sqlite")
        return
    if request.param == "mongomock":
        request.getfixturevalue("mongomock_bulk_compat")
        client = mongomock.MongoClient(tz_aware=True)
        with DocStore.from_client(
            client, "recsys", uri="mongodb://app:s3cret@db.example:27017/?authSource=admin"
        ) as st:
            yield st
        return
    uri = os.environ.get("RECSYS_MONGO_URI", "")
    if not uri.startswith("mongodb"):
        pytest.skip("set RECSYS_MONGO_URI=mongodb://... to run against a real MongoDB")
    db = f"recsys_test_{uuid.uuid4().hex[:8]}"
    st = connect_docstore(uri, db, tmp_path / "unused.json", store_timeout_ms=2000)
    try:
        yield st
    finally:
        with contextlib.suppress(PyMongoError):  # a down server already failed the test
            st._client.drop_database(db)
        st.close()


# ------------------------------------------------------------- every backend, same API
def test_upsert_get_iter_counts(store: DocStore) -> None:
    assert store.upsert_items([_item(n) for n in range(5)]) == UpsertResult(inserted=5)
    assert store.upsert_users([{"user_id": "u1", "country": "DE"}]) == UpsertResult(inserted=1)
    assert store.counts() == {"items": 5, "users": 1}

    user = store.get_user("u1")
    assert user == {"_id": "u1", "user_id": "u1", "country": "DE"}
    assert store.get_user("nobody") is None

    got = store.get_items(["i003", "i001", "missing", "i001"])
    assert set(got) == {"i001", "i003"}
    assert got["i001"]["published_at"] == T0  # tz-aware UTC, milliseconds kept
    assert got["i001"]["categories"] == ["a", "b"] and got["i001"]["price"] == 1.5
    assert store.get_items([]) == {}

    ids = [d["_id"] for d in store.iter_items(batch_size=2)]
    assert ids == [f"i{n:03d}" for n in range(5)]
    assert [d["user_id"] for d in store.iter_users(batch_size=1)] == ["u1"]
    assert store.ping()


def test_upsert_replaces_whole_documents_and_counts_what_changed(store: DocStore) -> None:
    store.upsert_items([_item(1), _item(2, colour="red")])
    again = store.upsert_items([_item(1), _item(2), _item(3)])
    assert again == UpsertResult(inserted=1, updated=1, unchanged=1)
    assert "colour" not in store.get_items(["i002"])["i002"]  # replaced, not merged
    # The same id twice in one call: the last one wins, and both are accounted for.
    twice = store.upsert_items([_item(4, v=1), _item(4, v=2)])
    assert twice == UpsertResult(inserted=1, updated=1) and twice.written == 2
    assert store.get_items(["i004"])["i004"]["v"] == 2


def test_returned_documents_are_copies(store: DocStore) -> None:
    store.upsert_items([_item(1)])
    doc = store.get_items(["i001"])["i001"]
    doc["categories"].append("mutated")
    doc["title"] = "mutated"
    fresh = store.get_items(["i001"])["i001"]
    assert fresh["categories"] == ["a", "b"] and fresh["title"] == "Item 1"


def test_stored_values_are_what_mongodb_gives_back(store: DocStore) -> None:
    categories = ["a"]
    naive = datetime(2024, 1, 2, 3, 4, 5, 678901)
    store.upsert_items([{"item_id": "i1", "categories": categories, "published_at": naive}])
    categories.append("changed by the caller afterwards")
    doc = store.get_items(["i1"])["i1"]
    assert doc["categories"] == ["a"]
    assert doc["published_at"] == datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def test_queries_beyond_id_use_mongodb_semantics(store: DocStore) -> None:
    store.upsert_items([_item(n) for n in range(6)])
    with_a = sorted(d["_id"] for d in store.items.find({"categories": "a"}))
    assert with_a == ["i001", "i003", "i005"]
    assert store.items.count_documents({"price": {"$gte": 3}}) == 3


def test_documents_need_a_string_id(store: DocStore) -> None:
    with pytest.raises(ValueError, match="item_id"):
        store.upsert_items([{"title": "no id"}])
    with pytest.raises(ValueError, match="differs"):
        store.upsert_users([{"_id": "x", "user_id": "y"}])


# ---------------------------------------------------------------------- embedded only
def test_two_instances_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "recsys.sqlite"
    writer, reader = _embedded(path), _embedded(path)
    assert reader.get_user("u1") is None
    writer.upsert_users([{"user_id": "u1", "n": 1}])
    assert reader.get_user("u1") == {"_id": "u1", "user_id": "u1", "n": 1}
    reader.upsert_users([{"user_id": "u2"}])  # the reader's write keeps the writer's
    writer.upsert_users([{"user_id": "u1", "n": 2}])
    assert reader.counts() == {"items": 0, "users": 2}
    assert reader.get_user("u1")["n"] == 2


def _statements(database: EmbeddedDatabase) -> list[str]:
    """The SQL the calling thread's read connection runs from now on."""
    run: list[str] = []
    with database._reading() as conn:
        conn.set_trace_callback(run.append)
    return run


def test_a_commit_is_seen_at_once_and_lookups_are_primary_key_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why a lookup does not grow with the store (bench/docstore.py measures it): the
    reader never reloads anything; each call is one primary-key search in SQLite, and
    the file itself is only stat'ed (to notice a deletion) once per ``refresh_seconds``."""
    clock = [1000.0]  # a clock the test moves: twenty seconds of reads in no time
    monkeypatch.setattr(docstore, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    path = tmp_path / "recsys.sqlite"
    writer = _embedded(path)
    writer.upsert_users({"user_id": f"u{n:04d}", "device": "mobile"} for n in range(2000))
    writer.upsert_items([_item(n) for n in range(5)])
    reader = _embedded(path, refresh_seconds=1.0)  # as the server opens it
    assert reader.get_user("u0000") is not None
    database = reader.database
    assert isinstance(database, EmbeddedDatabase)
    stat, opened = database._stat_identity, database._open_file
    stats: list[float] = []
    opens: list[float] = []
    monkeypatch.setattr(database, "_stat_identity", lambda: stats.append(clock[0]) or stat())
    monkeypatch.setattr(database, "_open_file", lambda: opens.append(clock[0]) or opened())
    run = _statements(database)
    for n in range(2000):
        clock[0] += 0.01
        assert reader.get_user(f"u{n:04d}") == {
            "_id": f"u{n:04d}",
            "user_id": f"u{n:04d}",
            "device": "mobile",
        }
    assert 18 <= len(stats) <= 21 and not opens  # one stat per simulated second
    writer.upsert_users([{"user_id": "late"}])  # another process commits...
    assert reader.get_user("late") == {"_id": "late", "user_id": "late"}  # ...seen at once
    assert set(reader.get_items(["i003", "i001"])) == {"i001", "i003"}
    assert [d["_id"] for d in reader.iter_items(batch_size=2)][-1] == "i004"

    with sqlite3.connect(path) as conn:
        plans = {
            sql: " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in set(run)
            if sql.startswith("SELECT")
        }
    assert len(plans) >= 3  # the lookup, the $in and the keyset page
    for sql, plan in plans.items():
        assert "USING PRIMARY KEY" in plan and "SCAN" not in plan, (sql, plan)


def test_a_write_in_progress_blocks_no_reader(tmp_path: Path) -> None:
    path = tmp_path / "recsys.sqlite"
    writer, reader = _embedded(path), _embedded(path)
    writer.upsert_users([{"user_id": "u1", "v": 1}])
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def long_load() -> None:
        with writer.batch():
            writer.upsert_users([{"user_id": "u1", "v": 2}, {"user_id": "u2"}])
            assert writer.get_user("u1")["v"] == 2  # the session sees its own writes
            inside.set()
            release.wait(30)  # a large load, still writing until the test lets it commit
        done.set()

    loading = threading.Thread(target=long_load)
    loading.start()
    assert inside.wait(10)
    started = time.perf_counter()
    # Another process (connection) and another thread of the writer's own process both
    # answer at once, from the last commit.
    assert reader.get_user("u1")["v"] == 1 and reader.get_user("u2") is None
    same_process: list[Any] = []
    other = threading.Thread(target=lambda: same_process.append(writer.get_user("u1")))
    other.start()
    other.join(10)
    assert same_process == [{"_id": "u1", "user_id": "u1", "v": 1}]
    assert time.perf_counter() - started < READ_BUSY_SECONDS
    release.set()
    assert done.wait(10)
    loading.join(10)
    assert reader.get_user("u1")["v"] == 2 and reader.get_user("u2") is not None


def test_file_is_sqlite_in_wal_mode_one_json_row_per_document(tmp_path: Path) -> None:
    path = tmp_path / "recsys.sqlite"
    store = _embedded(path)
    store.upsert_items([_item(1)])
    store.upsert_users([{"user_id": "u1"}])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT collection, _id, doc FROM documents ORDER BY 1").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta["format"] == "recsys-docstore" and meta["version"] == "2"
    assert [(c, i) for c, i, _ in rows] == [("items", "i001"), ("users", "u1")]
    doc = json_util.loads(rows[0][2], json_options=json_util.JSONOptions(tz_aware=True))
    assert doc["published_at"] == T0 and doc["categories"] == ["a", "b"]
    assert {p.name for p in tmp_path.iterdir()} <= {
        "recsys.sqlite",
        "recsys.sqlite-wal",
        "recsys.sqlite-shm",
        "recsys.sqlite.lock",
    }
    synchronous = store.database._conn.execute("PRAGMA synchronous").fetchone()
    assert synchronous == (2,)  # FULL: every commit is fsynced


def test_a_failed_batch_leaves_the_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "recsys.sqlite"
    store = _embedded(path)
    store.upsert_users([{"user_id": "kept"}])
    with pytest.raises(RuntimeError), store.batch():
        store.upsert_users([{"user_id": "lost"}])
        raise RuntimeError("crash mid-load")
    assert store.get_user("lost") is None and store.get_user("kept") is not None
    assert _embedded(path).counts() == {"items": 0, "users": 1}


def _legacy_file(path: Path, collections: dict[str, list[dict[str, Any]]]) -> bytes:
    """A store file as versions before the SQLite store wrote it (``recsys-docstore`` 1)."""
    data = json_util.dumps(
        {"format": "recsys-docstore", "version": 1, "saved_at": "2026-01-01T00:00:00.000+00:00"}
        | {"collections": collections},
        json_options=json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True),
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_a_json_store_of_the_previous_version_is_imported_once(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, mongo_uri=None)
    legacy = settings.docstore_path.with_suffix(".json")
    assert legacy.name == "recsys.json"  # where earlier versions kept it
    item = {"_id": "i001", **_item(1)}
    data = _legacy_file(legacy, {"items": [item], "users": [{"_id": "u1", "user_id": "u1"}]})
    with capture_logs() as logs:
        store = open_docstore(settings, refresh_seconds=0)
        assert store.counts() == {"items": 1, "users": 1}
    assert store.get_items(["i001"])["i001"] == item  # datetimes and all
    imported = [e for e in logs if e["event"] == "docstore_imported"]
    assert len(imported) == 1 and imported[0]["items"] == 1 and imported[0]["users"] == 1
    assert not legacy.exists()
    assert legacy.with_name("recsys.json.imported").read_bytes() == data  # kept, as it was
    # A stale copy put back later is never imported over newer data.
    store.upsert_users([{"user_id": "u2"}])
    _legacy_file(legacy, {"users": [{"_id": "u1", "user_id": "u1", "stale": True}]})
    again = open_docstore(settings, refresh_seconds=0)
    assert again.counts() == {"items": 1, "users": 2} and "stale" not in again.get_user("u1")
    assert legacy.exists()


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"format": "recsys-docstore", "version": 1, "collections": {"users": [', "line 1"),
        (b'{"hello": "world"}', "not a recsys-docstore file"),
        (b'{"format": "recsys-docstore", "version": 9, "collections": {}}', "version 9"),
        (b'{"format": "recsys-docstore", "version": 1, "collections": {"u": [{}]}}', "no string"),
        (b"\xff\xfe\x00", "corrupt"),
    ],
)
def test_a_corrupt_json_store_is_a_clear_error_and_never_replaced(
    tmp_path: Path, content: bytes, detail: str
) -> None:
    legacy = tmp_path / "recsys.json"
    legacy.write_bytes(content)
    store = _embedded(tmp_path / "recsys.sqlite")
    with pytest.raises(DocStoreError) as err:
        store.get_user("u1")
    assert str(legacy) in str(err.value) and detail in str(err.value)
    assert "corrupt document store file" in str(err.value)
    assert store.ping() is False
    with pytest.raises(DocStoreError, match="corrupt"):
        store.upsert_users([{"user_id": "u1"}])  # never start empty over what we cannot read
    assert legacy.read_bytes() == content
    _legacy_file(legacy, {"users": [{"_id": "u1", "user_id": "u1"}]})
    assert _embedded(tmp_path / "recsys.sqlite").get_user("u1") is not None  # once repaired


@pytest.mark.parametrize(
    "content", [b"not a database" * 100, b"SQLite format 3\x00" + b"\x07" * 600]
)
def test_a_corrupt_sqlite_file_is_a_clear_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "recsys.sqlite"
    path.write_bytes(content)
    store = _embedded(path)
    with pytest.raises(DocStoreError) as err:
        store.get_user("u1")
    assert str(path) in str(err.value) and "corrupt document store file" in str(err.value)
    assert store.ping() is False and "corrupt" in (store.last_error or "")
    with pytest.raises(DocStoreError, match="corrupt"):
        store.upsert_users([{"user_id": "u1"}])
    assert path.read_bytes() == content


def _run_python(code: str, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "RECSYS_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("RECSYS_MONGO_URI", None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_another_process_sees_writes_both_ways(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, mongo_uri=None)
    store = open_docstore(settings, refresh_seconds=0)
    store.upsert_items([_item(7)])
    child = _run_python(
        """
        import json
        from recsys_serving.settings import Settings
        from recsys_serving.stores.docstore import open_docstore
        store = open_docstore(Settings())
        doc = store.get_items(["i007"])["i007"]
        store.upsert_users([{"user_id": "from-child", "pid": 1}])
        print(json.dumps({"title": doc["title"], "published_at": doc["published_at"].isoformat()}))
        """,
        tmp_path,
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out) == {"title": "Item 7", "published_at": T0.isoformat()}
    assert store.get_user("from-child") == {"_id": "from-child", "user_id": "from-child", "pid": 1}


def test_concurrent_writer_processes_lose_no_update(tmp_path: Path) -> None:
    writers, rounds = 4, 15
    procs = [
        _run_python(
            f"""
            from recsys_serving.settings import Settings
            from recsys_serving.stores.docstore import open_docstore
            store = open_docstore(Settings())
            for r in range({rounds}):
                store.upsert_users([{{"user_id": f"w{w}-r{{r}}-{{k}}"}} for k in range(3)])
            """,
            tmp_path,
        )
        for w in range(writers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = open_docstore(Settings(home=tmp_path, mongo_uri=None))
    assert store.counts()["users"] == writers * rounds * 3


def test_two_reader_processes_see_consistent_profiles_while_another_writes(
    tmp_path: Path,
) -> None:
    """Two processes read as serving workers do (``open_docstore(Settings())``) while a
    third rewrites every profile 20 times: no reader errs or waits, each sees whole
    documents, and the version it sees never goes back."""
    users, versions = 100, 20
    store = open_docstore(Settings(home=tmp_path, mongo_uri=None))
    store.upsert_users({"user_id": f"u{n:03d}", "v": 0, "pad": "x" * 50} for n in range(users))
    reader_code = f"""
        import json, sys, time
        from recsys_serving.settings import Settings
        from recsys_serving.stores.docstore import open_docstore
        store = open_docstore(Settings())
        seen, reads, slowest, started = {{}}, 0, 0.0, time.monotonic()
        print("ready", flush=True)
        while min(seen.values(), default=-1) < {versions} or len(seen) < {users}:
            assert time.monotonic() - started < 120, "the writer's last version never showed"
            for n in range({users}):
                t = time.perf_counter()
                doc = store.get_user(f"u{{n:03d}}")
                slowest = max(slowest, time.perf_counter() - t)
                reads += 1
                assert doc["pad"] == "x" * 50 and doc["v"] >= seen.get(n, 0), doc
                seen[n] = doc["v"]
        print(json.dumps({{"reads": reads, "slowest": slowest}}))
        """
    readers = [_run_python(reader_code, tmp_path) for _ in range(2)]
    for proc in readers:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    writer = _run_python(
        f"""
        from recsys_serving.settings import Settings
        from recsys_serving.stores.docstore import open_docstore
        store = open_docstore(Settings())
        for v in range(1, {versions} + 1):
            store.upsert_users(
                {{"user_id": f"u{{n:03d}}", "v": v, "pad": "x" * 50}} for n in range({users})
            )
        """,
        tmp_path,
    )
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    for proc in readers:
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        result = json.loads(out)
        assert result["reads"] >= users and result["slowest"] < READ_BUSY_SECONDS


def test_embedded_store_rejects_operations_it_does_not_emulate(tmp_path: Path) -> None:
    from pymongo import InsertOne, ReplaceOne

    db = EmbeddedDatabase(tmp_path / "x.sqlite")
    with pytest.raises(TypeError, match="ReplaceOne"):
        db["items"].bulk_write([InsertOne({"_id": "a"})])
    with pytest.raises(ValueError, match="by _id only"):
        db["items"].bulk_write([ReplaceOne({"title": "t"}, {"title": "u"}, upsert=True)])
    with pytest.raises(ValueError, match="string _id"):
        db["items"].bulk_write([ReplaceOne({"_id": 5}, {"title": "u"}, upsert=True)])
    with pytest.raises(ValueError, match="sorts by _id only"):
        list(db["items"].find({}, sort=[("title", 1)]))
    with pytest.raises(DocStoreError, match=r"name it \.sqlite"):
        EmbeddedDatabase(tmp_path / "x.json")


# ------------------------------------------------------------------ the MongoDB backend
def test_mongodb_backend_creates_indexes_and_hides_credentials(
    mongomock_bulk_compat: None,
) -> None:
    store = DocStore.from_client(
        mongomock.MongoClient(tz_aware=True),
        "recsys",
        uri="mongodb://app:s3cret@db1:27017,db2:27017/recsys?authSource=admin&tls=true",
    )
    store.upsert_items([_item(1)])
    assert {"categories_1", "published_at_1"} <= set(store.items.index_information())
    assert store.uri == "mongodb://db1:27017,db2:27017/recsys"
    assert store.backend == "mongodb" and not store.embedded


def test_unreachable_mongodb_fails_fast(closed_localhost_port: int, tmp_path: Path) -> None:
    store = connect_docstore(
        f"mongodb://127.0.0.1:{closed_localhost_port}/",
        "recsys",
        tmp_path / "unused.json",
        store_timeout_ms=50,
    )
    with store:
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            store.get_user("u1")
        assert time.perf_counter() - started < 1.0
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            store.get_items(["i1"])
        assert store.ping() is False
        assert time.perf_counter() - started < 1.0
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):  # loads wait for server selection, not 30 s
            store.upsert_users([{"user_id": "u1"}])
        assert time.perf_counter() - started < 3.0


def test_silent_mongodb_is_a_timeout(tmp_path: Path) -> None:
    """A server that accepts connections but never answers (overloaded, half-dead)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        store = connect_docstore(
            f"mongodb://127.0.0.1:{port}/", "recsys", tmp_path / "unused.json", store_timeout_ms=50
        )
        with store:
            started = time.perf_counter()
            with pytest.raises(StoreUnavailable) as err:
                store.get_user("u1")
            assert time.perf_counter() - started < 1.0
            assert err.value.timeout
            assert store.ping() is False


def test_uri_schemes_and_redaction(tmp_path: Path) -> None:
    embedded = connect_docstore("mongomock://", "recsys", tmp_path / "d.sqlite")
    assert embedded.embedded and embedded.uri == (tmp_path / "d.sqlite").as_uri()
    with pytest.raises(DocStoreError, match="unsupported RECSYS_MONGO_URI") as err:
        connect_docstore("postgres://u:pw@h/db", "recsys", tmp_path / "d.sqlite")
    assert "pw" not in str(err.value)
    assert redact_uri("mongodb+srv://u:p%40ss@cluster.example/db?x=y") == (
        "mongodb+srv://cluster.example/db"
    )
    assert redact_uri("mongodb://h:27017") == "mongodb://h:27017"


# ------------------------------------------------------------ a deleted embedded file
def test_a_deleted_file_is_a_loud_loss_never_a_silently_empty_store(tmp_path: Path) -> None:
    path = tmp_path / "recsys.sqlite"
    store = _embedded(path)
    store.upsert_users([{"user_id": f"u{n}"} for n in range(3)])
    store.upsert_items([_item(1)])
    assert store.ping() is True and store.last_error is None
    with capture_logs() as logs:
        path.unlink()
        assert store.get_user("u1") == {"_id": "u1", "user_id": "u1"}  # the file it holds
        assert store.counts() == {"items": 1, "users": 3}
        assert store.ping() is False
        assert store.ping() is False
    assert store.last_error is not None
    assert str(path) in store.last_error and "deleted" in store.last_error
    assert "(1 items, 3 users)" in store.last_error and "recsys catalog load" in store.last_error
    missing = [e for e in logs if e["event"] == "docstore_file_missing"]
    assert len(missing) == 1 and missing[0]["log_level"] == "error"  # once, not every second
    assert missing[0]["held"] == {"items": 1, "users": 3}
    # The deleted file's WAL must never be paired with a new file at the same path.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recsys.sqlite.lock"]

    with capture_logs() as logs:  # a write recreates it from what it holds, loudly
        store.upsert_users([{"user_id": "u9"}])
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["docstore_file_recreated"]
    assert _embedded(path).counts() == {"items": 1, "users": 4}
    assert store.ping() is True and store.last_error is None


def test_a_file_deleted_while_a_writer_waits_for_the_lock_loses_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for SQLite's write lock can be long (a load in another process); a
    commit into a file deleted meanwhile would vanish, so the writer checks after."""
    path = tmp_path / "recsys.sqlite"
    store = _embedded(path)
    store.upsert_users([{"user_id": "u1"}])
    database = store.database
    assert isinstance(database, EmbeddedDatabase)
    refresh, deleted = database.refresh, []

    def refresh_then_delete(force: bool = False) -> None:
        refresh(force)
        if not deleted:  # deleted between the check and BEGIN IMMEDIATE, once
            deleted.append(path)
            path.unlink()

    monkeypatch.setattr(database, "refresh", refresh_then_delete)
    with capture_logs() as logs:
        store.upsert_users([{"user_id": "u2"}])
    assert deleted and "docstore_file_recreated" in [e["event"] for e in logs]
    assert _embedded(path).counts() == {"items": 0, "users": 2}


def test_a_restored_file_is_picked_up_and_readiness_comes_back(tmp_path: Path) -> None:
    from serving_support import serving_client

    path = tmp_path / "recsys.sqlite"
    store = _embedded(path)
    store.upsert_users([{"user_id": "u1"}])
    backup = tmp_path / "backup.sqlite"  # another version, as a backup would be
    other = _embedded(tmp_path / "other" / "recsys.sqlite")
    other.upsert_users([{"user_id": "u2"}])
    with contextlib.closing(sqlite3.connect(backup)) as dest:
        other.database._conn.backup(dest)  # SQLite's online backup, safe while in use
    with serving_client(Settings(home=tmp_path / "home"), docstore=store) as client:
        body = client.get("/readyz").json()
        assert body["checks"]["docstore"] is True and "reasons" not in body
        path.unlink()
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["docstore"] is False
        assert "the document store file was deleted" in r.json()["reasons"]["docstore"]
        backup.rename(path)  # restored
        body = client.get("/readyz").json()
        assert body["checks"]["docstore"] is True and "reasons" not in body
    assert store.get_user("u2") is not None and store.get_user("u1") is None
