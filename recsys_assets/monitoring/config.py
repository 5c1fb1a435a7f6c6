"""The closed loop's configuration as a Dagster resource, wrapping ``Settings``' group.

Sensors and the ``online_ctr`` asset read their windows and significance levels from
here, so the Dagster UI shows the exact configuration a decision was made under, and
tests swap thresholds by building the resource from their own ``Settings``. The
resource declares no knob of its own: ``knobs`` is ``settings.closed_loop`` as JSON
(the drop test, the canary judge, cool-down, ...), validated back into the typed
policies, whose declarations hold every default.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from recsys_assets.resources import GroupConfig
from recsys_serving.policies import CanaryPolicy, DropPolicy
from recsys_serving.settings import ClosedLoopSettings, CollectorSettings, Settings


def _knobs(closed_loop: ClosedLoopSettings) -> dict[str, Any]:
    return closed_loop.model_dump(mode="json")


class ClosedLoopConfig(dg.ConfigurableResource):
    """Online CTR windows, the drop test, the cool-down and the canary judge."""

    knobs: GroupConfig = Field(
        default_factory=lambda: _knobs(ClosedLoopSettings()),
        description="settings.closed_loop (RECSYS_CTR_*, RECSYS_CANARY_*, RECSYS_RETRAIN_*, "
        "...); fields left out take their declared defaults.",
    )
    collector: GroupConfig = Field(
        default_factory=dict,
        description="The collector settings the CTR tail depends on (how long a landing "
        "segment stays open); fields left out take their declared defaults.",
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> ClosedLoopConfig:
        return cls(
            knobs=_knobs(settings.closed_loop),
            collector={
                "landing_segment_max_age_seconds": (
                    settings.collector.landing_segment_max_age_seconds
                )
            },
        )

    def settings(self) -> ClosedLoopSettings:
        return ClosedLoopSettings.model_validate(self.knobs)

    def drop_policy(self) -> DropPolicy:
        return self.settings().drop

    def canary_policy(self) -> CanaryPolicy:
        return self.settings().canary

    @property
    def cooldown(self) -> timedelta:
        return timedelta(minutes=self.settings().retrain_cooldown_minutes)

    @property
    def retrain_data_wait_minutes(self) -> float:
        return self.settings().retrain_data_wait_minutes

    @property
    def service_metrics_url(self) -> str | None:
        return self.settings().service_metrics_url

    @property
    def landing_segment_max_age_seconds(self) -> float:
        return CollectorSettings.model_validate(self.collector).landing_segment_max_age_seconds
