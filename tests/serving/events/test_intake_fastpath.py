"""The compiled fast path (msgspec) and the pydantic contract agree, line by line.

The intake decides the common valid event with msgspec and sends every other line
through :class:`WeblogEvent`. These tests run the same lines through the intake
twice, once as shipped and once with the fast path switched off (every line through
the contract, which is what the intake did before), and require the same outcome:
the same accept/reject decision per line, the same reasons, the same landed bytes
per date, the same quarantine records. Property-based (hypothesis) over hostile and
odd values, plus a deterministic corpus built from the hostile probes of issue 12.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_inputs import PROBES, RED_HARMLESS, RED_HOSTILE

from recsys_serving.events import fastpath
from recsys_serving.events.intake import EventIntake, IntakeResult, RawEvent, RecentIds
from recsys_serving.events.schema import EVENT_TYPES, Limits, WeblogEvent, normalize
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings

NOW = 1_796_000_000.0  # the pinned clock of every comparison (2026-11-30)
LIMITS = Limits(now=NOW)
SETTINGS = Settings()
MAX_EVENT = SETTINGS.collector.max_event_bytes
# Many small lakes: in memory where the machine has a tmpfs (removing them from a
# busy disk costs more than the comparisons).
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _all_in_contract(lines: Any, limits: Limits, max_bytes: int) -> fastpath.FastBatch:
    return fastpath.FastBatch(rest=list(range(len(lines))))


@contextmanager
def _intake(fast: bool) -> Iterator[tuple[EventIntake, LocalLake]]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        lake = LocalLake(Path(tmp) / "lake")
        intake = EventIntake(lake, SETTINGS, writer_id="w")
        # fsync is what other tests check; here it would only make each example slow.
        with (
            mock.patch("recsys_serving.events.intake.time.time", return_value=NOW),
            mock.patch("recsys_serving.landing.os.fsync"),
        ):
            if fast:
                yield intake, lake
            else:
                with mock.patch.object(fastpath, "validate", _all_in_contract):
                    yield intake, lake


def _outcome(lake: LocalLake, results: list[IntakeResult]) -> dict[str, Any]:
    landed: dict[str, bytes] = {}
    quarantined: list[dict[str, Any]] = []
    for obj in sorted(lake.list("landing/"), key=lambda o: o.key):
        day = obj.key.split("date=")[1][:10]
        landed[day] = landed.get(day, b"") + lake.get_bytes(obj.key)
    for obj in sorted(lake.list("quarantine/intake/"), key=lambda o: o.key):
        for line in lake.get_bytes(obj.key).splitlines():
            record = orjson.loads(line)
            del record["received_at"]
            quarantined.append(record)
    return {
        "results": [r.as_dict() | {"days": sorted(r.days)} for r in results],
        "landed": landed,
        "quarantined": quarantined,
    }


def both_ways(batches: list[list[bytes]], collector: bool = False) -> tuple[dict, dict]:
    """The outcome of the batches through the shipped intake and the contract alone."""
    outcomes = []
    for fast in (True, False):
        with _intake(fast) as (intake, lake):
            results = []
            for n, lines in enumerate(batches):
                if collector:
                    events = [RawEvent(f"line {i}", raw) for i, raw in enumerate(lines, 1)]
                    results.append(intake.submit(events, "collector"))
                else:
                    results.append(
                        intake.submit_lines(lines, lambda i, n=n: f"f{n}:{i + 1}", "cli")
                    )
            intake.close()
            outcomes.append(_outcome(lake, results))
    return outcomes[0], outcomes[1]


def base(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "event_type": "view",
        "user_id": f"u{i}",
        "item_id": "i1",
        "ts": NOW - 3_600,
        **extra,
    }


# ------------------------------------------------------------------- what must be fast


def test_the_common_shapes_are_decided_by_the_fast_path() -> None:
    """Simulator lines (RFC 3339 ts), epoch ts, numeric ids, a context, escapes: all
    accepted by the fast path, with the bytes the contract would land."""
    lines = [
        b'{"event_id":"e000000001","event_type":"impression","user_id":"u009765",'
        b'"item_id":"i04612","ts":"2026-11-06T02:03:26.233Z","session_id":"s000000000",'
        b'"request_id":"r0000000000","position":1,"model_version":"logging-policy"}',
        orjson.dumps(base(1, value=4.5, event_type="rating")),
        orjson.dumps(base(2, user_id=17, item_id=2**63, ts=int(NOW))),
        orjson.dumps(base(3, context={"page": "home", "n": [1, 2.5, None], "d": {"x": True}})),
        orjson.dumps(base(4, ts="2026-11-29T10:00:00+01:00", session_id=None)),
        json.dumps(base(5, user_id='caf\u00e9 "q" \\ /')).encode(),  # escapes
        orjson.dumps(base(6, position=0, value=-1e12, model_version="")),
    ]
    fast = fastpath.validate(lines, LIMITS, MAX_EVENT)
    assert fast.rest == [] and fast.positions == list(range(len(lines)))
    for line, event in zip(lines, fast.events, strict=True):
        assert fastpath.encode_lines([event]) == _contract_line(line)


def _contract_line(line: bytes) -> bytes:
    event = WeblogEvent.model_validate(orjson.loads(line), context=LIMITS)
    return orjson.dumps(normalize(event)) + b"\n"


# ------------------------------------------------------------ corpus of hostile kinds

HOSTILE_VALUES: dict[str, list[bytes]] = {
    "ids": [
        b'""',
        b"true",
        b"1.5",
        b"1e30",
        b"-0",
        b"18446744073709551615",
        b"18446744073709551616",
        b"-9223372036854775809",
        b"null",
        b"[]",
        b'"a\\u0000b"',
        b'"a\\u001fb"',
        b'"a\x7fb"',
        b'"\\ud800"',
        b'"\\udc00\\ud800"',
        b'"\\ud83d\\ude00"',
        orjson.dumps("x" * 256),
        orjson.dumps("x" * 257),
        orjson.dumps("\U0001f600" * 256),
        b'"\xff"',
        b'"\\n"',
        b'" "',
    ],
    "event_type": [b'"VIEW"', b'"hover"', b'""', b"1", b"null", b'"view "', b'"cli\\u0063k"'],
    "ts": [
        b"0",
        b"-0.0",
        b"-1",
        b"1e308",
        b"1e400",
        b"NaN",
        b"Infinity",
        b"true",
        b"null",
        b'"soon"',
        b'""',
        b'"1700000000"',
        b'"2026-11-29T10:00:00"',
        b'"2026-11-29T10:00:00Z"',
        b'"2026-11-29t10:00:00z"',
        b'"2026-11-29 10:00:00Z"',
        b'" 2026-11-29T10:00:00Z "',
        b'"2026-11-29T10:00:00.1234567Z"',
        b'"2026-11-29T10:00:00.9999995Z"',
        b'"2026-11-29T10:00:00.123456789+01:00"',
        b'"2026-11-29T10:00:00+05:30:15"',
        b'"2026-11-29T10:00:60Z"',
        b'"2026-02-30T10:00:00Z"',
        b'"2026-11-29T10:00Z"',
        b'"2026-11-29T10:00:00,5Z"',
        b'"20261129T100000Z"',
        b'"2026-W48-1T10:00:00Z"',
        b'"9999-12-31T23:59:59Z"',
        b'"0001-01-01T00:00:00+01:00"',
        b'"1970-01-01T00:00:00Z"',
        b'"1969-12-31T23:59:59.999999Z"',
        str(NOW + 86_400).encode(),
        str(NOW + 86_400.000001).encode(),
        str(NOW * 1000).encode(),
        str(NOW - 0.0000001).encode(),
        b"1" + b"0" * 400,
        b"1" + b"0" * 25,
    ],
    "position": [b"-1", b"0", b"10000", b"10001", b"3.0", b"3.5", b"true", b'"3"', b"1e2"],
    "value": [
        b"5",
        b"-0",
        b"-0.0",
        b"1e12",
        b"1.0000000000001e12",
        b"-1e12",
        b"1e-7",
        b"1e308",
        b"-1e400",
        b"true",
        b'"5"',
        str(2**70).encode(),
        b"123456789.123456789",
    ],
    "model_version": [
        b'""',
        b'"v\\u0000"',
        b'"\\u001b[31m"',
        b'"v\x7f"',
        b"5",
        orjson.dumps("m" * 128),
        orjson.dumps("m" * 129),
    ],
    "context": [
        b"null",
        b"{}",
        b"[]",
        b'"x"',
        b'{"a":null}',
        b'{"n": 1' + b"0" * 30 + b"}",
        b'{"n": 1e400}',
        b'{"k":"a\\u0000b","\\u0000":1}',
        b'{"k":"\\ud800"}',
        b'{"a":1,"a":2}',
        b"{" + b'"a":{' * 31 + b"}" * 31 + b"}",
        b"{" + b'"a":{' * 32 + b"}" * 32 + b"}",
        b'{"l":' + b"[" * 40 + b"]" * 40 + b"}",
        orjson.dumps({"k": "v" * 8_180}),
        orjson.dumps({"k": "v" * 8_200}),
        b'{ "spaced" : [ 1 , 2 ] }',
    ],
}
FIELDS = {
    "ids": ("event_id", "user_id", "item_id", "session_id", "request_id"),
    "event_type": ("event_type",),
    "ts": ("ts",),
    "position": ("position",),
    "value": ("value",),
    "model_version": ("model_version",),
    "context": ("context",),
}


def with_field(i: int, field: str, value: bytes) -> bytes:
    """An event whose ``field`` holds exactly ``value`` (no serializer in between)."""
    fields = {k: v for k, v in base(i).items() if k != field}
    return orjson.dumps(fields)[:-1] + b',"' + field.encode() + b'":' + value + b"}"


def corpus() -> list[bytes]:
    lines = []
    i = 0
    for kind, values in HOSTILE_VALUES.items():
        for field in FIELDS[kind]:
            for value in values:
                i += 1
                lines.append(with_field(i, field, value))
                lines.append(orjson.dumps(base(f"ok{i}")))
    lines += [line for line, _ in PROBES.values()]
    lines += [*RED_HOSTILE.values(), *RED_HARMLESS.values()]
    lines += [
        orjson.dumps({k: v for k, v in base("missing").items() if k != "user_id"}),
        orjson.dumps(base("extra", colour="red")),
        orjson.dumps(base("dup-key"))[:-1] + b',"event_id":"e-dup-key-2"}',
        b"  " + orjson.dumps(base("padded")) + b"\t ",
        orjson.dumps(base("ok1")),  # a duplicate of an accepted id
        orjson.dumps(base("x" * (MAX_EVENT + 10))),
        b"{}",
        b"{",
        b"null",
        b"42",
        b'"s"',
        b"[1]",
        b'{"event_id":"a"} {"event_id":"b"}',
    ]
    return lines


def test_a_corpus_of_hostile_and_odd_lines_gets_the_same_outcome_both_ways() -> None:
    lines = corpus()
    fast_batch = fastpath.validate(lines, LIMITS, MAX_EVENT)
    # The comparison is not vacuous: the fast path decides most lines itself.
    assert len(fast_batch.positions) > len(lines) // 2
    random.Random(13).shuffle(lines)
    batches = [lines[i : i + 97] for i in range(0, len(lines), 97)]
    fast, contract = both_ways(batches)
    assert fast == contract
    assert sum(r["rejected"] for r in fast["results"]) > 100  # hostile lines were refused
    fast, contract = both_ways(batches[:3], collector=True)
    assert fast == contract


def test_each_accepted_line_lands_as_the_contract_would_write_it() -> None:
    lines = corpus()
    fast = fastpath.validate(lines, LIMITS, MAX_EVENT)
    for k, at in enumerate(fast.positions):
        expected = _contract_line(lines[at])
        assert fastpath.encode_lines([fast.events[k]]) == expected, lines[at]
        landed = orjson.loads(expected)
        assert (fast.event_ids[k], fast.ts[k]) == (landed["event_id"], landed["ts"])


# ---------------------------------------------------------------------- property based

_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), min_size=0, max_size=12)
_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_TEXT, children, max_size=3)
    ),
    max_leaves=8,
)
_TS_TEXT = st.builds(
    lambda y, mo, d, sep, h, mi, s, frac, tz: (
        f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}:{s:02d}{frac}{tz}"
    ),
    st.integers(1960, 2030),
    st.integers(0, 13),
    st.integers(0, 32),
    st.sampled_from(["T", "t", " ", "_"]),
    st.integers(0, 25),
    st.integers(0, 61),
    st.integers(0, 61),
    st.one_of(st.just(""), st.from_regex(r"\A[.,][0-9]{0,10}\Z")),
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+05:30", "-0800", "+05", "+05:30:15"]),
)
_IDS = st.one_of(
    _TEXT,
    st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=8),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.booleans(),
    st.floats(),
)
_FIELDS: dict[str, Any] = {
    "event_id": _IDS,
    "event_type": st.one_of(st.sampled_from([*EVENT_TYPES, "VIEW", "hover"]), _JSON_LEAF),
    "user_id": _IDS,
    "item_id": _IDS,
    "ts": st.one_of(
        st.floats(min_value=NOW - 5 * 86_400, max_value=NOW + 2 * 86_400),
        st.integers(min_value=-10, max_value=int(NOW) * 2),
        _TS_TEXT,
        _JSON_LEAF,
    ),
    "session_id": st.one_of(st.none(), _IDS),
    "request_id": st.one_of(st.none(), _IDS),
    "position": st.one_of(st.integers(-2, 10_002), st.floats(-1, 10_001), _JSON_LEAF),
    "value": st.one_of(st.floats(), st.integers(-(2**65), 2**65), _JSON_LEAF),
    "model_version": st.one_of(_TEXT, _JSON_LEAF),
    "context": st.one_of(_JSON, st.dictionaries(_TEXT, _JSON, max_size=4)),
}
_REQUIRED = ("event_id", "event_type", "user_id", "item_id", "ts")


@st.composite
def event_lines(draw: st.DrawFn) -> bytes:
    """A line that is valid more often than not, with hostile values mixed in."""
    if draw(st.integers(0, 30)) == 0:
        return draw(st.binary(min_size=1, max_size=40))
    event: dict[str, Any] = {
        "event_id": f"e{draw(st.integers(0, 40))}",
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "user_id": f"u{draw(st.integers(0, 9))}",
        "item_id": f"i{draw(st.integers(0, 9))}",
        "ts": draw(st.floats(min_value=NOW - 40 * 86_400, max_value=NOW)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True)):
        event[name] = draw(_FIELDS[name])
    if draw(st.integers(0, 12)) == 0:
        del event[draw(st.sampled_from(_REQUIRED))]
    if draw(st.integers(0, 15)) == 0:
        event[draw(_TEXT)] = draw(_JSON_LEAF)
    try:
        text = json.dumps(event, ensure_ascii=draw(st.booleans()))
    except (ValueError, RecursionError):
        return b"{}"
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(event_lines(), min_size=1, max_size=12), min_size=1, max_size=3))
def test_property_fast_and_contract_paths_agree(batches: list[list[bytes]]) -> None:
    fast, contract = both_ways(batches)
    assert fast == contract


@settings(max_examples=300, deadline=None)
@given(st.one_of(_TS_TEXT, _TEXT))
def test_property_timestamp_strings_parse_as_the_contract_parses_them(text: str) -> None:
    fast = fastpath._parse_texts({text})[text]
    contract = fastpath._contract_seconds(text)
    assert fast == contract or (math.isinf(fast) and math.isinf(contract))


# ------------------------------------------------------------------------- the pieces


def test_recent_ids_forget_the_oldest_first_in_bulk() -> None:
    recent = RecentIds(5)
    recent.add_batch(["a", "b", "c"])
    recent.add_batch(["d", "e", "f"])
    assert [x in recent for x in "abcdef"] == [False, True, True, True, True, True]
    recent.add_batch(["g"])
    assert "b" not in recent and {"c", "d", "e", "f", "g"} == {x for x in "abcdefg" if x in recent}
    recent.add_batch([str(i) for i in range(7)])
    assert len(recent) == 5 and {"2", "3", "4", "5", "6"} == {
        str(i) for i in range(7) if str(i) in recent
    }
    recent.add("6")  # already there: nothing changes
    recent.add("x")
    assert len(recent) == 5 and "2" not in recent and "x" in recent
    off = RecentIds(0)
    off.add_batch(["a"])
    assert "a" not in off


def test_duplicates_across_batches_and_within_are_refused_the_same_way() -> None:
    lines = [orjson.dumps(base(i % 7)) for i in range(30)]
    fast, contract = both_ways([lines[:10], lines[10:], lines[:5]])
    assert fast == contract
    assert [r["accepted"] for r in fast["results"]] == [7, 0, 0]
    assert fast["results"][1]["reasons"] == {"duplicate_event_id": 20}


def test_events_near_midnight_land_under_the_date_fromtimestamp_names() -> None:
    midnight = 1_795_996_800.0  # 2026-11-30T00:00:00Z
    stamps = [midnight - 1e-7, midnight - 4e-7, midnight - 6e-7, midnight - 1e-6, midnight]
    lines = [orjson.dumps(base(f"m{k}", ts=t)) for k, t in enumerate(stamps)]
    fast, contract = both_ways([lines])
    assert fast == contract
    expected: dict[str, list[str]] = {}
    for k, t in enumerate(stamps):  # the date the intake always used: fromtimestamp's
        expected.setdefault(datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d"), []).append(
            f"em{k}"
        )
    landed = {
        day: [orjson.loads(line)["event_id"] for line in data.splitlines()]
        for day, data in fast["landed"].items()
    }
    assert landed == expected and set(landed) == {"2026-11-29", "2026-11-30"}


@pytest.mark.parametrize("sync", [True, False])
def test_a_batch_written_without_sync_is_durable_after_close(sync: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = LocalLake(Path(tmp) / "lake")
        intake = EventIntake(lake, Settings(home=Path(tmp) / "home"), writer_id="w")
        lines = [orjson.dumps(base(i, ts=time.time() - 60)) for i in range(3)] + [b"{"]
        with mock.patch("os.fsync") as fsync:
            result = intake.submit_lines(lines, str, "cli", sync=sync)
            assert fsync.called is sync
            intake.close()
            assert fsync.called  # sealing fsyncs what was not yet
        assert (result.accepted, result.rejected) == (3, 1)
        landed = [o for o in lake.list("landing/") if "/_open/" not in o.key]
        assert sum(lake.get_bytes(o.key).count(b"\n") for o in landed) == 3


# ----------------------------------------------------------------- the bulk file reader


def _lines_as_before(data: bytes) -> list[tuple[int, bytes]]:
    """What ``recsys ingest`` read from an NDJSON file before (line iteration)."""
    out = []
    for n, line in enumerate(io.BytesIO(data), 1):
        raw = line.rstrip(b"\n").rstrip(b"\r")
        if raw.strip():
            out.append((n, raw))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"", b" ", b"\t", b"\r", b"\r\r", b"{}", b"{\r", b" {}", b"\x0b"]),
            st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
            st.builds(lambda k: b'{"k":%d}' % k, st.integers(0, 99)),
        ),
        max_size=40,
    ),
    st.booleans(),
    st.integers(1, 9),
    st.integers(1, 7),
)
def test_property_the_block_reader_yields_the_lines_line_iteration_did(
    lines: list[bytes], final_newline: bool, block: int, batch: int
) -> None:
    from recsys_assets import ingest

    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    got: list[tuple[int, bytes]] = []
    with mock.patch.object(ingest, "READ_BLOCK", block):
        for chunk, numbers in ingest._ndjson_batches(io.BufferedReader(io.BytesIO(data)), batch):
            assert 0 < len(chunk) <= batch
            got += zip(numbers, chunk, strict=True)
    assert got == _lines_as_before(data)


def test_the_block_reader_hands_over_every_whole_line_before_a_cut_gzip() -> None:
    from recsys_assets import ingest

    lines = [orjson.dumps(base(i)) for i in range(3_000)]
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    fh = gzip.GzipFile(fileobj=io.BytesIO(whole[: len(whole) * 3 // 4]))
    got: list[bytes] = []
    with pytest.raises(EOFError):
        for chunk, _ in ingest._ndjson_batches(fh):
            got += chunk
    assert 0 < len(got) < len(lines) and got == lines[: len(got)]


@pytest.mark.parametrize("name", ["a.ndjson", "a.ndjson.gz", "empty.ndjson"])
def test_count_lines_for_the_progress_bar_counts_newlines(tmp_path: Path, name: str) -> None:
    from recsys_assets.ingest import count_lines

    data = b"" if name.startswith("empty") else b"\xef\xbb\xbf{}\n\n{}\r\n" * 3 + b"{}"
    f = tmp_path / name
    f.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert count_lines(f) == data.count(b"\n")


# ------------------------------------------- bulk ingest: blocks validated in worker processes


_CLOCK = re.compile(r"\.\. \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _ingest_outcome(paths: list[Path], workers: int, block: int) -> dict[str, Any]:
    """``ingest_files`` into a fresh lake: landed bytes per date, quarantine records,
    the report; how many blocks landed as the workers validated them, and how many
    of those came back through shared memory."""
    from recsys_assets import ingest

    prevalidated: list[int] = []
    shared: list[bool] = []
    land = EventIntake.land_prevalidated

    def counted(self: EventIntake, batch: Any, *, sync: bool = True) -> Any:
        shared.append(all(isinstance(v, memoryview) for v in batch.landed.values()))
        result = land(self, batch, sync=sync)
        prevalidated.append(0 if result is None else result.accepted)
        return result

    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        lake = LocalLake(Path(tmp) / "lake")
        intake = EventIntake(lake, SETTINGS, writer_id="w")
        with (
            mock.patch("recsys_serving.landing.os.fsync"),
            mock.patch.object(ingest, "READ_BLOCK", block),
            mock.patch.object(EventIntake, "land_prevalidated", counted),
        ):
            report = ingest.ingest_files(paths, intake, workers=workers)
        outcome = _outcome(lake, [report.result])
    # The workers read the clock (the future bound) as the intake does, unpinned:
    # both runs name the bound they were judged by, which differs between them.
    for error in [*outcome["quarantined"], *outcome["results"][0]["errors"]]:
        error["reason"] = _CLOCK.sub(".. NOW", error["reason"])
    outcome["failed_files"] = report.failed_files
    outcome["rejected_files"] = report.rejected_files
    outcome["days"] = sorted(report.result.days)
    return {"outcome": outcome, "prevalidated": prevalidated, "shared": shared}


def _bulk_file_lines() -> list[bytes]:
    """Long clean stretches (what workers validate) broken by everything a block can
    hold that they must hand back: hostile lines, blank and CRLF lines, an id repeated
    within a block and one repeated blocks later, a padded line."""
    rng = random.Random(31)
    hostile = corpus()
    rng.shuffle(hostile)
    lines: list[bytes] = []
    for stretch in range(12):
        clean = [orjson.dumps(base(f"s{stretch}-{k}", ts=NOW - k * 7_919)) for k in range(600)]
        if stretch == 9:  # an id accepted several blocks before, amid clean lines
            clean.insert(300, orjson.dumps(base("s1-7")))
        lines += clean
        dirty = hostile[stretch * 25 : stretch * 25 + rng.randint(0, 6)]
        lines += dirty
        if stretch == 3:
            lines += [b"", b"   ", orjson.dumps(base("crlf")) + b"\r"]
        if stretch == 5:
            lines += [orjson.dumps(base("s5-3"))]  # within the stretch's blocks
    return lines


SHARED_MEMORY = hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir()


@pytest.mark.parametrize("kind", ["plain", "gz", "gz-cut", "plain-pickled"])
def test_a_bulk_ingest_in_worker_processes_lands_what_one_process_lands(
    tmp_path: Path, kind: str
) -> None:
    """The same file through the worker pool and through this process: the same
    landed bytes per date, quarantine records, counts, reasons and ``file:line``
    locators; and most blocks were decided by the workers (not a vacuous pass).
    Their bytes come back through shared memory, or pickled where there is none."""
    from recsys_assets import ingest

    data = b"\xef\xbb\xbf" + b"\n".join(_bulk_file_lines())
    data += b"\n" + orjson.dumps(base("last-no-newline"))
    if kind.startswith("plain"):
        path = tmp_path / "log.ndjson"
        path.write_bytes(data)
    else:
        path = tmp_path / "log.ndjson.gz"
        packed = gzip.compress(data)
        path.write_bytes(packed if kind == "gz" else packed[: len(packed) * 2 // 3])
    serial = _ingest_outcome([path], workers=0, block=16 << 10)
    with (
        mock.patch.object(ingest._Slots, "create", return_value=None)
        if kind.endswith("pickled")
        else nullcontext()
    ):
        pooled = _ingest_outcome([path], workers=2, block=16 << 10)
    assert pooled["outcome"] == serial["outcome"]
    assert serial["prevalidated"] == []
    landed_by_workers = sum(pooled["prevalidated"])
    if kind.endswith("pickled") or not SHARED_MEMORY:
        assert not any(pooled["shared"])
    else:
        assert all(pooled["shared"])
    results = pooled["outcome"]["results"][0]
    assert results["rejected"] >= (20 if kind != "gz-cut" else 5) and results["accepted"] > 1_000
    assert landed_by_workers > results["accepted"] // 2
    assert 0 in pooled["prevalidated"] or kind == "gz-cut"  # the repeated id's block
    if kind == "gz-cut":
        assert (
            pooled["outcome"]["failed_files"]
            and "cannot read" in (pooled["outcome"]["failed_files"][0])
        )
    else:
        assert results["received"] == len(_lines_as_before(data))
        reasons = results["reasons"]
        assert reasons["duplicate_event_id"] >= 2


def test_a_dead_worker_costs_time_not_events(tmp_path: Path) -> None:
    """A worker lost mid-file (killed, out of memory): its block and the rest of the
    file are validated in this process; nothing is lost or counted twice."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from recsys_assets import ingest

    path = tmp_path / "log.ndjson"
    path.write_bytes(b"\n".join(_bulk_file_lines()) + b"\n")
    submit = ingest._BlockPool._submit
    calls: list[int] = []

    def flaky(self: Any, block: bytes, slot: Any) -> Any:
        calls.append(len(block))
        if len(calls) == 4:
            lost: Future[Any] = Future()
            lost.set_exception(BrokenProcessPool("a worker died"))
            return lost
        return submit(self, block, slot)

    serial = _ingest_outcome([path], workers=0, block=16 << 10)
    with mock.patch.object(ingest._BlockPool, "_submit", flaky):
        pooled = _ingest_outcome([path], workers=2, block=16 << 10)
    assert pooled["outcome"] == serial["outcome"]
    # Blocks in flight when the loss showed still land; the rest go through here.
    assert len(calls) > 20 and 3 <= len(pooled["prevalidated"]) <= 3 + 5


def test_only_files_worth_the_start_up_go_to_worker_processes(tmp_path: Path) -> None:
    from recsys_assets import ingest

    small = tmp_path / "small.ndjson"
    small.write_bytes(orjson.dumps(base(1)) + b"\n")
    assert ingest._workers_for(small, None) == 0
    assert ingest._workers_for(small, 3) == 3 and ingest._workers_for(small, 0) == 0
    with (
        mock.patch.object(ingest, "PARALLEL_MIN_BYTES", 1),
        mock.patch.object(ingest.os, "sched_getaffinity", return_value={0, 1}),
    ):
        assert ingest._workers_for(small, None) == 2
    with mock.patch.object(ingest.os, "sched_getaffinity", return_value={0}):
        assert ingest._workers_for(small, None) == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "pidfd_open"), reason="Linux pidfd")
def test_a_worker_ends_when_the_ingest_process_is_killed() -> None:
    """SIGTERM runs no cleanup in the ingest: its workers (children of the fork
    server, not of the ingest) must still end instead of waiting for blocks forever."""
    import subprocess
    import sys

    ingest_process = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from recsys_assets.ingest import _worker_init\n"
            "from recsys_serving.settings import Settings\n"
            f"_worker_init(Settings(), {ingest_process.pid})\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
        assert worker.poll() is None
        ingest_process.terminate()
        ingest_process.wait(timeout=60)
        assert worker.wait(timeout=60) == 1
    finally:
        for process in (ingest_process, worker):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_write_error_stops_the_file_where_it_happens(tmp_path: Path) -> None:
    """A full disk is no read error: the blocks in flight are not landed after it."""
    import errno

    from recsys_assets import ingest

    path = tmp_path / "log.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(base(k)) for k in range(3_000)) + b"\n")
    calls: list[int] = []

    def full_disk(self: EventIntake, batch: Any, *, sync: bool = True) -> Any:
        calls.append(batch.received)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return IntakeResult(received=batch.received, accepted=batch.received)

    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        intake = EventIntake(LocalLake(Path(tmp) / "lake"), SETTINGS, writer_id="w")
        with (
            mock.patch.object(ingest, "READ_BLOCK", 16 << 10),
            mock.patch.object(EventIntake, "land_prevalidated", full_disk),
        ):
            report = ingest.ingest_files([path], intake, workers=2)
    assert len(calls) == 2
    assert report.failed_files and "No space left" in report.failed_files[0]
    assert report.result.received == calls[0]


@pytest.mark.skipif(not SHARED_MEMORY, reason="an anonymous file opened through /proc")
def test_a_worker_writes_a_block_only_into_the_slot_it_was_given() -> None:
    """Bytes to land go into the slot's part of the shared file; a slot they do not
    fit, or a descriptor that is no longer the shared file (the ingest gave the file
    up and the number was reused), leaves them in the batch, written nowhere. A
    block to validate crosses the other way through a slot."""
    from recsys_assets import ingest
    from recsys_serving.events.fastpath import Prevalidated

    def batch() -> Prevalidated:
        return Prevalidated(2, ["a", "b"], {"2026-01-01": b"one\n", "2026-01-02": b"two\n"})

    slots = ingest._Slots.create(3, 16)
    assert slots is not None
    try:
        first, second = slots.take(), slots.take()
        assert first is not None and second is not None and first.offset != second.offset
        placed = ingest._place(batch(), second)
        assert isinstance(placed, ingest._Placed) and placed.batch.landed == {}
        landed = slots.landed(placed, second).landed
        assert {day: bytes(view) for day, view in landed.items()} == batch().landed
        del landed

        small = ingest._Slot(second.handle, second.inode, first.offset, 7)
        assert ingest._place(batch(), small) == batch()
        other = ingest._Slot(second.handle, (-1, -1), first.offset, 16)
        assert ingest._place(batch(), other) == batch()
        stale = ingest._Slot("/proc/self/fd/999999", second.inode, first.offset, 16)
        assert ingest._place(batch(), stale) == batch()
        with open(second.handle, "rb") as fh:
            fh.seek(first.offset)
            assert fh.read(16) == bytes(16)  # nothing written where they pointed
        # A block inflated by the ingest goes to its worker through a slot as well.
        span = slots.put(first, b"line one\nline 2\n")
        assert span is not None and span.read() == b"line one\nline 2\n"
        assert slots.put(first, b"x" * 17) is None  # past the slot: sent pickled
        slots.give(first)
        slots.give(second)
        assert {slots.take(), slots.take(), slots.take(), slots.take()} - {None} == {
            ingest._Slot(second.handle, second.inode, k * 16, 16) for k in range(3)
        }
    finally:
        slots.close()


def test_the_workers_run_this_code_whatever_the_working_directory_holds(tmp_path: Path) -> None:
    """``recsys ingest`` run from a directory holding another ``recsys_assets`` (a
    checkout of another version) validates with the installed code, in its workers
    too. Python 3.11's fork server puts its working directory first on its path,
    so anything it imported before the workers took this process's path came from
    there: here, a package whose workers could not start."""
    import subprocess
    import sys

    shadow = tmp_path / "checkout"
    (shadow / "recsys_assets").mkdir(parents=True)
    (shadow / "recsys_assets" / "__init__.py").write_text("")
    (shadow / "recsys_assets" / "ingest.py").write_text("raise ImportError('another checkout')\n")
    log = tmp_path / "log.ndjson"
    log.write_bytes(b"".join(orjson.dumps(base(k)) + b"\n" for k in range(3_000)))
    script = tmp_path / "ingest_here.py"
    script.write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from unittest import mock\n"
        "from recsys_assets import ingest\n"
        "from recsys_serving.events.intake import EventIntake\n"
        "from recsys_serving.lake import LocalLake\n"
        "from recsys_serving.settings import Settings\n"
        "if __name__ == '__main__':\n"
        "    landed = []\n"
        "    land = EventIntake.land_prevalidated\n"
        "    def counted(self, batch, *, sync=True):\n"
        "        landed.append(batch.received)\n"
        "        return land(self, batch, sync=sync)\n"
        f"    intake = EventIntake(LocalLake(Path({str(tmp_path / 'lake')!r})), Settings())\n"
        "    with mock.patch.object(ingest, 'READ_BLOCK', 16 << 10), "
        "mock.patch.object(EventIntake, 'land_prevalidated', counted):\n"
        f"        report = ingest.ingest_files([Path({str(log)!r})], intake, workers=2)\n"
        "    print(report.result.accepted, sum(landed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=shadow,
        env={**env, "RECSYS_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    accepted, by_workers = map(int, done.stdout.split()[-2:])
    assert accepted == 3_000
    assert by_workers == 3_000, done.stderr[-2000:]
