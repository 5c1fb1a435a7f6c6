"""The closed loop's thresholds as a Dagster resource, built from ``Settings``.

Sensors and the ``online_ctr`` asset read their windows and significance levels from
here, so the Dagster UI shows the exact configuration a decision was made under,
and tests swap thresholds by constructing the resource rather than patching env.
"""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
from pydantic import Field

from recsys_assets.monitoring.canary import CanaryPolicy
from recsys_assets.monitoring.ctr import DropPolicy
from recsys_serving.settings import Settings


class ClosedLoopConfig(dg.ConfigurableResource):
    """Online CTR windows, the drop test, the cool-down and the canary judge."""

    ctr_bucket_seconds: int = 60
    ctr_recent_minutes: float = 10.0
    ctr_baseline_minutes: float = 60.0
    ctr_min_impressions: int = 500
    ctr_alpha: float = 0.01
    ctr_min_relative_drop: float = 0.10
    ctr_click_delay_seconds: float = 60.0
    retrain_cooldown_minutes: float = 60.0
    retrain_data_wait_minutes: float = 5.0
    landing_segment_max_age_seconds: float = 10.0
    canary_ramp: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])
    canary_min_impressions: int = 1000
    canary_alpha: float = 0.05
    canary_margin: float = 0.05
    canary_max_minutes: float = 60.0
    service_metrics_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ClosedLoopConfig:
        return cls(
            ctr_bucket_seconds=settings.ctr_bucket_seconds,
            ctr_recent_minutes=settings.ctr_recent_minutes,
            ctr_baseline_minutes=settings.ctr_baseline_minutes,
            ctr_min_impressions=settings.ctr_min_impressions,
            ctr_alpha=settings.ctr_alpha,
            ctr_min_relative_drop=settings.ctr_min_relative_drop,
            ctr_click_delay_seconds=settings.ctr_click_delay_seconds,
            retrain_cooldown_minutes=settings.retrain_cooldown_minutes,
            retrain_data_wait_minutes=settings.retrain_data_wait_minutes,
            landing_segment_max_age_seconds=settings.landing_segment_max_age_seconds,
            canary_ramp=list(settings.canary_ramp),
            canary_min_impressions=settings.canary_min_impressions,
            canary_alpha=settings.canary_alpha,
            canary_margin=settings.canary_margin,
            canary_max_minutes=settings.canary_max_minutes,
            service_metrics_url=settings.service_metrics_url,
        )

    def drop_policy(self) -> DropPolicy:
        return DropPolicy(
            recent_minutes=self.ctr_recent_minutes,
            baseline_minutes=self.ctr_baseline_minutes,
            min_impressions=self.ctr_min_impressions,
            alpha=self.ctr_alpha,
            min_relative_drop=self.ctr_min_relative_drop,
            click_delay_seconds=self.ctr_click_delay_seconds,
            bucket_seconds=self.ctr_bucket_seconds,
        )

    def canary_policy(self) -> CanaryPolicy:
        return CanaryPolicy(
            ramp=tuple(self.canary_ramp),
            min_impressions=self.canary_min_impressions,
            alpha=self.canary_alpha,
            margin=self.canary_margin,
            max_minutes=self.canary_max_minutes,
        )

    @property
    def cooldown(self) -> timedelta:
        return timedelta(minutes=self.retrain_cooldown_minutes)
