"""The notifier over real SMTP and HTTP servers on 127.0.0.1 (fixtures in conftest.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import dagster as dg
import pytest
from pydantic import ValidationError

from recsys_assets.alerts import (
    Alert,
    EmailChannel,
    LogChannel,
    Notifier,
    NotifierResource,
    WebhookChannel,
    delivery_metadata,
    was_delivered,
)
from recsys_serving.settings import Settings

AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def firing() -> Alert:
    return Alert(
        key="weblogs_freshness",
        status="firing",
        severity="critical",
        title="Weblogs stopped arriving",
        summary="No weblogs have landed for 20m (threshold 15m).",
        details={"last_arrival": "2024-05-06T06:48:00+00:00", "age_seconds": 1209.0},
        at=AT,
    )


def resolved() -> Alert:
    return Alert(
        key="weblogs_freshness",
        status="resolved",
        severity="info",
        title="Weblogs arriving again",
        summary="Weblogs landed again.",
        details={"gap": "25m"},
        at=AT,
    )


def test_alert_rejects_naive_time_and_unknown_status() -> None:
    with pytest.raises(ValidationError):
        Alert(key="k", status="firing", severity="info", title="t", summary="", at=datetime.now())
    with pytest.raises(ValidationError):
        Alert(key="k", status="pending", severity="info", title="t", summary="")  # type: ignore[arg-type]


def test_email_reaches_smtp_server(alert_smtp_server) -> None:
    settings = Settings(
        smtp_host=alert_smtp_server.host,
        smtp_port=alert_smtp_server.port,
        alert_email_from="recsys@example.org",
        alert_email_to="oncall@example.org, backup@example.org",
    )
    notifier = Notifier.from_settings(settings)
    assert notifier.channel_names == ["log", "email"]

    results = notifier.send(firing())

    assert [(r.channel, r.ok) for r in results] == [("log", True), ("email", True)]
    assert was_delivered(results)
    [mail] = alert_smtp_server.messages
    assert mail.mail_from == "recsys@example.org"
    assert mail.rcpt_tos == ["oncall@example.org", "backup@example.org"]
    assert mail.login is None
    msg = mail.message
    assert msg["Subject"] == "[recsys][FIRING][critical] Weblogs stopped arriving"
    assert msg["To"] == "oncall@example.org, backup@example.org"
    assert msg["X-Recsys-Alert-Key"] == "weblogs_freshness"
    assert msg.get_content_type() == "text/plain"
    body = msg.get_content()
    assert body.startswith("No weblogs have landed for 20m (threshold 15m).")
    assert "last_arrival: 2024-05-06T06:48:00+00:00" in body
    assert "age_seconds: 1209.0" in body
    assert "at: 2024-05-06T07:08:09+00:00" in body


def test_email_logs_in_when_credentials_are_configured(alert_smtp_server) -> None:
    def channel(password: str) -> EmailChannel:
        return EmailChannel(
            alert_smtp_server.host,
            alert_smtp_server.port,
            "recsys@example.org",
            ["oncall@example.org"],
            user=alert_smtp_server.user,
            password=password,
        )

    good = Notifier([channel(alert_smtp_server.password)]).send(resolved())
    bad = Notifier([channel("wrong")]).send(resolved())

    assert good[0].ok
    assert not bad[0].ok
    assert "SMTPAuthenticationError" in (bad[0].error or "")
    [mail] = alert_smtp_server.messages
    assert mail.login == "alerts"
    assert mail.message["Subject"] == "[recsys][RESOLVED][info] Weblogs arriving again"


def test_webhook_posts_slack_compatible_json(alert_webhook_server) -> None:
    notifier = Notifier([WebhookChannel(alert_webhook_server.url, timeout=5)])

    [result] = notifier.send(firing())

    assert result.ok and result.channel == "webhook"
    [payload] = alert_webhook_server.requests
    assert alert_webhook_server.content_types == ["application/json"]
    assert payload["text"].startswith("*[recsys][FIRING][critical] Weblogs stopped arriving*\n")
    assert "No weblogs have landed for 20m" in payload["text"]
    assert payload["alert"] == {
        "key": "weblogs_freshness",
        "status": "firing",
        "severity": "critical",
        "title": "Weblogs stopped arriving",
        "summary": "No weblogs have landed for 20m (threshold 15m).",
        "details": {"last_arrival": "2024-05-06T06:48:00+00:00", "age_seconds": 1209.0},
        "at": "2024-05-06T07:08:09Z",
    }


def test_failing_channels_do_not_stop_the_others(
    alert_smtp_server, alert_webhook_server, closed_localhost_port, caplog
) -> None:
    alert_webhook_server.status = 500
    notifier = Notifier(
        [
            WebhookChannel(alert_webhook_server.url, timeout=5),
            EmailChannel(
                "127.0.0.1", closed_localhost_port, "r@x", ["a@x"], timeout=5, name="dead_email"
            ),
            EmailChannel(alert_smtp_server.host, alert_smtp_server.port, "r@x", ["oncall@x"]),
            LogChannel(),
        ]
    )

    with caplog.at_level(logging.INFO, logger="recsys.alerts"):
        results = notifier.send(firing())

    assert [(r.channel, r.ok) for r in results] == [
        ("webhook", False),
        ("dead_email", False),
        ("email", True),
        ("log", True),
    ]
    assert "500" in (results[0].error or "")
    assert "ConnectionRefusedError" in (results[1].error or "")
    assert len(alert_webhook_server.requests) == 1  # it was tried, and it answered 500
    assert [m.rcpt_tos for m in alert_smtp_server.messages] == [["oncall@x"]]
    assert was_delivered(results)
    metadata = delivery_metadata(results)
    assert metadata["alert_email"] == "delivered"
    assert metadata["alert_webhook"].startswith("FAILED: HTTPStatusError")
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert {r.channel for r in failures} == {"webhook", "dead_email"}


def test_log_alone_does_not_count_as_paging_someone(closed_localhost_port) -> None:
    notifier = Notifier(
        [LogChannel(), EmailChannel("127.0.0.1", closed_localhost_port, "r@x", ["a@x"])]
    )
    results = notifier.send(firing())
    assert [r.ok for r in results] == [True, False]
    assert not was_delivered(results)
    # With nothing but the log configured, the log is the delivery.
    assert was_delivered(Notifier().send(firing()))


def test_log_channel_writes_a_structured_record(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="recsys.alerts"):
        Notifier().send(firing())
        Notifier().send(resolved())

    fire, ok = [r for r in caplog.records if r.name == "recsys.alerts"]
    assert fire.levelno == logging.ERROR
    assert "alert firing: Weblogs stopped arriving" in fire.getMessage()
    assert "key=weblogs_freshness" in fire.getMessage()
    assert fire.alert["details"]["age_seconds"] == 1209.0
    assert fire.alert["severity"] == "critical"
    assert ok.levelno == logging.INFO
    assert ok.alert["status"] == "resolved"


def test_channels_follow_configuration(monkeypatch) -> None:
    assert Notifier.from_settings(Settings()).channel_names == ["log"]
    # An SMTP host without recipients would only produce failures: no email channel.
    assert Notifier.from_settings(Settings(smtp_host="mail")).channel_names == ["log"]

    monkeypatch.setenv("RECSYS_SMTP_PASSWORD", "hunter2")
    settings = Settings(
        smtp_host="mail",
        smtp_port=587,
        smtp_user="bot",
        smtp_starttls=True,
        alert_email_to="a@x,b@x",
        alert_webhook_url="http://127.0.0.1:9/hook",
    )
    resource = NotifierResource.from_settings(settings)
    # The secret is referenced, not copied, so the Dagster UI shows a variable name.
    assert isinstance(resource.smtp_password, dg.EnvVar)
    notifier = resource.get()
    assert notifier.channel_names == ["log", "email", "webhook"]
    email = notifier.channels[1]
    assert isinstance(email, EmailChannel)
    assert (email.port, email.starttls, email.user, email.password) == (587, True, "bot", "hunter2")
    assert email.recipients == ["a@x", "b@x"]

    with dg.build_resources({"notifier": resource}) as built:
        assert built.notifier.get().channel_names == ["log", "email", "webhook"]


def test_resource_delivers_through_dagster(alert_webhook_server) -> None:
    resource = NotifierResource(webhook_url=alert_webhook_server.url)
    with dg.build_resources({"notifier": resource}) as built:
        results = built.notifier.get().send(resolved())
    assert [r.ok for r in results] == [True, True]
    assert alert_webhook_server.requests[0]["alert"]["status"] == "resolved"
