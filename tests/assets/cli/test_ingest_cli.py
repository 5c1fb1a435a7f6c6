"""``recsys ingest``: file backfills through the intake, errors naming file and line."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_serving.lake import LocalLake, read_parquet
from support import ndjson_lines

runner = CliRunner()
T = time.time() - 2 * 86_400


def ev(i: int) -> dict[str, object]:
    return {
        "event_id": f"e{i}",
        "event_type": "view",
        "user_id": f"u{i % 3}",
        "item_id": "i",
        "ts": T + i,
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    yield tmp_path / "home"


def test_ndjson_with_bad_lines_then_processed_with_full_accounting(
    home: Path, tmp_path: Path
) -> None:
    f = tmp_path / "logs.ndjson"
    lines = [orjson.dumps(ev(i)) for i in range(50)]
    lines[10] = b'{"event_id": "e10", "event_ty'
    lines[20] = orjson.dumps({**ev(20), "event_type": "wink"})
    lines[30] = b"\xff\xfe garbage"
    lines.append(orjson.dumps(ev(1)))  # a duplicate
    f.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["ingest", str(f)])
    assert result.exit_code == 0, result.output
    assert f"{f}:11: truncated" in result.output
    assert f"{f}:21: schema" in result.output and "event_type" in result.output
    assert f"{f}:31: not_utf8" in result.output
    assert "ingested 51 events from 1 file(s): 47 landed, 4 quarantined" in result.output
    assert "checks 6/6 passed" in result.output and "succeeded" in result.output
    lake = LocalLake(home / "lake")
    landed = ndjson_lines(lake, "landing/")
    quarantined = ndjson_lines(lake, "quarantine/intake/")
    weblog_rows = sum(
        read_parquet(lake, o.key).height
        for o in lake.list("weblogs/")
        if o.key.endswith(".parquet")
    )
    rejected_later = sum(
        read_parquet(lake, o.key).height
        for o in lake.list("quarantine/weblogs/")
        if o.key.endswith(".parquet")
    )
    assert len(landed) + len(quarantined) == 51
    assert weblog_rows + rejected_later == len(landed) == 47
    assert {q["at"] for q in quarantined} == {f"{f}:{n}" for n in (11, 21, 31, 51)}


def test_json_array_and_gzip_files(home: Path, tmp_path: Path) -> None:
    arr = tmp_path / "a.json"
    arr.write_bytes(orjson.dumps([ev(i) for i in range(5)] + [{"event_id": "bad"}]))
    gz = tmp_path / "b.ndjson.gz"
    gz.write_bytes(gzip.compress(b"\n".join(orjson.dumps(ev(100 + i)) for i in range(7))))
    result = runner.invoke(app, ["ingest", str(arr), str(gz), "--no-process"])
    assert result.exit_code == 0, result.output
    assert f"{arr}:item 5: schema" in result.output
    assert "ingested 13 events from 2 file(s): 12 landed, 1 quarantined" in result.output


def test_malformed_json_array_names_file_line_and_column(home: Path, tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text('[\n  {"event_id": "a"},\n  {"event_id": oops}\n]\n')
    result = runner.invoke(app, ["ingest", str(f), "--no-process"])
    assert result.exit_code == 1
    assert f"{f}:3:" in result.output and "malformed JSON" in result.output


def test_missing_file_is_reported_and_others_still_ingested(home: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.ndjson"
    good.write_bytes(orjson.dumps(ev(1)) + b"\n")
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "nope.ndjson"), str(good), "--no-process"]
    )
    assert result.exit_code == 1
    assert "nope.ndjson: no such file" in result.output
    assert "1 landed" in result.output


def test_schema_command_prints_the_contract(home: Path) -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert orjson.loads(result.stdout)["title"] == "WeblogEvent"


def test_status_after_ingest(home: Path, tmp_path: Path) -> None:
    f = tmp_path / "l.ndjson"
    f.write_bytes(b"\n".join(orjson.dumps(ev(i)) for i in range(4)))
    assert runner.invoke(app, ["ingest", str(f)]).exit_code == 0
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "4 weblog rows" in result.output


def test_a_file_ingested_twice_passes_with_its_replays_counted(home: Path, tmp_path: Path) -> None:
    """Re-ingesting after a crash: the copies are quarantined, counted, nothing fails."""
    f = tmp_path / "logs.ndjson"
    f.write_bytes(b"\n".join(orjson.dumps(ev(i)) for i in range(30)) + b"\n")
    assert runner.invoke(app, ["ingest", "--no-process", str(f)]).exit_code == 0
    result = runner.invoke(app, ["ingest", str(f)])
    assert result.exit_code == 0, result.output
    assert "30 rows, 30 quarantined (duplicate_event_id 30)" in result.output
    assert "checks 6/6 passed" in result.output


@pytest.mark.slow
def test_a_failed_check_is_one_line_with_count_examples_and_remedy(
    home: Path, tmp_path: Path
) -> None:
    """Ids reused for other events fail their check, told in one line; a client's fault,
    so the run goes on (the check warns) and the command succeeds."""
    first, reused = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    first.write_bytes(b"\n".join(orjson.dumps(ev(i)) for i in range(120)) + b"\n")
    reused.write_bytes(
        b"\n".join(orjson.dumps({**ev(i), "item_id": "other"}) for i in range(120)) + b"\n"
    )
    assert runner.invoke(app, ["ingest", "--no-process", str(first)]).exit_code == 0
    recsys = Path(sys.executable).with_name("recsys")
    proc = subprocess.run(
        [str(recsys), "ingest", str(reused)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Stack Trace" not in output, output
    assert "DagsterAssetCheckFailedError" not in output, output
    failed = [line for line in output.splitlines() if "failed:" in line]
    assert len(failed) == 1, output
    line = failed[0]
    assert line.startswith(
        "warning (not blocking): check conflicting_duplicate_rate_below_threshold failed: 120 rows"
    )
    assert "e.g. event_id 'e0' landed as different events; event_id 'e1' landed" in line
    assert "to do: a client sends different events under one event_id" in line
    assert "checks 5/6 passed" in output and "succeeded" in output and "FAILED" not in output


def test_status_without_a_home_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status is read-only: run where there is no recsys home, it says so, writes nothing."""
    monkeypatch.delenv("RECSYS_HOME", raising=False)
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "nothing there: no lake at" in result.output
    assert str(tmp_path / ".recsys" / "lake") in result.output
    assert list(tmp_path.iterdir()) == []
