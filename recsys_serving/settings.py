"""One configuration object for the whole project.

Every process (collector, server, Dagster code location, CLI) reads the same
``RECSYS_*`` environment, so the embedded defaults line up without set-up and a
deployment switches a backend by changing one variable, never code.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    home: Path = Field(
        default=Path(".recsys"),
        description="Directory that holds all embedded state (local lake, Dagster instance).",
    )
    lake_uri: str | None = Field(
        default=None,
        description="Local path or s3://bucket/prefix; defaults to <home>/lake.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint for S3-compatible stores (MinIO, moto, ...)."
    )
    aws_region: str = "us-east-1"

    # Event contract and business logic.
    catalog_epoch: date = Field(
        default=date(1995, 1, 1),
        description="Events before this date are quarantined; also the first weblogs partition.",
    )
    future_tolerance_seconds: float = Field(
        default=300.0, description="Clock skew tolerated before a timestamp counts as future."
    )
    bot_max_events_per_minute: int = Field(
        default=120, description="A user above this rate in any minute is treated as a bot."
    )
    session_gap_minutes: float = 30.0
    max_duplicate_rate: float = Field(
        default=0.05, description="Blocking check threshold on duplicate event_ids per run."
    )

    # Collector.
    max_request_bytes: int = 16 * 1024 * 1024
    max_batch_events: int = 50_000
    max_event_bytes: int = 64 * 1024
    landing_segment_max_bytes: int = 64 * 1024 * 1024
    landing_segment_max_age_seconds: float = 10.0
    dedup_cache_size: int = 200_000

    # Stores: users and content (MongoDB API), candidate index (embedded or Elasticsearch).
    mongo_uri: str | None = Field(
        default=None,
        description="mongodb://... for MongoDB/DocumentDB; unset or mongomock:// = embedded.",
    )
    mongo_db: str = "recsys"
    es_url: str | None = Field(
        default=None, description="Elasticsearch URL for the candidate index; unset = embedded."
    )
    es_index_prefix: str = "recsys-items"
    es_api_key: str | None = None

    # Training.
    train_window_days: float | None = Field(
        default=None, description="Days of weblogs to train on (unset = all history)."
    )
    holdout_days: float = Field(
        default=1.0, description="The last days of the window held out for evaluation."
    )
    label_days: float = Field(
        default=1.0, description="Days after the feature cut-off whose actions label ranking rows."
    )
    seed: int = 42
    threads: int = Field(default=0, description="Threads for ALS/LightGBM (0 = all cores).")

    # Freshness alarm and notifier channels (the log channel is always on).
    freshness_minutes: float = 15.0
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    alert_email_from: str = "recsys@localhost"
    alert_email_to: str | None = Field(
        default=None, description="Comma-separated recipients of alert emails."
    )
    alert_webhook_url: str | None = Field(
        default=None, description="JSON webhook (Slack-compatible) for alerts."
    )

    @field_validator("lake_uri")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_lake_uri(self) -> str:
        if self.lake_uri:
            return self.lake_uri
        return str(self.resolved_home / "lake")

    @property
    def dagster_home(self) -> Path:
        return self.resolved_home / "dagster"

    @property
    def embedded_mongo(self) -> bool:
        return not self.mongo_uri or self.mongo_uri.startswith("mongomock://")

    @property
    def docstore_path(self) -> Path:
        return self.resolved_home / "docstore" / f"{self.mongo_db}.json"

    @property
    def alert_recipients(self) -> list[str]:
        if not self.alert_email_to:
            return []
        return [a.strip() for a in self.alert_email_to.split(",") if a.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of caching."""
    return Settings()
