"""bench/datasets.py's ``ml100k`` loader: the real MovieLens-100k log, converted to the
project's inputs from the recbole wheel in a local cache.

The wheel is faked here (a zip holding RecBole's atomic files at the wheel's paths), so
the conversion is checked without a network and without the licensed data.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import datasets

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "186\t302\t3\t891717742\n"
    "196\t1\t5\t881250900\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "242\tKolya\t1996\tComedy\n"
    "267\tunkonwn\tunkonwn\tunknown\n"
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
)
USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "186\t39\tF\texecutive\t00000\n"
    "196\t49\tM\twriter\t55105\n"
)


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
        for suffix, text in (("inter", INTER), ("item", ITEM), ("user", USER)):
            wheel.writestr(f"{datasets.ML100K_PREFIX}.{suffix}", text)
    monkeypatch.setenv("RECSYS_BENCH_CACHE", str(cache))
    return cache


def _rows(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_ml100k_converts_the_cached_wheel_to_recsys_inputs(
    fake_wheel: Path, tmp_path: Path
) -> None:
    info = datasets.generate("ml100k", "small", 1, tmp_path / "out")
    assert info["events"] == 3 and info["users"] == 2 and info["catalog_items"] == 4
    events = _rows(tmp_path / "out" / "events.ndjson")
    # Time order; integer epoch seconds; ratings as values.
    assert [(e["user_id"], e["item_id"], e["ts"], e["value"]) for e in events] == [
        ("196", "1", 881250900, 5.0),
        ("196", "242", 881250949, 3.0),
        ("186", "302", 891717742, 3.0),
    ]
    assert all(e["event_type"] == "rating" and isinstance(e["ts"], int) for e in events)
    items = {i["item_id"]: i for i in _rows(tmp_path / "out" / "items.ndjson")}
    assert items["302"]["categories"] == ["Crime", "Film-Noir", "Mystery", "Thriller"]
    assert items["302"]["published_at"] == "1997-01-01T00:00:00Z"
    assert items["1"]["title"] == "Toy Story"
    # A row of the dump without a usable year has no release date, not a made-up one.
    assert items["267"]["published_at"] is None
    users = {u["user_id"]: u for u in _rows(tmp_path / "out" / "users.ndjson")}
    assert users["196"] == {
        "user_id": "196",
        "age": 49,
        "gender": "M",
        "occupation": "writer",
        "zip": "55105",
    }
