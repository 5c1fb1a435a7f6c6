"""Alerting shared by sensors and assets: one notifier, several delivery channels."""

from recsys_assets.alerts.notifier import (
    Alert,
    AlertStatus,
    Channel,
    DeliveryResult,
    EmailChannel,
    LogChannel,
    Notifier,
    NotifierResource,
    Severity,
    WebhookChannel,
    build_notifier,
    delivery_metadata,
    was_delivered,
)

__all__ = [
    "Alert",
    "AlertStatus",
    "Channel",
    "DeliveryResult",
    "EmailChannel",
    "LogChannel",
    "Notifier",
    "NotifierResource",
    "Severity",
    "WebhookChannel",
    "build_notifier",
    "delivery_metadata",
    "was_delivered",
]
