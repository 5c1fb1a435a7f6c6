"""Promotion decisions: from an offline "promote" to a canary, and from the canary to
production or back.

Plain functions over the registry and the lake, so the sensors stay thin and every
path is tested without a daemon. The registry is the state: the ``candidate`` alias
*is* the running canary (its ``share``, when its current step began, and in its
evidence when the canary started and what the offline evaluation said), so a daemon
restart loses nothing and the next tick simply judges again. Every alias move goes
through the registry (atomic, compare-and-set on the version the judge looked at,
recorded in its history with the evidence); every decision, including the ones
that move nothing (a rejected challenger, a detected drop), is also appended to
``monitoring/decisions/`` in the lake, which is what the demo report reads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from recsys_assets.monitoring.canary import CanaryPolicy, CanaryVerdict, judge_canary
from recsys_assets.monitoring.ctr import (
    DropPolicy,
    floor_to_bucket,
    load_ctr_series,
    window_stats,
)
from recsys_serving.lake import Lake
from recsys_serving.layout import CANDIDATE, DECISIONS_AREA, PRODUCTION, parse_utc, utc_datetime
from recsys_serving.registry import (
    AliasConflict,
    AliasState,
    InvalidBundle,
    ModelRegistry,
    NothingToRollBack,
)

Action = Literal[
    "drop_detected",
    "canary_started",
    "ramp",
    "promote",
    "rollback",
    "rejected",
    "first_model",
    "retrain_failed",
]


@dataclass(frozen=True)
class EvaluationOutcome:
    """What ``model_evaluation`` concluded about a challenger that was then registered."""

    version: str
    decision: str  # promote | reject | first_model
    reason: str
    production_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "evaluated_against": self.production_version,
            "metrics": self.metrics,
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class Decision:
    """One closed-loop decision with its evidence; becomes metadata, history and an alert."""

    action: Action
    version: str | None
    reason: str
    at: datetime
    production_version: str | None = None  # production after the decision
    previous_production: str | None = None
    share: float | None = None  # candidate share after the decision
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def severity(self) -> Literal["info", "warning"]:
        return (
            "warning" if self.action in ("rollback", "drop_detected", "retrain_failed") else "info"
        )

    @property
    def title(self) -> str:
        v = self.version or "?"
        return {
            "drop_detected": f"online CTR dropped for {v}: retraining launched",
            "canary_started": f"canary started for {v} at {_pct(self.share)}",
            "ramp": f"canary for {v} ramped to {_pct(self.share)}",
            "promote": f"{v} promoted to production",
            "rollback": f"canary for {v} rolled back",
            "rejected": f"challenger {v} rejected offline",
            "first_model": f"{v} is the first production model",
            "retrain_failed": "retraining failed; production unchanged",
        }[self.action]

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "version": self.version,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "production_version": self.production_version,
            "previous_production": self.previous_production,
            "share": self.share,
            "evidence": self.evidence,
        }

    def metadata(self) -> dict[str, Any]:
        """Flat figures the Dagster UI can plot, plus the full evidence as JSON."""
        meta: dict[str, Any] = {
            "action": self.action,
            "model_version": self.version or "",
            "production_version": self.production_version or "",
            "previous_production": self.previous_production or "",
            "candidate_share": self.share if self.share is not None else 0.0,
            "reason": self.reason,
        }
        online = self.evidence.get("online") or {}
        for arm in ("candidate", "production"):
            stats = online.get(arm) or {}
            if stats.get("ctr") is not None:
                meta[f"{arm}_ctr"] = float(stats["ctr"])
                meta[f"{arm}_impressions"] = int(stats["impressions"])
        for key in ("p_worse", "p_not_worse"):
            if online.get(key) is not None:
                meta[key] = float(online[key])
        return meta


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def record_decision(lake: Lake, decision: Decision) -> str:
    """Append a decision to the lake's audit log; returns its key."""
    stamp = decision.at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"{DECISIONS_AREA}/{stamp}-{decision.action}.json"
    lake.put_bytes(key, orjson.dumps(decision.as_dict(), option=orjson.OPT_INDENT_2))
    return key


def read_decisions(lake: Lake, since: datetime | None = None) -> list[dict[str, Any]]:
    """Decisions in time order (optionally only those at or after ``since``)."""
    rows = []
    for obj in lake.list(f"{DECISIONS_AREA}/"):
        if not obj.key.endswith(".json"):
            continue
        row = orjson.loads(lake.get_bytes(obj.key))
        if since is None or datetime.fromisoformat(row["at"]) >= since:
            rows.append(row)
    return sorted(rows, key=lambda r: r["at"])


# --------------------------------------------------------------------- offline -> canary
def start_canary(
    registry: ModelRegistry,
    evaluation: EvaluationOutcome,
    policy: CanaryPolicy,
    now: datetime,
) -> Decision | None:
    """Act on an evaluation of a registered challenger; None if it was already acted on."""
    version = evaluation.version
    production = registry.alias(PRODUCTION)
    candidate = registry.alias(CANDIDATE)
    if production is not None and production.version == version:
        return None  # already serving (the first model is promoted by training itself)
    if candidate is not None and candidate.version == version:
        return None  # its canary is running
    offline = evaluation.summary()
    prod_version = production.version if production else None
    if evaluation.decision not in ("promote", "first_model"):
        reason = evaluation.reason or f"model_evaluation decided {evaluation.decision!r}"
        return Decision(
            "rejected",
            version,
            reason,
            now,
            production_version=prod_version,
            previous_production=prod_version,
            share=candidate.share if candidate else None,
            evidence={"offline": offline},
        )
    if production is None:
        reason = f"no production model yet; offline: {evaluation.reason or evaluation.decision}"
        try:
            registry.promote(version, reason=reason, evidence={"offline": offline})
        except InvalidBundle as exc:
            return _damaged(version, exc, now, prod_version, candidate, offline)
        if candidate is not None:
            # The canary it replaces has nothing to be compared with any more.
            _clear_candidate(registry, candidate.version, "superseded by the first model")
        return Decision(
            "first_model",
            version,
            reason,
            now,
            production_version=version,
            evidence={"offline": offline},
        )
    evidence: dict[str, Any] = {
        "offline": offline,
        "canary_started_at": now.isoformat(),
        "ramp": list(policy.steps),
    }
    if candidate is not None:
        evidence["superseded"] = candidate.version
    share = policy.first_share
    reason = f"offline evaluation says promote ({evaluation.reason}); canary at {_pct(share)}"
    try:
        registry.set_alias(CANDIDATE, version, share=share, reason=reason, evidence=evidence)
    except InvalidBundle as exc:
        return _damaged(version, exc, now, prod_version, candidate, offline)
    return Decision(
        "canary_started",
        version,
        reason,
        now,
        production_version=prod_version,
        previous_production=prod_version,
        share=share,
        evidence=evidence,
    )


def _damaged(
    version: str,
    exc: InvalidBundle,
    now: datetime,
    prod_version: str | None,
    candidate: Any,
    offline: dict[str, Any],
) -> Decision:
    """A challenger whose registered bundle fails verification never gets an alias."""
    return Decision(
        "rejected",
        version,
        f"not phased in: {exc}",
        now,
        production_version=prod_version,
        previous_production=prod_version,
        share=candidate.share if candidate else None,
        evidence={"offline": offline, "invalid_bundle": str(exc)},
    )


def _clear_candidate(registry: ModelRegistry, version: str, reason: str) -> None:
    # If someone moved it meanwhile, their decision stands.
    with contextlib.suppress(AliasConflict, NothingToRollBack):
        registry.clear_alias(CANDIDATE, reason=reason, expected=version)


# ---------------------------------------------------------------------- canary judging
def _ceil_to_bucket(value: datetime, bucket_seconds: int) -> datetime:
    return utc_datetime(math.ceil(value.timestamp() / bucket_seconds) * bucket_seconds)


def canary_window(
    step_started: datetime, now: datetime, drop: DropPolicy
) -> tuple[datetime, datetime]:
    """Whole buckets since the current step began, minus impressions too young to judge."""
    start = _ceil_to_bucket(step_started, drop.bucket_seconds)
    end = floor_to_bucket(now - timedelta(seconds=drop.click_delay_seconds), drop.bucket_seconds)
    return start, max(start, end)


@dataclass(frozen=True)
class CanaryStep:
    decision: Decision | None
    verdict: CanaryVerdict | None


@dataclass(frozen=True)
class CanaryAssessment:
    """What the judge would do with the running canary now, before anything moves.

    ``verdict`` is None when there is nothing to compare (no production model, or the
    candidate already is production): the candidate is then simply promoted.
    """

    candidate: AliasState
    production: AliasState | None
    carried: dict[str, Any]
    verdict: CanaryVerdict | None

    @property
    def action(self) -> str:
        return "promote" if self.verdict is None else self.verdict.action


def assess_canary(
    registry: ModelRegistry,
    lake: Lake,
    drop: DropPolicy,
    policy: CanaryPolicy,
    now: datetime,
) -> CanaryAssessment | None:
    """Judge the running canary once without moving anything; None if there is none.

    Read-only, so the promotion sensor can decide *that* a judging run is due; the run
    then calls :func:`step_canary`, which judges again on the same window and applies.
    """
    candidate = registry.alias(CANDIDATE)
    if candidate is None:
        return None
    version = candidate.version
    production = registry.alias(PRODUCTION)
    carried = {
        k: candidate.evidence[k]
        for k in ("offline", "canary_started_at", "ramp")
        if k in candidate.evidence
    }
    if production is None or production.version == version:
        return CanaryAssessment(candidate, production, carried, None)
    started = parse_utc(carried.get("canary_started_at")) or candidate.updated_at
    start, end = canary_window(candidate.updated_at, now, drop)
    lookback = now - start + timedelta(seconds=drop.bucket_seconds)
    series, _orphans = load_ctr_series(
        lake, now, lookback=lookback, bucket_seconds=drop.bucket_seconds
    )
    verdict = judge_canary(
        window_stats(series, version, start, end),
        window_stats(series, production.version, start, end),
        candidate_version=version,
        production_version=production.version,
        share=candidate.share,
        started_at=started,
        now=now,
        policy=policy,
    )
    return CanaryAssessment(candidate, production, carried, verdict)


def step_canary(
    registry: ModelRegistry,
    lake: Lake,
    drop: DropPolicy,
    policy: CanaryPolicy,
    now: datetime,
) -> CanaryStep:
    """Judge the running canary once and apply the verdict (ramp, promote or roll back)."""
    assessment = assess_canary(registry, lake, drop, policy, now)
    if assessment is None:
        return CanaryStep(None, None)
    return apply_canary(registry, assessment, now)


def apply_canary(
    registry: ModelRegistry, assessment: CanaryAssessment, now: datetime
) -> CanaryStep:
    """Move the aliases as ``assessment`` says (compare-and-set on the judged version).

    Every alias move of the canary happens here (and in :func:`start_canary`).
    """
    version = assessment.candidate.version
    production = assessment.production
    carried = assessment.carried
    verdict = assessment.verdict
    if verdict is None:
        reason = (
            "candidate is already production"
            if production is not None
            else "no production model to compare with"
        )
        try:
            registry.promote(version, reason=reason, evidence=carried)
        except AliasConflict:
            return CanaryStep(None, None)
        except InvalidBundle as exc:
            return CanaryStep(_drop_damaged(registry, version, exc, now, production), None)
        previous = production.version if production else None
        decision = Decision(
            "promote",
            version,
            reason,
            now,
            production_version=version,
            previous_production=previous,
            evidence=carried,
        )
        return CanaryStep(decision, None)
    assert production is not None  # a verdict compares the candidate with production
    if verdict.action == "wait":
        return CanaryStep(None, verdict)
    evidence = {**carried, "online": verdict.evidence()}
    reason = f"canary {verdict.reason}: {verdict.describe()}"
    try:
        if verdict.action == "ramp":
            assert verdict.next_share is not None
            registry.set_alias(
                CANDIDATE,
                version,
                share=verdict.next_share,
                reason=reason,
                evidence=evidence,
                expected=version,
            )
            decision = Decision(
                "ramp",
                version,
                reason,
                now,
                production_version=production.version,
                previous_production=production.version,
                share=verdict.next_share,
                evidence=evidence,
            )
        elif verdict.action == "promote":
            registry.promote(version, reason=reason, evidence=evidence)
            decision = Decision(
                "promote",
                version,
                reason,
                now,
                production_version=version,
                previous_production=production.version,
                evidence=evidence,
            )
        else:
            registry.clear_alias(CANDIDATE, reason=reason, evidence=evidence, expected=version)
            decision = Decision(
                "rollback",
                version,
                reason,
                now,
                production_version=production.version,
                previous_production=production.version,
                evidence=evidence,
            )
    except (AliasConflict, NothingToRollBack):
        # A person (or another process) moved the alias since we read it: the next tick
        # judges whatever is there now.
        return CanaryStep(None, verdict)
    except InvalidBundle as exc:
        return CanaryStep(_drop_damaged(registry, version, exc, now, production), verdict)
    return CanaryStep(decision, verdict)


def _drop_damaged(
    registry: ModelRegistry, version: str, exc: InvalidBundle, now: datetime, production: Any
) -> Decision | None:
    """The candidate's bundle went bad during its canary: end the canary, never promote."""
    reason = f"candidate bundle fails verification: {exc}"
    try:
        registry.clear_alias(CANDIDATE, reason=reason, expected=version)
    except (AliasConflict, NothingToRollBack):
        return None  # someone moved it meanwhile; the next tick sees what is there
    prod = production.version if production is not None else None
    return Decision(
        "rollback",
        version,
        reason,
        now,
        production_version=prod,
        previous_production=prod,
        evidence={"invalid_bundle": str(exc)},
    )
