"""The typed policies of promotion and the closed loop: the one place each knob has a default.

``Settings`` nests these objects (``settings.promotion``, ``settings.closed_loop.drop`` /
``.canary``), reading each field from ``RECSYS_PROMOTION_<FIELD>``,
``RECSYS_CTR_<FIELD>`` / ``RECSYS_CANARY_<FIELD>``; the Dagster resources and the CLI
wrap them. They live in ``recsys_serving`` (pure Python, no Dagster) because
the settings module that nests them does, and serving must not import the pipeline.

A field declared with :func:`knob` is a setting (its ``doc`` is the reference page's
text); a plain field is an internal constant of the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ConfigDict

from recsys_serving.layout import utc_datetime

DOC = "doc"


def knob(default: Any, doc: str) -> Any:
    """A dataclass field that is also a ``RECSYS_*`` setting, documented where declared.

    For a mutable default (list, dict) declare ``field(default_factory=...,
    metadata={DOC: ...})`` instead.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("a mutable default needs field(default_factory=..., metadata={DOC: ...})")
    return field(default=default, metadata={DOC: doc})


def utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


def floor_to_bucket(value: datetime, bucket_seconds: int) -> datetime:
    return utc_datetime(math.floor(utc(value).timestamp() / bucket_seconds) * bucket_seconds)


@dataclass(frozen=True)
class DropPolicy:
    """When a CTR drop is real and large enough to retrain for (``RECSYS_CTR_*``)."""

    # Validated as a settings group: a misspelt name is an error, not ignored.
    __pydantic_config__ = ConfigDict(extra="forbid")

    recent_minutes: float = knob(10.0, "Window tested for a CTR drop.")
    baseline_minutes: float = knob(60.0, "Window before the recent one that sets the baseline CTR.")
    min_impressions: int = knob(500, "Impressions each window needs before any verdict.")
    alpha: float = knob(0.01, "Significance level of the drop test.")
    min_relative_drop: float = knob(0.10, "Smallest relative CTR drop worth a retraining.")
    click_delay_seconds: float = knob(
        60.0, "Impressions younger than this are not judged yet: their clicks may be late."
    )
    bucket_seconds: int = knob(60, "Time bucket of online CTR series.")

    @property
    def lookback(self) -> timedelta:
        """How much history one test reads: both windows, as much again before the
        baseline (to see whether the version's traffic covers it), the click delay and
        a bucket of slack."""
        return timedelta(
            minutes=self.recent_minutes + 2 * self.baseline_minutes,
            seconds=self.click_delay_seconds + 2 * self.bucket_seconds,
        )

    def windows(self, now: datetime) -> tuple[datetime, datetime, datetime]:
        """``(baseline_start, recent_start, end)`` aligned to bucket boundaries.

        The end leaves out impressions younger than the click delay, whose clicks
        may still be on their way; counting them would fake a drop at every tick.
        """
        end = floor_to_bucket(
            utc(now) - timedelta(seconds=self.click_delay_seconds), self.bucket_seconds
        )
        recent = max(1, round(self.recent_minutes * 60 / self.bucket_seconds))
        baseline = max(1, round(self.baseline_minutes * 60 / self.bucket_seconds))
        recent_start = end - timedelta(seconds=recent * self.bucket_seconds)
        baseline_start = recent_start - timedelta(seconds=baseline * self.bucket_seconds)
        return baseline_start, recent_start, end


@dataclass(frozen=True)
class CanaryPolicy:
    """How a candidate is phased in and judged (``RECSYS_CANARY_*``; see monitoring/canary.py)."""

    # Validated as a settings group: a misspelt name is an error, not ignored.
    __pydantic_config__ = ConfigDict(extra="forbid")

    ramp: tuple[float, ...] = knob(
        (0.1, 0.5, 1.0), "Shares of users a candidate model is phased in to, step by step."
    )
    min_impressions: int = knob(1000, "Impressions per arm before the canary judge decides.")
    alpha: float = knob(0.05, "Significance level of the canary test.")
    margin: float = knob(
        0.05, "Relative CTR shortfall a candidate may have and still count as not worse."
    )
    max_minutes: float = knob(60.0, "A canary without a verdict after this long is rolled back.")

    def __post_init__(self) -> None:
        if not self.ramp or any(not 0.0 < s <= 1.0 for s in self.ramp):
            raise ValueError(f"canary ramp shares must be in (0, 1]: {list(self.ramp)}")
        if list(self.ramp) != sorted(set(self.ramp)):
            raise ValueError(f"canary ramp must increase strictly: {list(self.ramp)}")
        if self.ramp[0] >= 1.0:
            raise ValueError("canary ramp needs a share below 1.0: 1.0 means promoted")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError("canary margin must be in [0, 1)")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("canary alpha must be in (0, 1)")

    @property
    def steps(self) -> tuple[float, ...]:
        """The shares a candidate is served at (a trailing 100% means "promote")."""
        return tuple(s for s in self.ramp if s < 1.0)

    @property
    def first_share(self) -> float:
        return self.steps[0]

    def next_share(self, share: float) -> float:
        """The share after ``share``; ``1.0`` means the candidate becomes production."""
        for step in self.steps:
            if step > share + 1e-9:
                return step
        return 1.0


@dataclass(frozen=True, slots=True)
class PromotionRule:
    """Higher is better for every metric. ``min_lift`` and guardrail tolerances are
    relative: 0.01 = the challenger must be 1% better; 0.05 = a guardrail metric may not
    fall more than 5% below production."""

    # Validated as a settings group: a misspelt name is an error, not ignored.
    __pydantic_config__ = ConfigDict(extra="forbid")

    metric: str = knob("ndcg@10", "Primary offline metric a challenger must beat.")
    min_lift: float = knob(0.01, "Relative lift over production required to promote.")
    guardrails: dict[str, float] = field(
        default_factory=lambda: {"recall@10": 0.05, "coverage@10": 0.20},
        metadata={DOC: "Metric -> largest relative drop tolerated (JSON in the environment)."},
    )
    # The first-model rule (decide_first_model): a holdout with fewer users cannot keep a
    # model from serving; ``first_model_z`` is the one-sided confidence of "clearly below".
    first_model_min_users: int = knob(
        30,
        "First-model rule: fewest users a holdout needs before its comparison "
        "with popularity can keep the model from serving (docs/model.md).",
    )
    first_model_z: float = 1.645
    # None: the rule applies to logs without logged impressions only (see
    # decide_first_model); True / False: always / never.
    first_model_gate: bool | None = knob(
        None,
        "First-model rule: a model must beat popularity on the holdouts to serve "
        "its own answers (unset: only for logs without logged impressions, whose offline "
        "comparison with popularity is not skewed by exposure; docs/model.md).",
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_lift) or self.min_lift < 0:
            raise ValueError(f"min_lift must be a finite number >= 0, got {self.min_lift}")
        for name, tolerance in self.guardrails.items():
            if not math.isfinite(tolerance) or tolerance < 0:
                raise ValueError(f"guardrail {name!r}: tolerance must be >= 0, got {tolerance}")
        if self.first_model_min_users < 1:
            raise ValueError("first_model_min_users must be at least 1")
        if not math.isfinite(self.first_model_z) or self.first_model_z < 0:
            raise ValueError(
                f"first_model_z must be a finite number >= 0, got {self.first_model_z}"
            )
