"""Dagster resources, all built from the one ``Settings`` object.

Assets ask for a resource, never for an environment variable, so tests swap a
backend by constructing a resource and deployments by setting ``RECSYS_*``.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, PrivateAttr

from recsys_serving.lake import Lake, open_lake
from recsys_serving.settings import EventSettings, LakeSettings, Settings

SETTING = "recsys/setting"

# A settings group inside a resource's config (``group.model_dump(mode="json")``),
# validated back into its typed object by the resource. A plain ``dict``: Dagster gives
# it a permissive shape that takes nulls (``dict[str, Any]`` becomes a map that does not).
GroupConfig = dict


def declared(group: type[BaseModel], name: str) -> Any:
    """A resource field that shows the setting ``group.name``: its default and description
    are the setting's own, so a knob keeps one declaration however many resources show it."""
    info = group.model_fields[name]
    return Field(
        default=info.get_default(call_default_factory=True),
        description=info.description,
        json_schema_extra={SETTING: f"{group.__name__}.{name}"},
    )


class LakeResource(dg.ConfigurableResource):
    """The data lake (local directory or s3://bucket/prefix)."""

    uri: str
    s3_endpoint_url: str | None = None
    region: str = declared(LakeSettings, "aws_region")

    _lake: Lake | None = PrivateAttr(default=None)

    @classmethod
    def from_settings(cls, settings: Settings) -> LakeResource:
        return cls(
            uri=settings.resolved_lake_uri,
            s3_endpoint_url=settings.lake.s3_endpoint_url,
            region=settings.lake.aws_region,
        )

    def get(self) -> Lake:
        if self._lake is None:
            self._lake = open_lake(self.uri, endpoint_url=self.s3_endpoint_url, region=self.region)
        return self._lake


class RecsysConfig(dg.ConfigurableResource):
    """Business rules and thresholds, so a run records the settings it used."""

    catalog_epoch: str
    future_tolerance_seconds: float
    bot_max_events_per_minute: int
    session_gap_minutes: float
    max_duplicate_rate: float
    freshness_minutes: float
    max_unattributed_click_rate: float = declared(EventSettings, "max_unattributed_click_rate")
    min_rows_for_rate_checks: int = declared(EventSettings, "min_rows_for_rate_checks")

    @classmethod
    def from_settings(cls, settings: Settings) -> RecsysConfig:
        return cls(
            catalog_epoch=settings.events.catalog_epoch.isoformat(),
            future_tolerance_seconds=settings.events.future_tolerance_seconds,
            bot_max_events_per_minute=settings.events.bot_max_events_per_minute,
            session_gap_minutes=settings.events.session_gap_minutes,
            max_duplicate_rate=settings.events.max_duplicate_rate,
            freshness_minutes=settings.alerts.freshness_minutes,
            max_unattributed_click_rate=settings.events.max_unattributed_click_rate,
            min_rows_for_rate_checks=settings.events.min_rows_for_rate_checks,
        )
