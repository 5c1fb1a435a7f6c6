"""Deliver operational alerts (stale weblogs, retraining and promotion decisions).

Everything that wants to tell a person something goes through one ``Notifier`` so
that the decision of *who* hears about it lives in configuration (``RECSYS_SMTP_*``,
``RECSYS_ALERT_*``), not in each sensor or asset. The log channel is always on, so
an alert leaves a trace even on a laptop with nothing configured, and a broken
channel never silences the others: every delivery attempt is reported back to the
caller, which records it (run metadata, sensor logs) instead of trusting that
"no exception" meant "someone was told".
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Literal, Protocol

import dagster as dg
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recsys_assets.resources import declared
from recsys_serving.settings import AlertSettings, Settings

AlertStatus = Literal["firing", "resolved"]
Severity = Literal["info", "warning", "critical"]

ALERT_LOGGER = "recsys.alerts"
_log = logging.getLogger(ALERT_LOGGER)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Alert(BaseModel):
    """One notification; ``key`` groups the firing and resolved messages of one problem."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1)
    status: AlertStatus
    severity: Severity
    title: str = Field(min_length=1)
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=_utcnow)

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Naive timestamps in an email read as the sender's local time; refuse them.
        if value.tzinfo is None:
            raise ValueError("Alert.at must be timezone-aware")
        return value

    @property
    def headline(self) -> str:
        return f"[recsys][{self.status.upper()}][{self.severity}] {self.title}"

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types only, so every channel renders details the same way."""
        return json.loads(json.dumps(self.model_dump(mode="json"), default=str))

    def details_text(self) -> str:
        lines = [f"{name}: {_scalar(value)}" for name, value in self.details.items()]
        return "\n".join(lines)


def _scalar(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened on one channel; ``pages`` tells whether that channel reaches a person."""

    channel: str
    ok: bool
    pages: bool
    error: str | None = None

    def describe(self) -> str:
        return "delivered" if self.ok else f"FAILED: {self.error}"


def was_delivered(results: Sequence[DeliveryResult]) -> bool:
    """True when the alert reached a person (or the log, when nothing else is configured).

    A log line alone does not count as telling the on-duty engineer if an email or
    webhook channel exists; callers use this to decide whether to retry.
    """
    paging = [r for r in results if r.pages]
    candidates = paging or list(results)
    return any(r.ok for r in candidates)


def delivery_metadata(results: Sequence[DeliveryResult]) -> dict[str, str]:
    """Per-channel outcome, ready for Dagster metadata or a structured log record."""
    return {f"alert_{r.channel}": r.describe() for r in results}


class Channel(Protocol):
    name: str
    pages: bool

    def deliver(self, alert: Alert) -> None:
        """Deliver or raise; the notifier turns exceptions into a failed ``DeliveryResult``."""
        ...


_LEVELS: dict[str, int] = {
    "critical": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
}


class LogChannel:
    """A structured log record per alert; the trace that exists even with no mail server."""

    pages = False

    def __init__(self, logger: logging.Logger | None = None, name: str = "log") -> None:
        self.logger = logger or _log
        self.name = name

    def deliver(self, alert: Alert) -> None:
        level = _LEVELS[alert.severity] if alert.status == "firing" else logging.INFO
        self.logger.log(
            level,
            "alert %s: %s | key=%s severity=%s | %s",
            alert.status,
            alert.title,
            alert.key,
            alert.severity,
            alert.summary,
            extra={"alert": alert.to_json_dict()},
        )


class EmailChannel:
    """Plain-text email through any SMTP relay (a local MTA, SES, a corporate relay)."""

    pages = True

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        *,
        starttls: bool = False,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        name: str = "email",
    ) -> None:
        if not recipients:
            raise ValueError("EmailChannel needs at least one recipient")
        if user and password is None:
            raise ValueError("smtp user given without a password")
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = list(recipients)
        self.starttls = starttls
        self.user = user
        self.password = password
        self.timeout = timeout
        self.name = name

    def build_message(self, alert: Alert) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = alert.headline
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = format_datetime(alert.at)
        msg["Message-ID"] = make_msgid(domain="recsys")
        # Lets mail filters thread a firing and its resolution together.
        msg["X-Recsys-Alert-Key"] = alert.key
        msg["X-Recsys-Alert-Status"] = alert.status
        body = [
            alert.summary,
            "",
            f"status: {alert.status}",
            f"severity: {alert.severity}",
            f"key: {alert.key}",
            f"at: {alert.at.isoformat()}",
        ]
        if alert.details:
            body += ["", "details:", alert.details_text()]
        msg.set_content("\n".join(body) + "\n")
        return msg

    def deliver(self, alert: Alert) -> None:
        msg = self.build_message(alert)
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.user:
                assert self.password is not None
                smtp.login(self.user, self.password)
            refused = smtp.send_message(msg, from_addr=self.sender, to_addrs=self.recipients)
        if refused:
            # Some recipients got it; the rest must not be reported as delivered.
            raise smtplib.SMTPRecipientsRefused(refused)


class WebhookChannel:
    """JSON POST that a Slack incoming webhook accepts (``text``) and a program can parse."""

    pages = True

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        name: str = "webhook",
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.name = name

    def payload(self, alert: Alert) -> dict[str, Any]:
        text = f"*{alert.headline}*\n{alert.summary}"
        if alert.details:
            text += "\n```\n" + alert.details_text() + "\n```"
        return {"text": text, "alert": alert.to_json_dict()}

    def deliver(self, alert: Alert) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            response = client.post(self.url, json=self.payload(alert))
            response.raise_for_status()


class Notifier:
    """Fan an alert out to every channel and report each outcome."""

    def __init__(self, channels: Sequence[Channel] | None = None) -> None:
        self.channels: list[Channel] = list(channels) if channels else [LogChannel()]

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = 10.0) -> Notifier:
        return build_notifier(
            smtp_host=settings.alerts.smtp_host,
            smtp_port=settings.alerts.smtp_port,
            smtp_user=settings.alerts.smtp_user,
            smtp_password=settings.alerts.smtp_password,
            smtp_starttls=settings.alerts.smtp_starttls,
            email_from=settings.alerts.alert_email_from,
            recipients=settings.alert_recipients,
            webhook_url=settings.alerts.alert_webhook_url,
            timeout=timeout,
        )

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    def send(self, alert: Alert) -> list[DeliveryResult]:
        results = []
        for channel in self.channels:
            try:
                channel.deliver(alert)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                _log.error(
                    "alert delivery failed on %s for %s (%s): %s",
                    channel.name,
                    alert.key,
                    alert.status,
                    error,
                    exc_info=True,
                    extra={"alert_key": alert.key, "channel": channel.name},
                )
                results.append(DeliveryResult(channel.name, False, channel.pages, error))
            else:
                results.append(DeliveryResult(channel.name, True, channel.pages))
        return results


def split_recipients(value: str | None) -> list[str]:
    if not value:
        return []
    return [a.strip() for a in value.split(",") if a.strip()]


def build_notifier(
    *,
    smtp_host: str | None,
    smtp_port: int,
    smtp_user: str | None,
    smtp_password: str | None,
    smtp_starttls: bool,
    email_from: str,
    recipients: Sequence[str],
    webhook_url: str | None,
    timeout: float = 10.0,
) -> Notifier:
    """The one place that decides which channels a configuration turns on."""
    channels: list[Channel] = [LogChannel()]
    if smtp_host and recipients:
        channels.append(
            EmailChannel(
                smtp_host,
                smtp_port,
                email_from,
                recipients,
                starttls=smtp_starttls,
                user=smtp_user or None,
                password=smtp_password,
                timeout=timeout,
            )
        )
    if webhook_url:
        channels.append(WebhookChannel(webhook_url, timeout=timeout))
    return Notifier(channels)


class NotifierResource(dg.ConfigurableResource):
    """Alert channels for sensors and assets, configured like the rest of ``RECSYS_*``."""

    smtp_host: str | None = None
    smtp_port: int = declared(AlertSettings, "smtp_port")
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = declared(AlertSettings, "smtp_starttls")
    email_from: str = declared(AlertSettings, "alert_email_from")
    email_to: str | None = Field(default=None, description="Comma-separated recipients.")
    webhook_url: str | None = None
    timeout_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifierResource:
        password: Any = settings.alerts.smtp_password
        if password and os.environ.get("RECSYS_SMTP_PASSWORD") == password:
            # Resource config is shown in the Dagster UI; an EnvVar shows only its name.
            password = dg.EnvVar("RECSYS_SMTP_PASSWORD")
        return cls(
            smtp_host=settings.alerts.smtp_host,
            smtp_port=settings.alerts.smtp_port,
            smtp_user=settings.alerts.smtp_user,
            smtp_password=password,
            smtp_starttls=settings.alerts.smtp_starttls,
            email_from=settings.alerts.alert_email_from,
            email_to=settings.alerts.alert_email_to,
            webhook_url=settings.alerts.alert_webhook_url,
        )

    def get(self) -> Notifier:
        password = self.smtp_password
        if isinstance(password, dg.EnvVar):
            # Only Dagster resolves an EnvVar; a resource used directly (CLI) must too.
            password = password.get_value()
        return build_notifier(
            smtp_host=self.smtp_host,
            smtp_port=self.smtp_port,
            smtp_user=self.smtp_user,
            smtp_password=password,
            smtp_starttls=self.smtp_starttls,
            email_from=self.email_from,
            recipients=split_recipients(self.email_to),
            webhook_url=self.webhook_url,
            timeout=self.timeout_seconds,
        )
