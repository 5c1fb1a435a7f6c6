"""The canary judge: should a phased-in candidate model go further, stop, or wait?

A candidate only reaches the canary after it beat production offline
(``model_evaluation`` said ``promote``). Online, the burden of proof is therefore
"not worse", not "better": demanding a significant improvement would need sample
sizes a quiet site never reaches and would throw the offline evidence away, while
"not worse" is exactly the risk a canary exists to control. The rule, evaluated on
the traffic both arms received since the current ramp step began (the same
window; users are split by a stable hash of ``user_id``, so the arms are random
halves of one population):

1. Fewer than ``min_impressions`` in either arm: **wait** (no test is run on thin
   data, which also limits the damage of testing at every tick).
2. Candidate CTR significantly *below* production (one-sided two-proportion z-test,
   level ``alpha``): **rollback**.
3. Candidate CTR significantly *above* ``(1 - margin) x`` production CTR (the
   non-inferiority test, level ``alpha``; a significantly better candidate passes it
   with room to spare): **ramp** to the next share of ``ramp``, or **promote** when
   the next share is 100% (at 100% there is no production arm left to compare with).
4. Otherwise **wait**, until ``max_minutes`` after the canary started, when an
   undecided canary is **rolled back**: production is the model with a track record,
   and a split that never resolves only costs traffic and attention.

Known limits, documented rather than hidden: testing at every tick is sequential
peeking (the real error rate is somewhat above ``alpha``; the minimum sample and a
strict ``alpha`` keep it small), and impressions of one user are not independent,
so with very few users the z-test is optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from recsys_assets.monitoring.ctr import WindowStats, two_proportion_ztest
from recsys_serving.policies import CanaryPolicy

CanaryAction = Literal["wait", "ramp", "promote", "rollback"]


@dataclass(frozen=True)
class CanaryVerdict:
    action: CanaryAction
    reason: str
    candidate_version: str
    production_version: str | None
    share: float
    next_share: float | None
    candidate: WindowStats
    production: WindowStats
    z_worse: float | None
    p_worse: float | None
    z_not_worse: float | None
    p_not_worse: float | None
    elapsed_minutes: float
    policy: CanaryPolicy

    def describe(self) -> str:
        text = (
            f"{self.action} ({self.reason}): candidate {self.candidate_version} "
            f"{_pct(self.candidate.ctr)} on {self.candidate.impressions} impressions vs "
            f"production {self.production_version} {_pct(self.production.ctr)} on "
            f"{self.production.impressions}, share {self.share:.0%}"
        )
        if self.next_share is not None and self.action in ("ramp", "promote"):
            text += f" -> {self.next_share:.0%}"
        return text

    def evidence(self) -> dict[str, Any]:
        """JSON-ready; recorded in the registry history and the asset materialization."""
        return {
            "action": self.action,
            "reason": self.reason,
            "candidate_version": self.candidate_version,
            "production_version": self.production_version,
            "share": self.share,
            "next_share": self.next_share,
            "candidate": self.candidate.as_dict(),
            "production": self.production.as_dict(),
            "z_worse": _round(self.z_worse),
            "p_worse": _sig(self.p_worse),
            "z_not_worse": _round(self.z_not_worse),
            "p_not_worse": _sig(self.p_not_worse),
            "elapsed_minutes": round(self.elapsed_minutes, 2),
            "alpha": self.policy.alpha,
            "margin": self.policy.margin,
            "min_impressions": self.policy.min_impressions,
            "max_minutes": self.policy.max_minutes,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _sig(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def judge_canary(
    candidate: WindowStats,
    production: WindowStats,
    *,
    candidate_version: str,
    production_version: str | None,
    share: float,
    started_at: datetime,
    now: datetime,
    policy: CanaryPolicy,
) -> CanaryVerdict:
    """Apply the rule in the module docstring to one window of both arms."""
    elapsed = max(0.0, (now.astimezone(UTC) - started_at.astimezone(UTC)).total_seconds() / 60)
    z_worse = p_worse = z_ok = p_ok = None
    enough = min(candidate.impressions, production.impressions) >= policy.min_impressions
    if enough:
        z_worse, p_worse = two_proportion_ztest(
            candidate.clicks,
            candidate.impressions,
            production.clicks,
            production.impressions,
            alternative="less",
        )
        z_ok, p_ok = two_proportion_ztest(
            candidate.clicks,
            candidate.impressions,
            production.clicks,
            production.impressions,
            alternative="greater",
            margin=policy.margin,
        )

    def verdict(action: CanaryAction, reason: str, next_share: float | None) -> CanaryVerdict:
        return CanaryVerdict(
            action=action,
            reason=reason,
            candidate_version=candidate_version,
            production_version=production_version,
            share=share,
            next_share=next_share,
            candidate=candidate,
            production=production,
            z_worse=z_worse,
            p_worse=p_worse,
            z_not_worse=z_ok,
            p_not_worse=p_ok,
            elapsed_minutes=elapsed,
            policy=policy,
        )

    if p_worse is not None and p_worse < policy.alpha:
        return verdict("rollback", "significantly_worse", None)
    if p_ok is not None and p_ok < policy.alpha:
        following = policy.next_share(share)
        if following >= 1.0:
            return verdict("promote", "not_worse", 1.0)
        return verdict("ramp", "not_worse", following)
    if elapsed >= policy.max_minutes:
        return verdict("rollback", "timeout", None)
    return verdict("wait", "undecided" if enough else "thin_evidence", None)


def ramp_shares(policy: CanaryPolicy) -> Sequence[float]:
    """The whole path a successful canary takes, for logs and docs: e.g. 10% 50% 100%."""
    return (*policy.steps, 1.0)
