"""``recsys catalog load`` / ``status``: every line upserted or quarantined with its bytes."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.simulation.history import simulate_history
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings
from recsys_serving.stores.docstore import open_docstore
from support import ndjson_lines

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    for var in ("RECSYS_LAKE_URI", "RECSYS_MONGO_URI", "RECSYS_MONGO_DB"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path / "home"


def _store(home: Path):  # type: ignore[no-untyped-def]
    return open_docstore(Settings(home=home, mongo_uri=None), refresh_seconds=0)


def test_simulator_catalogue_loads_without_rejects(home: Path, tmp_path: Path) -> None:
    sim = simulate_history(
        tmp_path / "sim",
        n_users=300,
        n_items=200,
        n_categories=8,
        days=2,
        n_events=50,
        seed=5,
        end=datetime(2024, 6, 1, tzinfo=UTC),
    )
    args = ["catalog", "load", "--items", str(sim.items_path), "--users", str(sim.users_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "items 200 read: 200 inserted, 0 updated, 0 unchanged, 0 rejected" in result.output
    assert "users 300 read: 300 inserted, 0 updated, 0 unchanged, 0 rejected" in result.output

    store = _store(home)
    first = orjson.loads(sim.items_path.read_bytes().splitlines()[0])
    doc = store.get_items([first["item_id"]])[first["item_id"]]
    assert doc["title"] == first["title"] and doc["categories"] == first["categories"]
    assert doc["published_at"] == datetime.fromisoformat(first["published_at"])
    assert doc["price"] == first["price"] and doc["brand"] == first["brand"]

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "items 200 read: 0 inserted, 0 updated, 200 unchanged, 0 rejected" in again.output

    status = runner.invoke(app, ["catalog", "status"])
    assert status.exit_code == 0, status.output
    assert "items: 200 documents, 0 lines quarantined" in status.output
    assert f"catalog {(home / 'docstore' / 'recsys.sqlite').as_uri()}: 200 items, 300 users" in (
        status.output
    )


ITEM_LINES: list[bytes] = [
    b'{"item_id": "i1", "title": "Good", "categories": ["a", "b"], "colour": "red"}',
    b'{"item_id": "i2", "tit',
    b'{"item_id": "i3", "title": 17}',
    b'\xff\xfe{"item_id": "i4"}',
    b'{"title": "no id", "categories": ["a"]}',
    b'{"item_id": 42, "categories": "solo", "published_at": 1717200000}',
    b'["not", "an", "object"]',
    b'{"item_id": "i8", "published_at": "2024-06-01T10:00:00"}',
    b'{"item_id": "i9", "categories": [["nested"]]}',
    b'{"item_id": "i10", "meta": {"$where": "1"}}',
    b'{"item_id": "i11", "published_at": "2024-06-01"}',
]


def test_bad_lines_are_reported_by_file_and_line_and_quarantined(
    home: Path, tmp_path: Path
) -> None:
    items = tmp_path / "items.ndjson"
    items.write_bytes(b"\n".join(ITEM_LINES[:6]) + b"\n\n" + b"\n".join(ITEM_LINES[6:]) + b"\n")
    users = tmp_path / "users.ndjson.gz"
    users.write_bytes(gzip.compress(b'{"user_id": 7, "tier": "gold"}\n{"tier": "none"}\n'))
    result = runner.invoke(app, ["catalog", "load", "--items", str(items), "--users", str(users)])
    assert result.exit_code == 0, result.output
    out = result.output
    # The blank line 7 is not a record; the lines after it keep their real numbers.
    assert f"{items}:2: truncated: truncated JSON" in out
    assert f"{items}:3: schema: title: Input should be a valid string" in out
    assert f"{items}:4: not_utf8: not valid UTF-8 (byte 0)" in out
    assert f"{items}:5: schema: item_id: required field missing" in out
    assert f"{items}:8: not_an_object: an item must be a JSON object, got an array" in out
    assert f"{items}:9: schema: published_at: RFC 3339 timestamp must carry an offset" in out
    assert f"{items}:10: schema: categories: element 0 must be a non-empty string" in out
    assert f"{items}:11: schema: meta.$where: field names must not start with '$'" in out
    assert f"{users}:2: schema: user_id: required field missing" in out
    assert (
        "items 11 read: 3 inserted, 0 updated, 0 unchanged, 8 rejected "
        "(not_an_object 1, not_utf8 1, schema 5, truncated 1)"
    ) in out
    assert "users 2 read: 1 inserted, 0 updated, 0 unchanged, 1 rejected" in out

    lake = LocalLake(home / "lake")
    quarantined = ndjson_lines(lake, "quarantine/catalog/items/")
    line_of = {
        f"{items}:{n}": raw
        for n, raw in zip([1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12], ITEM_LINES, strict=True)
    }
    assert {q["at"] for q in quarantined} == {f"{items}:{n}" for n in (2, 3, 4, 5, 8, 9, 10, 11)}
    for record in quarantined:
        kept = (
            base64.b64decode(record["raw_b64"]) if "raw_b64" in record else record["raw"].encode()
        )
        assert kept == line_of[record["at"]]
        assert record["source"] == "catalog" and record["reason"] and record["code"]
    (user_q,) = ndjson_lines(lake, "quarantine/catalog/users/")
    assert user_q["at"] == f"{users}:2" and user_q["raw"] == '{"tier": "none"}'

    store = _store(home)
    good = store.get_items(["i1", "42", "i11"])
    assert good["i1"]["colour"] == "red"
    assert good["42"]["categories"] == ["solo"]
    assert good["42"]["published_at"] == datetime(2024, 6, 1, tzinfo=UTC)
    assert good["i11"]["published_at"] == datetime(2024, 6, 1, tzinfo=UTC)
    assert store.get_user("7") == {"_id": "7", "user_id": "7", "tier": "gold"}
    assert store.counts() == {"items": 3, "users": 1}

    status = runner.invoke(app, ["catalog", "status"])
    assert "items: 3 documents, 8 lines quarantined" in status.output
    assert "users: 1 documents, 1 lines quarantined" in status.output


def test_missing_file_loads_nothing(home: Path, tmp_path: Path) -> None:
    users = tmp_path / "users.ndjson"
    users.write_bytes(b'{"user_id": "u1"}\n')
    missing = tmp_path / "nope.ndjson"
    result = runner.invoke(app, ["catalog", "load", "--items", str(missing), "--users", str(users)])
    assert result.exit_code == 1
    assert f"{missing}: no such file" in result.output
    assert _store(home).counts() == {"items": 0, "users": 0}

    nothing = runner.invoke(app, ["catalog", "load"])
    assert nothing.exit_code == 1 and "--items FILE and/or --users FILE" in nothing.output


def test_cut_off_gzip_keeps_what_was_read_and_fails(home: Path, tmp_path: Path) -> None:
    body = b"".join(
        orjson.dumps({"user_id": f"u{n}", "pad": "x" * 200}) + b"\n" for n in range(3000)
    )
    packed = gzip.compress(body)
    cut = tmp_path / "users.ndjson.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    result = runner.invoke(app, ["catalog", "load", "--users", str(cut)])
    assert result.exit_code == 1
    assert f"{cut}: cannot read past line" in result.output
    loaded = _store(home).counts()["users"]
    assert 0 < loaded < 3000
    assert f"users {loaded:,} read: {loaded:,} inserted" in result.output


def test_batches_larger_and_smaller_than_the_file(home: Path, tmp_path: Path) -> None:
    items = tmp_path / "items.ndjson"
    items.write_bytes(
        b"".join(orjson.dumps({"item_id": f"i{n}", "categories": ["c"]}) + b"\n" for n in range(25))
    )
    for batch in ("7", "1000"):
        result = runner.invoke(
            app, ["catalog", "load", "--items", str(items), "--batch-size", batch]
        )
        assert result.exit_code == 0, result.output
    assert "items 25 read: 0 inserted, 0 updated, 25 unchanged, 0 rejected" in result.output
    assert [d["_id"] for d in _store(home).iter_items()] == sorted(f"i{n}" for n in range(25))
