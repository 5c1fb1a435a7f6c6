"""The canary judge: promotes a better candidate, rolls back a worse one, waits while
evidence is thin, and rolls back a canary that never makes up its mind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from recsys_assets.monitoring.canary import CanaryPolicy, judge_canary, ramp_shares
from recsys_assets.monitoring.ctr import WindowStats
from recsys_serving.settings import Settings

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
POLICY = CanaryPolicy(
    ramp=(0.1, 0.5, 1.0), min_impressions=1000, alpha=0.05, margin=0.05, max_minutes=60
)


def arm(impressions: int, clicks: int) -> WindowStats:
    return WindowStats(START, START + timedelta(minutes=10), impressions, clicks)


def judge(candidate: WindowStats, production: WindowStats, share: float = 0.1, minutes=10):
    return judge_canary(
        candidate,
        production,
        candidate_version="v2",
        production_version="v1",
        share=share,
        started_at=START,
        now=START + timedelta(minutes=minutes),
        policy=POLICY,
    )


def test_better_candidate_ramps_then_is_promoted() -> None:
    first = judge(arm(2000, 200), arm(18000, 1080))  # 10% vs 6%
    assert first.action == "ramp" and first.next_share == 0.5
    assert first.p_worse is not None and first.p_worse > 0.5
    assert first.p_not_worse is not None and first.p_not_worse < 0.05
    last = judge(arm(10000, 1000), arm(10000, 600), share=0.5)
    assert last.action == "promote" and last.next_share == 1.0
    assert "promote (not_worse)" in last.describe()
    evidence = last.evidence()
    assert evidence["candidate"]["ctr"] == 0.1 and evidence["production"]["ctr"] == 0.06
    assert evidence["margin"] == 0.05 and evidence["reason"] == "not_worse"


def test_equal_candidate_advances_once_evidence_suffices() -> None:
    # Same CTR: "not worse by more than 5%" needs more data than "better" would.
    assert judge(arm(1500, 120), arm(13500, 1080)).action == "wait"
    assert judge(arm(60000, 4800), arm(60000, 4800), share=0.5).action == "promote"


def test_worse_candidate_is_rolled_back() -> None:
    verdict = judge(arm(3000, 120), arm(27000, 1620))  # 4% vs 6%
    assert verdict.action == "rollback" and verdict.reason == "significantly_worse"
    assert verdict.p_worse is not None and verdict.p_worse < 0.001
    assert verdict.next_share is None


def test_waits_while_evidence_is_thin() -> None:
    verdict = judge(arm(400, 80), arm(3600, 100))  # looks great, but only 400 impressions
    assert verdict.action == "wait" and verdict.reason == "thin_evidence"
    assert verdict.p_worse is None and verdict.p_not_worse is None


def test_undecided_or_thin_canary_is_rolled_back_on_timeout() -> None:
    assert judge(arm(400, 80), arm(3600, 100), minutes=61).reason == "timeout"
    undecided = judge(arm(1500, 110), arm(13500, 1080), minutes=60)
    assert (undecided.action, undecided.reason) == ("rollback", "timeout")
    # A clear verdict still wins over the clock.
    assert judge(arm(2000, 200), arm(18000, 1080), minutes=90).action == "ramp"


def test_false_rollback_rate_for_an_equal_candidate_is_near_alpha() -> None:
    rng = np.random.default_rng(5)
    rollbacks = 0
    for _ in range(400):
        c, p = rng.binomial(2000, 0.06), rng.binomial(18000, 0.06)
        rollbacks += judge(arm(2000, int(c)), arm(18000, int(p))).action == "rollback"
    assert rollbacks / 400 < 0.09


def test_policy_from_settings_and_validation() -> None:
    policy = Settings(home="/nonexistent").closed_loop.canary
    assert policy.first_share == 0.1 and list(ramp_shares(policy)) == [0.1, 0.5, 1.0]
    assert policy.next_share(0.1) == 0.5 and policy.next_share(0.5) == 1.0
    assert CanaryPolicy((0.25,), 10, 0.05, 0.0, 5).next_share(0.25) == 1.0
    for ramp in [(), (0.5, 0.1), (1.0,), (0.0, 0.5), (0.2, 1.5)]:
        with pytest.raises(ValueError, match="ramp"):
            CanaryPolicy(ramp, 10, 0.05, 0.05, 5)
    with pytest.raises(ValueError, match="margin"):
        CanaryPolicy((0.5,), 10, 0.05, 1.0, 5)
