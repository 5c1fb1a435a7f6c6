"""`recsys config`: secrets never printed, and the reference page matches the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys_assets.cli import app
from recsys_assets.cli.config import reference_markdown
from recsys_serving.settings import setting_fields

ROOT = Path(__file__).resolve().parents[3]


def test_reference_page_is_generated_from_settings() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(), (
        "docs/configuration.md is stale: run `recsys config reference > docs/configuration.md`"
    )
    for field in setting_fields():
        assert f"`RECSYS_{field.name.upper()}`" in page
        assert field.description, f"settings.{'.'.join(field.path)} has no description"


def test_show_hides_secrets_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "RECSYS_SMTP_PASSWORD": "smtp-s3cret",
        "RECSYS_OCI_PASSWORD": "oci-s3cret",
        "RECSYS_ES_API_KEY": "es-s3cret",
        "RECSYS_API_KEYS": json.dumps({"key-s3cret": ["recommend"]}),
        "RECSYS_MONGO_URI": "mongodb://user:mongo-s3cret@db.example:27017/recsys?tls=true",
        "RECSYS_DAGSTER_PG_URL": "postgresql://dagster:pg-s3cret@pg.example:5432/dagster",
        "RECSYS_ALERT_WEBHOOK_URL": "https://hooks.example/services/T0/B0/hook-s3cret?x=1",
        "RECSYS_SERVICE_METRICS_URL": "http://scraper:metrics-s3cret@127.0.0.1:8000/metrics",
        "RECSYS_ES_URL": "https://elastic:es-pw-s3cret@es.example:9200",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    shown = json.loads(result.output)
    assert shown["RECSYS_SMTP_PASSWORD"] == "***"
    assert shown["RECSYS_API_KEYS"] == "***"
    assert shown["RECSYS_MONGO_URI"] == "mongodb://db.example:27017/recsys"
    assert shown["RECSYS_DAGSTER_PG_URL"] == "postgresql://pg.example:5432/dagster"
    assert shown["RECSYS_ALERT_WEBHOOK_URL"] == "https://hooks.example/***"
    assert shown["RECSYS_SERVICE_METRICS_URL"] == "http://127.0.0.1:8000/metrics"
    assert shown["RECSYS_HOME"]  # and the ordinary values are there


def test_any_url_or_secret_named_setting_is_redacted_without_being_listed() -> None:
    """A setting added later must not leak because nobody put it on a list."""
    from recsys_assets.cli.config import shown_value

    assert shown_value("new_backend_url", "redis://u:pw-s3cret@cache:6379/0?tls=1") == (
        "redis://cache:6379/0"
    )
    assert shown_value("new_hosts", ["https://u:pw-s3cret@a.example/x"]) == ["https://a.example/x"]
    assert shown_value("broker_password", "s3cret") == "***"
    assert shown_value("github_token", "s3cret") == "***"
    assert shown_value("queue_name", "plain value") == "plain value"
    assert shown_value("lake_uri", "s3://bucket/prefix") == "s3://bucket/prefix"


def test_show_table_ends_with_a_summary() -> None:
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert f"{len(setting_fields())} settings; home" in result.output
