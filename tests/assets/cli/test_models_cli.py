"""``recsys models``: list, show, register, promote, rollback, history through the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_serving.lake import LocalLake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.model.bundle import BundleWriter, new_version
from recsys_serving.registry import ModelRegistry

runner = CliRunner()


def make_bundle(root: Path, seconds: int, metric: float) -> Path:
    version = new_version(datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=seconds))
    with BundleWriter(root / version, version=version) as w:
        (w.path / "ranker.txt").write_text(f"model {seconds}\n")
        w.manifest.update(
            metrics={"ndcg@10": metric, "recall@10": 0.4},
            params={"factors": 32},
            data={"partitions": ["2026-10-30", "2026-10-31"], "rows": 1234},
            seed=42,
        )
    return root / version


@pytest.fixture
def home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alert_webhook_server: object
) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_LAKE_URI", raising=False)
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", alert_webhook_server.url)  # type: ignore[attr-defined]
    yield tmp_path / "home"


def registry(home: Path) -> ModelRegistry:
    return ModelRegistry(LocalLake(home / "lake"))


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["models", *args])
    return result.exit_code, result.output


def test_register_list_show(home: Path, tmp_path: Path) -> None:
    code, output = run("list")
    assert code == 0 and "0 model version(s); production: none" in output
    b1 = make_bundle(tmp_path, 1, 0.21)
    b2 = make_bundle(tmp_path, 2, 0.25)
    code, output = run("register", str(b1), "--tag", "run_id=abc")
    assert code == 0, output
    assert f"registered {b1.name}: 1 file(s)" in output
    registry(home).register(b2)
    registry(home).promote(b1.name, reason="first model")

    code, output = run("list", "--json")
    assert code == 0, output
    rows = json.loads(output)
    assert [r["version"] for r in rows] == [b1.name, b2.name]
    assert rows[0]["aliases"] == [PRODUCTION] and rows[0]["tags"] == {"run_id": "abc"}
    assert rows[1]["ndcg@10"] == 0.25
    code, output = run("list")
    assert code == 0 and b2.name in output and "0.2500" in output
    assert f"2 model version(s); production: {b1.name}" in output

    code, output = run("show", b2.name)
    assert code == 0, output
    assert "ranker.txt" in output and "recall@10" in output and "2026-10-30" in output
    code, output = run("show", "production")
    assert code == 0 and b1.name in output and "run_id=abc" in output
    code, output = run("show", b1.name, "--json")
    assert json.loads(output)["metrics"]["ndcg@10"] == 0.21


def test_errors_are_one_line_and_exit_1(home: Path, tmp_path: Path) -> None:
    code, output = run("show", "v20990101000000-00000000")
    assert code == 1 and "error: model version v20990101000000-00000000 is not registered" in output
    code, output = run("show", "nonsense")
    assert code == 1 and "is not a model version" in output
    code, output = run("promote", "v20990101000000-00000000")
    assert code == 1 and "not registered" in output
    code, output = run("rollback")
    assert code == 1 and "nothing to roll back: production has no previous version" in output
    code, output = run("rollback", "--alias", "candidate")
    assert code == 1 and "'candidate' is not set" in output
    b1 = make_bundle(tmp_path, 1, 0.2)
    code, output = run("promote", b1.name, "--share", "0.5")
    assert code == 1 and "--share only applies with --candidate" in output
    (b1 / "ranker.txt").write_text("model X\n")  # same size, other bytes
    code, output = run("register", str(b1))
    assert code == 1 and f"{b1 / 'ranker.txt'}: sha256 mismatch" in output
    code, output = run("register", str(b1), "--tag", "oops")
    assert code == 1 and "expected key=value" in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1


def test_promote_candidate_rollback_history_and_alerts(
    home: Path, tmp_path: Path, alert_webhook_server: object
) -> None:
    reg = registry(home)
    v1, v2, v3 = (reg.register(make_bundle(tmp_path, s, 0.2 + s / 100)).version for s in (1, 2, 3))
    code, output = run("promote", v1, "--reason", "first model")
    assert code == 0, output
    assert f"production: none -> {v1} (manual: first model)" in output
    assert f"promotion_sensor publishes {v1} as an OCI artifact" in output
    code, output = run("promote", v1, "--candidate")
    assert code == 1 and "already the production model" in output

    code, output = run("promote", v2, "--candidate", "--share", "0.25")
    assert code == 0, output
    assert "publish" not in output  # a candidate is not production: nothing to publish
    state = reg.alias(CANDIDATE)
    assert state is not None and (state.version, state.share) == (v2, 0.25)
    assert state.reason.startswith("manual: ") and state.evidence["via"] == "recsys models"
    code, output = run("list", "--json")
    assert next(r for r in json.loads(output) if r["version"] == v2)["aliases"] == ["candidate 25%"]

    code, output = run("rollback", "--reason", "looks worse")
    assert code == 0 and f"candidate: {v2} -> none (manual: looks worse)" in output
    assert reg.alias(CANDIDATE) is None and reg.alias(PRODUCTION).version == v1  # type: ignore[union-attr]

    assert run("promote", v3)[0] == 0
    code, output = run("rollback", "--alias", "production")
    assert code == 0 and f"production: {v3} -> {v1}" in output
    assert f"promotion_sensor publishes {v1} as an OCI artifact" in output

    code, output = run("history", "--json")
    events = json.loads(output)
    assert [(e["alias"], e["version"]) for e in events] == [
        (PRODUCTION, v1),
        (PRODUCTION, v3),
        (CANDIDATE, None),
        (CANDIDATE, v2),
        (PRODUCTION, v1),
    ]
    assert all(e["reason"].startswith("manual: ") for e in events)
    code, output = run("history", "--alias", "candidate", "--limit", "1")
    assert code == 0 and f"candidate cleared (was {v2})" in output
    assert "manual: looks worse" in output and "1 alias move(s) shown" in output

    sent = alert_webhook_server.requests  # type: ignore[attr-defined]
    titles = [r["alert"]["title"] for r in sent]
    assert titles == [
        f"Model {v1} promoted to production by hand",
        f"Model {v2} phased in as candidate by hand",
        f"Candidate {v2} rolled back by hand",
        f"Model {v3} promoted to production by hand",
        f"Production rolled back to {v1} by hand",
    ]
    assert all(r["alert"]["severity"] == "info" for r in sent)
    assert sent[0]["alert"]["details"]["reason"] == "manual: first model"


def test_undelivered_alert_warns_but_keeps_the_move(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_localhost_port: int
) -> None:
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{closed_localhost_port}/x")
    version = registry(home).register(make_bundle(tmp_path, 1, 0.2)).version
    code, output = run("promote", version)
    assert code == 0, output
    assert "warning: alert not delivered (webhook:" in output
    assert registry(home).alias(PRODUCTION).version == version  # type: ignore[union-attr]


def test_promote_says_to_publish_by_hand_when_automatic_publishing_is_off(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_PUBLISH_ON_PROMOTION", "false")
    version = registry(home).register(make_bundle(tmp_path, 1, 0.2)).version
    code, output = run("promote", version)
    assert code == 0, output
    assert "launch publish_job" in output and "promotion_sensor publishes" not in output


def test_show_says_when_production_answers_with_popularity(home: Path, tmp_path: Path) -> None:
    """The first-model rule's decision and both figures are in ``recsys models show``."""
    reg = registry(home)
    bundle = make_bundle(tmp_path, 1, 0.29)
    tags = {
        "decision": "below_popularity",
        "holdout_challenger_ndcg@10": "0.2950",
        "holdout_popularity_ndcg@10": "0.3470",
        "per_user_challenger_ndcg@10": "0.2125",
        "per_user_popularity_ndcg@10": "0.2490",
    }
    mv = reg.register(bundle, tags=tags)
    reg.promote(
        mv.version,
        reason="first model, answering with popularity",
        evidence={
            "answers": "popularity",
            "first_model_rule": {"serve": False, "warning": "clearly below popularity: per_user"},
        },
    )
    code, output = run("show", "production")
    assert code == 0, output
    assert "answers: popularity" in output and "clearly below popularity" in output
    assert "per-user holdout" in output and "0.2125" in output and "0.2490" in output
    assert "time holdout" in output and "0.2950" in output and "0.3470" in output

    better = make_bundle(tmp_path, 2, 0.35)
    mv2 = reg.register(better, tags={"decision": "first_model"})
    reg.promote(mv2.version, reason="first model: beats popularity: per_user ...")
    code, output = run("show", "production")
    assert code == 0 and "answers: this model (first model: beats popularity" in output


def test_history_shows_control_characters_escaped_and_the_cli_refuses_them(
    home: Path, tmp_path: Path
) -> None:
    """A reason stored with terminal escapes (written by any path) never reaches the tty raw."""
    reg = registry(home)
    v1 = reg.register(make_bundle(tmp_path, 1, 0.2)).version
    hostile = "ok\x1b[2J\x1b]0;pwned\x07\rhidden\x9b31m"
    reg.promote(v1, reason=hostile)
    code, output = run("history")
    assert code == 0, output
    assert not any(c in output for c in "\x1b\x07\r\x9b"), repr(output)
    assert "ok\\x1b[2J\\x1b]0;pwned\\x07\\rhidden\\x9b31m" in output
    code, output = run("history", "--json")
    assert json.loads(output)[0]["reason"] == hostile  # JSON escapes it: kept exact
    code, output = run("rollback", "--reason", "x\x1b[2Jy")
    assert code == 2 and "control characters are not allowed" in output
    assert "\x1b" not in output and reg.alias(PRODUCTION).version == v1  # type: ignore[union-attr]


def test_promote_refuses_a_damaged_bundle_in_one_line(home: Path, tmp_path: Path) -> None:
    b1 = make_bundle(tmp_path, 1, 0.2)
    b2 = make_bundle(tmp_path, 2, 0.3)
    reg = registry(home)
    reg.register(b1)
    reg.register(b2)
    reg.promote(b1.name, reason="first")
    damaged = Path(reg.lake.local_path(reg.model_key(b2.name, "ranker.txt")))  # type: ignore[arg-type]
    damaged.write_text("model X\n")
    for args in (("promote", b2.name), ("promote", b2.name, "--candidate", "--share", "0.1")):
        code, output = run(*args)
        assert code == 1, output
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and f"model version {b2.name} fails verification" in lines[0]
        assert "ranker.txt: sha256 mismatch" in lines[0]
    assert reg.alias(PRODUCTION).version == b1.name  # type: ignore[union-attr]
    assert reg.alias(CANDIDATE) is None
