"""``recsys keys create|revoke|list`` and ``recsys serve`` options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_serving.keys import KeyFile, KeyRing


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    return tmp_path


def test_create_prints_the_key_once_and_stores_its_hash(home: Path) -> None:
    result = CliRunner().invoke(
        app, ["keys", "create", "--scopes", "recommend,events", "--rps", "5", "--burst", "9"]
    )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("rsk_") and "\n" not in secret
    assert "shown once" in result.stderr
    assert secret not in (home / "keys.json").read_text()
    key = KeyRing(KeyFile.in_home(home)).authenticate(secret)
    assert key is not None
    assert (key.scopes, key.rps, key.burst) == ({"recommend", "events"}, 5.0, 9)
    listed = CliRunner().invoke(app, ["keys", "list", "--json"])
    (record,) = json.loads(listed.stdout)
    assert record["key_id"] == key.key_id and record["revoked_at"] is None
    assert secret not in listed.stdout


def test_revoke_and_list(home: Path) -> None:
    runner = CliRunner()
    secret = runner.invoke(app, ["keys", "create", "--scopes", "admin", "--name", "ops"]).stdout
    (key,) = KeyFile.in_home(home).list()
    result = runner.invoke(app, ["keys", "revoke", key.key_id])
    assert result.exit_code == 0 and f"revoked {key.key_id}" in result.stdout
    assert KeyRing(KeyFile.in_home(home)).authenticate(secret.strip()) is None
    listing = runner.invoke(app, ["keys", "list"]).stdout
    assert key.key_id in listing and "revoked" in listing and "ops" in listing


def test_bad_scopes_and_unknown_ids_are_clear_errors(home: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "create", "--scopes", "recommend,root"])
    assert result.exit_code == 1
    assert "unknown scope 'root' (known: recommend, events, admin)" in result.stderr
    result = runner.invoke(app, ["keys", "revoke", "k_missing"])
    assert result.exit_code == 1 and "no key with id 'k_missing'" in result.stderr
    (home / "keys.json").write_text("[]")
    result = runner.invoke(app, ["keys", "list"])
    assert result.exit_code == 1 and "keys.json: not a recsys key file" in result.stderr


def test_serve_refuses_bad_env_keys_before_starting(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_API_KEYS", json.dumps({"a-long-enough-secret-key": ["root"]}))
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "RECSYS_API_KEYS entry 1: unknown scope 'root'" in result.stderr
