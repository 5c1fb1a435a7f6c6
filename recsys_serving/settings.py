"""One configuration object for the whole project.

Every process (collector, server, Dagster code location, CLI) reads the same
``RECSYS_*`` environment, so the embedded defaults line up without set-up and a
deployment switches a backend by changing one variable, never code.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    aws_region: str = Field(default="us-east-1", description="Region for S3 and ECR clients.")

    # Event contract and business logic.
    catalog_epoch: date = Field(
        default=date(1995, 1, 1),
        description="Events before this date are quarantined; also the first weblogs partition.",
    )
    future_tolerance_seconds: float = Field(
        default=300.0, description="Clock skew tolerated before a timestamp counts as future."
    )
    bot_max_events_per_minute: int = Field(
        default=120,
        description=(
            "A user with more actions (click, view, add_to_cart, purchase; not impressions "
            "or ratings) than this in any minute is a bot: their whole day is quarantined."
        ),
    )
    session_gap_minutes: float = Field(
        default=30.0,
        description="Inactivity that starts a new inferred session (events without session_id).",
    )
    max_duplicate_rate: float = Field(
        default=0.05,
        description=(
            "Blocking check threshold on the share of a partition's event_ids that landed as "
            "different events (a client reusing ids). Replays of the same event (a resend, a "
            "file ingested twice) are quarantined and counted, never failing a check."
        ),
    )
    max_unattributed_click_rate: float = Field(
        default=0.5,
        description=(
            "Blocking check threshold on the share of a partition's clicks (with a request_id) "
            "that match no logged impression; such clicks are kept and counted, as clients "
            "lose some impressions."
        ),
    )
    min_rows_for_rate_checks: int = Field(
        default=100,
        ge=1,
        description=(
            "A rate check judges a partition only with at least this many rows in the rate's "
            "denominator, so a handful of rows never halts processing."
        ),
    )

    # Collector.
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024, description="Largest POST /events body; larger ones get 413."
    )
    max_batch_events: int = Field(
        default=50_000, description="Most events in one POST /events batch; more get 413."
    )
    max_event_bytes: int = Field(
        default=64 * 1024, description="Largest single event; larger ones are quarantined."
    )
    event_ts_min: date = Field(
        default=date(1970, 1, 1),
        description=(
            "Events timestamped before this date (UTC) are refused at intake as implausible "
            "(a zero or negative clock). Later events before catalog_epoch still land and the "
            "weblogs step quarantines them with its reason; keep it before any history you "
            "backfill (MovieLens-style data starts in 1995)."
        ),
    )
    event_max_future_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description=(
            "Events timestamped further than this past the receiver's clock are refused at "
            "intake (a broken clock, milliseconds sent as seconds); nearer ones land and the "
            "weblogs step quarantines those beyond future_tolerance_seconds."
        ),
    )
    max_context_depth: int = Field(
        default=32,
        ge=1,
        le=200,
        description="Deepest nesting of an event's context (the serializers stop at 254).",
    )
    max_context_bytes: int = Field(
        default=8 * 1024, ge=2, description="Largest serialized context of one event."
    )
    landing_segment_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        description="A landing segment is sealed once it reaches this size.",
    )
    landing_segment_max_age_seconds: float = Field(
        default=10.0, description="A landing segment is sealed this long after its first event."
    )
    dedup_cache_size: int = Field(
        default=200_000,
        description="Recent event_ids the collector remembers to refuse resent batches.",
    )

    # Stores: users and content (MongoDB API), candidate index (embedded or Elasticsearch).
    mongo_uri: str | None = Field(
        default=None,
        description="mongodb://... for MongoDB/DocumentDB; unset or mongomock:// = embedded.",
    )
    mongo_db: str = Field(
        default="recsys",
        description="Database of the document store (also names the embedded store's file).",
    )
    es_url: str | None = Field(
        default=None, description="Elasticsearch URL for the candidate index; unset = embedded."
    )
    es_index_prefix: str = Field(
        default="recsys-items",
        description="Alias of the live index; versioned indices are <prefix>-<version>.",
    )
    es_api_key: str | None = Field(default=None, description="Elasticsearch API key (secret).")

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
    seed: int = Field(
        default=42,
        description="Seed of every random step of training (same inputs + seed = same metrics).",
    )
    threads: int = Field(default=0, description="Threads for ALS/LightGBM (0 = all cores).")
    interaction_half_life_days: float | None = Field(
        default=None,
        description="Exponential time decay of interaction weights (unset = no decay).",
    )
    eval_k: int = Field(default=10, description="K of the offline ranking metrics.")
    ease_max_items: int = Field(
        default=20_000,
        description="Above this many items with interactions the EASE retrieval model "
        "(dense item x item inverse: n^2 memory, n^3 time) is skipped, logged and noted "
        "in the model metadata.",
    )
    train_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of any TrainingParams field (JSON), e.g. "
        '{"als_factors": 96, "recent_days": 0.01}; see docs/model.md.',
    )

    # Model registry (in the lake) and the promotion rule.
    promotion_metric: str = Field(
        default="ndcg@10", description="Primary offline metric a challenger must beat."
    )
    promotion_min_lift: float = Field(
        default=0.01, description="Relative lift over production required to promote."
    )
    promotion_guardrails: dict[str, float] = Field(
        default_factory=lambda: {"recall@10": 0.05, "coverage@10": 0.20},
        description="Metric -> largest relative drop tolerated (JSON in the environment).",
    )
    promotion_first_model_gate: bool | None = Field(
        default=None,
        description="First-model rule: a model must beat popularity on the holdouts to serve "
        "its own answers (unset: only for logs without logged impressions, whose offline "
        "comparison with popularity is not skewed by exposure; docs/model.md).",
    )
    promotion_first_model_min_users: int = Field(
        default=30,
        ge=1,
        description="First-model rule: fewest users a holdout needs before its comparison "
        "with popularity can keep the model from serving (docs/model.md).",
    )

    # Serving.
    api_keys: dict[str, list[str]] | None = Field(
        default=None,
        description='Keys injected by the deployment: JSON {"<key>": ["recommend", "events"]}.',
    )
    auth_enabled: bool = Field(default=True, description="Require X-API-Key on API routes.")
    rate_limit_rps: float = Field(default=200.0, description="Default per-key requests/second.")
    rate_limit_burst: int = Field(default=400, description="Default per-key burst.")
    model_poll_seconds: float = Field(
        default=2.0, description="How often each worker checks the registry aliases."
    )
    store_timeout_ms: float = Field(
        default=50.0, description="Budget for a document store or index call before fallback."
    )
    impression_sync: bool = Field(
        default=True,
        description="Answer only once the answer's impressions are fsynced (group commit); "
        "false = answer at once and commit in the background (a crash can lose the last "
        "group, a few milliseconds of impressions).",
    )
    candidate_pool: int = Field(
        default=200, description="Candidates the ranker scores per request."
    )
    canary_ramp: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 1.0],
        description="Shares of users a candidate model is phased in to, step by step.",
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where workers unpack bundles; defaults to <home>/cache/models."
    )
    ranker_compile: bool = Field(
        default=True,
        description="Compile each loaded model's LightGBM ranker to native code (lleaves; "
        "cached under <model cache>/.compiled); false, or a failure, ranks with LightGBM.",
    )
    model_uri: str | None = Field(
        default=None,
        description="Pin the served model (oci://host/repo@sha256:... or a bundle directory) "
        "instead of following the registry aliases.",
    )
    run_dir: Path | None = Field(
        default=None,
        description="Directory the workers of one server share (token buckets, worker model "
        "state); `recsys serve` creates one. Unset = private to the process.",
    )

    # Closed loop: online CTR monitoring, retraining and the canary judge.
    ctr_bucket_seconds: int = Field(default=60, description="Time bucket of online CTR series.")
    ctr_recent_minutes: float = Field(default=10.0, description="Window tested for a CTR drop.")
    ctr_baseline_minutes: float = Field(
        default=60.0, description="Window before the recent one that sets the baseline CTR."
    )
    ctr_min_impressions: int = Field(
        default=500, description="Impressions each window needs before any verdict."
    )
    ctr_alpha: float = Field(default=0.01, description="Significance level of the drop test.")
    ctr_click_delay_seconds: float = Field(
        default=60.0,
        description="Impressions younger than this are not judged yet: their clicks may be late.",
    )
    ctr_min_relative_drop: float = Field(
        default=0.10, description="Smallest relative CTR drop worth a retraining."
    )
    retrain_cooldown_minutes: float = Field(
        default=60.0, description="After a triggered retraining, no new trigger for this long."
    )
    retrain_data_wait_minutes: float = Field(
        default=5.0,
        description="After a drop, wait this long at most for weblogs covering it to be processed.",
    )
    canary_min_impressions: int = Field(
        default=1000, description="Impressions per arm before the canary judge decides."
    )
    canary_alpha: float = Field(default=0.05, description="Significance level of the canary test.")
    canary_margin: float = Field(
        default=0.05,
        description="Relative CTR shortfall a candidate may have and still count as not worse.",
    )
    canary_max_minutes: float = Field(
        default=60.0, description="A canary without a verdict after this long is rolled back."
    )
    nightly_retrain_enabled: bool = Field(
        default=True, description="Retrain on a schedule even without a CTR drop."
    )
    nightly_retrain_cron: str = Field(
        default="0 3 * * *", description="When the scheduled retraining runs (UTC cron)."
    )
    closed_loop_tick_seconds: int = Field(
        default=30, description="How often the CTR-drop and canary sensors evaluate."
    )
    online_ctr_cron: str = Field(
        default="*/5 * * * *", description="When the online_ctr asset records a snapshot."
    )
    service_metrics_url: str | None = Field(
        default=None,
        description="The server's /metrics URL, scraped for service health (unset: skipped).",
    )

    # Packaging: the promoted model as an OCI artifact.
    oci_repository: str | None = Field(
        default=None,
        description="host[:port]/repo the promoted model is pushed to (ECR or any registry).",
    )
    oci_insecure: bool = Field(default=False, description="Plain HTTP to the OCI registry.")
    publish_on_promotion: bool = Field(
        default=True,
        description=(
            "Run publish_job (materialize promoted_image) whenever the production model "
            "changes (promotion_sensor, `recsys models promote|rollback`, the admin API; "
            "checked every sensor tick), so the registry artifact always matches production."
        ),
    )
    oci_username: str | None = Field(
        default=None, description="OCI registry user (ECR: unset, boto3 credentials are used)."
    )
    oci_password: str | None = Field(
        default=None, description="OCI registry password or token (secret)."
    )

    # Experiment tracking: training runs and the registry mirrored into MLflow.
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking server (http://host:5000) that records every retraining and "
            "mirrors the registry's versions and alias moves; unset: a SQLite store under "
            "<home>/mlflow; 'off': no MLflow. The lake registry stays what serving reads."
        ),
    )

    # Production Dagster instance.
    dagster_pg_url: str | None = Field(
        default=None, description="postgresql://... switches Dagster storage to PostgreSQL."
    )

    # Freshness alarm and notifier channels (the log channel is always on).
    freshness_minutes: float = Field(
        default=15.0, description="Alert when no weblogs have landed for this long."
    )
    smtp_host: str | None = Field(
        default=None, description="SMTP server of the email alert channel (unset: no email)."
    )
    smtp_port: int = Field(default=25, description="SMTP port.")
    smtp_user: str | None = Field(default=None, description="SMTP login (optional).")
    smtp_password: str | None = Field(default=None, description="SMTP password (secret).")
    smtp_starttls: bool = Field(
        default=False, description="Upgrade the SMTP connection with STARTTLS."
    )
    alert_email_from: str = Field(default="recsys@localhost", description="Sender of alert emails.")
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
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.resolved_home / "cache" / "models").expanduser()

    @property
    def embedded_mongo(self) -> bool:
        return not self.mongo_uri or self.mongo_uri.startswith("mongomock://")

    @property
    def docstore_path(self) -> Path:
        return self.resolved_home / "docstore" / f"{self.mongo_db}.sqlite"

    @property
    def alert_recipients(self) -> list[str]:
        if not self.alert_email_to:
            return []
        return [a.strip() for a in self.alert_email_to.split(",") if a.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of caching."""
    return Settings()
