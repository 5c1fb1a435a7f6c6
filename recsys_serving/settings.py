"""One configuration object for the whole project, nested by concern.

Every process (collector, server, Dagster code location, CLI) reads the same
``RECSYS_*`` environment, so the embedded defaults line up without set-up and a
deployment switches a backend by changing one variable, never code.

``Settings`` holds one group per concern (``settings.lake``, ``.events``,
``.collector``, ``.stores``, ``.training``, ``.promotion``, ``.serving``,
``.closed_loop``, ``.packaging``, ``.platform``, ``.alerts``). Each knob is declared
once, with its default, in the object that uses it: the typed policies
(:class:`~recsys_serving.training_params.TrainingParams`,
:class:`~recsys_serving.policies.PromotionRule`, ``DropPolicy``, ``CanaryPolicy``)
are themselves groups, and the Dagster resources wrap them. The environment names stay
flat, as users set them: a group's fields are read from ``RECSYS_<prefix><FIELD>``
(the prefix is the group's :class:`EnvGroup` marker, e.g. ``ctr_`` for the drop test;
empty for most groups). Keyword arguments take the same flat names
(``Settings(home=..., seed=7)``) or whole groups; :func:`setting_fields` lists every
variable for ``recsys config`` and the reference page.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from functools import cache, lru_cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from recsys_serving.policies import DOC, CanaryPolicy, DropPolicy, PromotionRule
from recsys_serving.training_params import TrainingParams

ENV_PREFIX = "RECSYS_"


@dataclass(frozen=True)
class EnvGroup:
    """Marks a nested group whose fields are read from ``RECSYS_<prefix><FIELD>``.

    ``overrides`` names one more variable holding a JSON object whose entries replace
    any field of the group, declared with :func:`~recsys_serving.policies.knob` or not
    (``RECSYS_TRAIN_PARAMS``); it wins over the group's own variables.
    """

    prefix: str = ""
    overrides: str | None = None
    overrides_doc: str = ""


@dataclass(frozen=True)
class SettingField:
    """One ``RECSYS_*`` variable: its flat name, where it lives in ``Settings``, its default."""

    name: str  # lower case; the variable without RECSYS_, and the keyword argument
    path: tuple[str, ...]
    annotation: Any
    default: Any
    description: str
    overrides: bool = False  # a JSON object merged into the group at ``path``

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.name.upper()}"

    @property
    def is_complex(self) -> bool:
        """Lists and objects are JSON in the environment (like pydantic-settings)."""
        return self.overrides or _is_complex(self.annotation)

    def value(self, settings: Settings) -> Any:
        obj: Any = settings
        for part in self.path:
            obj = getattr(obj, part)
        if not self.overrides:
            return obj
        # The effective overrides: fields that are not settings of their own and differ
        # from the default (the JSON given may have set some to their default).
        own = {f.name for f in setting_fields() if f.path[:-1] == self.path}
        default = type(obj)()
        return {
            f.name: getattr(obj, f.name)
            for f in dataclasses.fields(obj)
            if f.name not in own and getattr(obj, f.name) != getattr(default, f.name)
        }


def _is_complex(annotation: Any) -> bool:
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_complex(arg) for arg in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, list | tuple | dict | set | frozenset)


def _group_type(annotation: Any) -> type | None:
    if isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    ):
        return annotation
    return None


def _walk(model: type, prefix: str, path: tuple[str, ...]) -> Iterator[SettingField]:
    if issubclass(model, BaseModel):
        for name, info in model.model_fields.items():
            yield from _field(name, info, prefix, path)
        return
    hints = typing.get_type_hints(model)
    for item in dataclasses.fields(model):
        if DOC not in item.metadata:
            continue  # an internal constant of the policy, not a setting
        default = (
            item.default_factory()  # type: ignore[misc]
            if item.default_factory is not dataclasses.MISSING
            else item.default
        )
        yield SettingField(
            prefix + item.name, (*path, item.name), hints[item.name], default, item.metadata[DOC]
        )


def _field(
    name: str, info: FieldInfo, prefix: str, path: tuple[str, ...]
) -> Iterator[SettingField]:
    group = _group_type(info.annotation)
    if group is None:
        yield SettingField(
            prefix + name,
            (*path, name),
            info.annotation,
            info.get_default(call_default_factory=True),
            info.description or "",
        )
        return
    marker = next((m for m in info.metadata if isinstance(m, EnvGroup)), EnvGroup())
    yield from _walk(group, prefix + marker.prefix, (*path, name))
    if marker.overrides:
        yield SettingField(
            marker.overrides, (*path, name), dict[str, Any], {}, marker.overrides_doc, True
        )


@cache
def setting_fields() -> tuple[SettingField, ...]:
    """Every ``RECSYS_*`` variable, in declaration order (groups in ``Settings`` order)."""
    fields = tuple(_walk(Settings, "", ()))
    names = [f.name for f in fields]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"two settings read the same variable: {clashes}")
    return fields


@cache
def _by_name() -> dict[str, SettingField]:
    return {f.name: f for f in setting_fields()}


def default_of(group: type, name: str) -> Any:
    """The declared default of setting ``name`` of ``group`` (a settings group or a typed
    policy), for code that needs it without a ``Settings`` (a function's default
    argument, a fallback): it refers to the one declaration instead of copying it."""
    if issubclass(group, BaseModel):
        return group.model_fields[name].get_default(call_default_factory=True)
    item = next(f for f in dataclasses.fields(group) if f.name == name)
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


class FlatEnvSource(PydanticBaseSettingsSource):
    """Reads every setting from its flat ``RECSYS_<NAME>`` variable.

    pydantic-settings reads a nested model from ``RECSYS_<GROUP>__<FIELD>`` or from
    one JSON variable; the documented names are flat, so this source returns flat
    names and ``Settings`` nests them. Names are case-insensitive, lists and objects
    JSON, like pydantic-settings' own environment source.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # values are read per setting in __call__

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix", "")).lower()
        environ = {key.lower(): value for key, value in os.environ.items()}
        values: dict[str, Any] = {}
        for field in setting_fields():
            raw = environ.get(prefix + field.name)
            if raw is None:
                continue
            if field.is_complex:
                try:
                    values[field.name] = json.loads(raw)
                except ValueError as exc:
                    raise SettingsError(f"{field.env} is not valid JSON: {exc}") from exc
            else:
                values[field.name] = raw
        return values


def _as_dict(value: Any) -> dict[str, Any]:
    """A group as a mutable mapping (shallow: nested groups stay objects until touched)."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return {name: getattr(value, name) for name in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return dict(value)


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any, merge: bool) -> None:
    head, *rest = path
    if not rest and not merge:
        data[head] = value
        return
    group = _as_dict(data.get(head))
    if rest:
        _put(group, tuple(rest), value, merge)
    else:
        group.update(value)
    data[head] = group


class _Group(BaseModel):
    """A concern's settings; a misspelt field is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class LakeSettings(_Group):
    """Where embedded state and the lake live."""

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

    @field_validator("lake_uri")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class EventSettings(_Group):
    """The event contract, business rules and data-quality checks of the weblogs step."""

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


class CollectorSettings(_Group):
    """Intake limits of POST /events and the landing segments it writes."""

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


class StoreSettings(_Group):
    """Users and content (MongoDB API), candidate index (embedded or Elasticsearch)."""

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


class ServingSettings(_Group):
    """The HTTP API and its workers."""

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


class ClosedLoopSettings(_Group):
    """Online CTR monitoring, retraining and the canary judge."""

    drop: Annotated[DropPolicy, EnvGroup("ctr_")] = Field(default_factory=DropPolicy)
    canary: Annotated[CanaryPolicy, EnvGroup("canary_")] = Field(default_factory=CanaryPolicy)
    retrain_cooldown_minutes: float = Field(
        default=60.0, description="After a triggered retraining, no new trigger for this long."
    )
    retrain_data_wait_minutes: float = Field(
        default=5.0,
        description="After a drop, wait this long at most for weblogs covering it to be processed.",
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


class PackagingSettings(_Group):
    """The promoted model as an OCI artifact."""

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


class PlatformSettings(_Group):
    """The services that keep the pipeline's records: Dagster storage and MLflow."""

    dagster_pg_url: str | None = Field(
        default=None, description="postgresql://... switches Dagster storage to PostgreSQL."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking server (http://host:5000) that records every retraining and "
            "mirrors the registry's versions and alias moves; unset: a SQLite store under "
            "<home>/mlflow; 'off': no MLflow. The lake registry stays what serving reads."
        ),
    )


class AlertSettings(_Group):
    """The freshness alarm and the notifier channels (the log channel is always on)."""

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    lake: LakeSettings = Field(default_factory=LakeSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    stores: StoreSettings = Field(default_factory=StoreSettings)
    training: Annotated[
        TrainingParams,
        EnvGroup(
            overrides="train_params",
            overrides_doc="Overrides of any TrainingParams field (JSON), e.g. "
            '{"als_factors": 96, "recent_days": 0.01}; see docs/model.md.',
        ),
    ] = Field(default_factory=TrainingParams)
    promotion: Annotated[PromotionRule, EnvGroup("promotion_")] = Field(
        default_factory=PromotionRule
    )
    serving: ServingSettings = Field(default_factory=ServingSettings)
    closed_loop: ClosedLoopSettings = Field(default_factory=ClosedLoopSettings)
    packaging: PackagingSettings = Field(default_factory=PackagingSettings)
    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, FlatEnvSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat names (keywords, environment) go to their group; JSON overrides go last."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fields = _by_name()
        overrides = []
        for name in [n for n in data if n in fields]:
            field, value = fields[name], data.pop(name)
            if field.overrides:
                overrides.append((field, value))
            else:
                _put(data, field.path, value, merge=False)
        for field, value in overrides:
            if not isinstance(value, dict):
                raise ValueError(f"{field.env} must be a JSON object, got {value!r}")
            _put(data, field.path, value, merge=True)
        return data

    @field_validator("training")
    @classmethod
    def _check_training(cls, value: TrainingParams) -> TrainingParams:
        value.check()
        return value

    def replace(self, **values: Any) -> Settings:
        """A validated copy with some settings changed, by flat name (``seed=7``) or
        group; the environment is not read again."""
        # Not model_validate: BaseSettings validates through __init__, which reads the
        # environment again and would undo changes made since.
        fields = type(self).model_fields
        data = self._nest({name: getattr(self, name) for name in fields} | values)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        update = {name: _adapter(name).validate_python(data[name]) for name in fields}
        self._check_training(update["training"])
        return self.model_copy(update=update)

    @property
    def resolved_home(self) -> Path:
        return self.lake.home.expanduser().resolve()

    @property
    def resolved_lake_uri(self) -> str:
        if self.lake.lake_uri:
            return self.lake.lake_uri
        return str(self.resolved_home / "lake")

    @property
    def dagster_home(self) -> Path:
        return self.resolved_home / "dagster"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (
            self.serving.model_cache_dir or self.resolved_home / "cache" / "models"
        ).expanduser()

    @property
    def embedded_mongo(self) -> bool:
        uri = self.stores.mongo_uri
        return not uri or uri.startswith("mongomock://")

    @property
    def docstore_path(self) -> Path:
        return self.resolved_home / "docstore" / f"{self.stores.mongo_db}.sqlite"

    @property
    def alert_recipients(self) -> list[str]:
        if not self.alerts.alert_email_to:
            return []
        return [a.strip() for a in self.alerts.alert_email_to.split(",") if a.strip()]


@cache
def _adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(Settings.model_fields[name].annotation)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of caching."""
    return Settings()
