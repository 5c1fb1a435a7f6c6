"""Online CTR: attribution on request_id, the series, the lake sources and the drop test."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from recsys_assets.monitoring.ctr import (
    SERIES_SCHEMA,
    DropPolicy,
    attribute_clicks,
    ctr_series,
    drop_test,
    load_ctr_series,
    read_feedback,
    two_proportion_ztest,
    window_stats,
)
from recsys_serving.lake import LocalLake, write_parquet
from recsys_serving.layout import weblogs_key
from support import land

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def ev(
    kind: str, req: str, item: str, at: datetime, version: str | None = "v1", n: int = 0
) -> dict[str, Any]:
    return {
        "event_id": f"{kind}-{req}-{item}-{n}",
        "event_type": kind,
        "item_id": item,
        "ts": at,
        "request_id": req,
        "model_version": version,
    }


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    schema = {
        "event_id": pl.String,
        "event_type": pl.String,
        "item_id": pl.String,
        "ts": pl.Datetime("us", "UTC"),
        "request_id": pl.String,
        "model_version": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def test_clicks_count_only_for_the_impression_they_came_from() -> None:
    rows = [
        *(ev("impression", "r1", f"i{p}", T0) for p in range(4)),
        *(ev("impression", "r2", f"i{p}", T0 + timedelta(seconds=70), "v2") for p in range(2)),
        ev("click", "r1", "i1", T0 + timedelta(seconds=5)),
        ev("click", "r1", "i1", T0 + timedelta(seconds=6), n=1),  # double click: counts once
        ev("click", "r2", "i0", T0 + timedelta(seconds=75), "v2"),
        ev("click", "r1", "i9", T0 + timedelta(seconds=5)),  # never shown in r1: orphan
        ev("click", "r404", "i1", T0 + timedelta(seconds=5)),  # unknown request: orphan
    ]
    attributed = attribute_clicks(frame(rows))
    assert attributed.orphan_clicks == 2
    assert attributed.impressions.height == 6
    assert attributed.impressions["clicked"].sum() == 2

    series = ctr_series(attributed, bucket_seconds=60)
    assert series.schema == pl.Schema(SERIES_SCHEMA)
    got = {(r["bucket_start"], r["model_version"]): r for r in series.iter_rows(named=True)}
    first = got[(T0, "v1")]
    assert (first["requests"], first["impressions"], first["clicks"]) == (1, 4, 1)
    assert first["ctr"] == pytest.approx(0.25)
    second = got[(T0 + timedelta(minutes=1), "v2")]
    assert (second["impressions"], second["clicks"], second["ctr"]) == (2, 1, 0.5)


def test_impressions_without_model_version_are_kept_as_unknown() -> None:
    attributed = attribute_clicks(frame([ev("impression", "r1", "i1", T0, version=None)]))
    assert ctr_series(attributed, 60)["model_version"].to_list() == ["unknown"]
    assert ctr_series(attributed.impressions.clear(), 60).is_empty()
    with pytest.raises(ValueError, match="bucket_seconds"):
        ctr_series(attributed, 0)


def test_reads_processed_partition_plus_unprocessed_landing_tail(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    now = datetime.now(UTC).replace(microsecond=0)
    day = now.date().isoformat()
    processed = [
        {**ev("impression", "r1", f"i{p}", now - timedelta(minutes=5)), "user_id": "u1"}
        for p in range(3)
    ]
    processed.append({**ev("view", "r1", "i0", now - timedelta(minutes=5)), "user_id": "u1"})
    write_parquet(
        lake, weblogs_key(day), frame(processed).with_columns(pl.lit("u1").alias("user_id"))
    )
    # Pretend the partition was written 20 minutes ago: older landing files are in it.
    old = time.time() - 1200
    os.utime(lake.local_path(weblogs_key(day)), (old, old))

    def landed(e: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in e.items() if v is not None}
        return {**out, "user_id": "u1", "ts": e["ts"].timestamp()}

    land(lake, [landed(processed[0])])  # already in the partition: deduplicated
    land(
        lake,
        [
            landed(ev("impression", "r2", "i5", now - timedelta(minutes=1))),
            landed(ev("click", "r2", "i5", now - timedelta(seconds=50))),
            landed(ev("click", "r1", "i2", now - timedelta(minutes=4))),
        ],
    )
    events = read_feedback(lake, now - timedelta(hours=1), now + timedelta(seconds=1))
    assert sorted(events["event_type"].to_list()) == ["click", "click"] + ["impression"] * 4
    assert events["event_id"].n_unique() == events.height

    series, orphans = load_ctr_series(
        lake, now + timedelta(seconds=1), lookback=timedelta(hours=1), bucket_seconds=3600
    )
    assert orphans == 0
    assert series["impressions"].sum() == 4 and series["clicks"].sum() == 2
    only_processed = read_feedback(
        lake, now - timedelta(hours=1), now + timedelta(seconds=1), include_landing=False
    )
    assert only_processed.height == 3  # the view is not feedback


# ---------------------------------------------------------------------- drop test
POLICY = DropPolicy(
    recent_minutes=10,
    baseline_minutes=30,
    min_impressions=500,
    alpha=0.01,
    min_relative_drop=0.10,
    click_delay_seconds=60,
    bucket_seconds=60,
)
NOW = T0 + timedelta(hours=2)


def synthetic_series(
    rng: np.random.Generator,
    ctr_by_minute: list[float],
    per_minute: int = 200,
    version: str = "v1",
    end: datetime = NOW,
) -> pl.DataFrame:
    """One bucket per minute ending at ``end``; clicks drawn from the given CTRs."""
    n = len(ctr_by_minute)
    starts = [end - timedelta(minutes=n - i) for i in range(n)]
    clicks = rng.binomial(per_minute, ctr_by_minute)
    return pl.DataFrame(
        {
            "bucket_start": starts,
            "model_version": [version] * n,
            "requests": [per_minute // 10] * n,
            "impressions": [per_minute] * n,
            "clicks": clicks.tolist(),
            "ctr": (clicks / per_minute).tolist(),
        },
        schema=SERIES_SCHEMA,
    )


def test_windows_align_to_buckets_and_skip_impressions_too_young_for_clicks() -> None:
    base, recent, end = POLICY.windows(NOW + timedelta(seconds=30))
    assert end == NOW - timedelta(minutes=1)
    assert recent == end - timedelta(minutes=10)
    assert base == recent - timedelta(minutes=30)


def test_noise_is_not_a_drop() -> None:
    rng = np.random.default_rng(1)
    outcomes = [
        drop_test(synthetic_series(rng, [0.08] * 60), "v1", NOW, POLICY).outcome for _ in range(200)
    ]
    # alpha = 1% and one-sided: a handful at most, never a systematic trigger.
    assert outcomes.count("drop") <= 6
    assert set(outcomes) <= {"drop", "no_drop", "small_drop"}


def test_a_real_drop_is_detected_with_its_evidence() -> None:
    rng = np.random.default_rng(2)
    series = synthetic_series(rng, [0.08] * 45 + [0.04] * 15)
    verdict = drop_test(series, "v1", NOW, POLICY)
    assert verdict.outcome == "drop" and verdict.dropped
    assert verdict.recent is not None and verdict.baseline is not None
    assert verdict.recent.impressions == 10 * 200 and verdict.baseline.impressions == 30 * 200
    assert verdict.relative_drop is not None and verdict.relative_drop > 0.3
    assert verdict.p_value is not None and verdict.p_value < 1e-6 and verdict.z < -5
    evidence = verdict.evidence()
    assert evidence["recent"]["ctr"] < evidence["baseline"]["ctr"]
    assert evidence["alpha"] == 0.01 and evidence["model_version"] == "v1"
    assert "drop: v1 CTR" in verdict.describe()


def test_significant_but_small_drop_and_thin_evidence_do_not_trigger() -> None:
    rng = np.random.default_rng(3)
    big = synthetic_series(rng, [0.10] * 45 + [0.093] * 15, per_minute=20_000)
    assert drop_test(big, "v1", NOW, POLICY).outcome == "small_drop"
    thin = synthetic_series(rng, [0.08] * 45 + [0.0] * 15, per_minute=20)
    assert drop_test(thin, "v1", NOW, POLICY).outcome == "thin_evidence"
    assert drop_test(thin, None, NOW, POLICY).outcome == "no_model"


def test_only_the_given_model_version_is_judged() -> None:
    rng = np.random.default_rng(4)
    old = synthetic_series(rng, [0.08] * 45 + [0.0] * 15, version="v1")
    new = synthetic_series(rng, [0.03] * 12, version="v2")  # promoted 12 minutes ago
    series = pl.concat([old, new])
    assert drop_test(series, "v1", NOW, POLICY).outcome == "drop"
    # v2 has no baseline yet: it cannot be blamed for anything.
    assert drop_test(series, "v2", NOW, POLICY).outcome == "thin_evidence"
    # Traffic that began inside the baseline window does not make a baseline either.
    young = synthetic_series(rng, [0.09] * 5 + [0.07] * 30, per_minute=2000, version="v3")
    assert drop_test(young, "v3", NOW, POLICY).outcome == "warming_up"
    stats = window_stats(series, "v2", NOW - timedelta(minutes=12), NOW)
    assert stats.impressions == 12 * 200


def test_two_proportion_ztest_matches_the_textbook_formula() -> None:
    z, p = two_proportion_ztest(40, 1000, 80, 1000, alternative="less")
    pooled = 120 / 2000
    expected = (0.04 - 0.08) / np.sqrt(pooled * (1 - pooled) * 2 / 1000)
    assert z == pytest.approx(expected)
    assert p == pytest.approx(norm.cdf(expected))
    z2, p2 = two_proportion_ztest(80, 1000, 40, 1000, alternative="greater")
    assert z2 == pytest.approx(-expected) and p2 == pytest.approx(p)
    # Non-inferiority: 7.6% vs 8% with a 10% margin means 7.6% vs 7.2%, unpooled.
    z3, _ = two_proportion_ztest(760, 10_000, 800, 10_000, alternative="greater", margin=0.1)
    se = np.sqrt(0.076 * 0.924 / 10_000 + 0.81 * 0.08 * 0.92 / 10_000)
    assert z3 == pytest.approx((0.076 - 0.072) / se)
    assert two_proportion_ztest(0, 100, 0, 100, alternative="less") == (None, None)
    assert two_proportion_ztest(0, 0, 3, 100, alternative="less") == (None, None)


def test_two_proportion_ztest_with_unequal_window_sizes() -> None:
    """Equal sizes hide a pooled proportion averaged without weights, or 1/n used for
    both windows: the recent window is usually much smaller than the baseline one."""
    # 30/500 = 6% against 240/3000 = 8%. By hand: pooled p = 270/3500 = 0.0771429,
    # SE = sqrt(0.0771429 * 0.9228571 * (1/500 + 1/3000)) = 0.0128885,
    # z = (0.06 - 0.08) / 0.0128885 = -1.55177, one-sided p = Phi(z) = 0.06036.
    z, p = two_proportion_ztest(30, 500, 240, 3000, alternative="less")
    assert z == pytest.approx(-1.551767, abs=1e-6)
    assert p == pytest.approx(0.060359, abs=1e-6)
    # Swapped roles: the same z with the other sign, the same one-sided p.
    z_swapped, p_swapped = two_proportion_ztest(240, 3000, 30, 500, alternative="greater")
    assert z_swapped == pytest.approx(1.551767, abs=1e-6)
    assert p_swapped == pytest.approx(0.060359, abs=1e-6)
    # Non-inferiority with a 10% margin, unpooled: 150/2000 = 7.5% against 0.9 * 8% =
    # 7.2% of 4000/50000; SE = sqrt(0.075 * 0.925 / 2000 + 0.81 * 0.08 * 0.92 / 50000)
    # = 0.0059900, z = 0.003 / 0.0059900 = 0.500837, p = 1 - Phi(z) = 0.308243.
    z_ni, p_ni = two_proportion_ztest(150, 2000, 4000, 50_000, alternative="greater", margin=0.1)
    assert z_ni == pytest.approx(0.500837, abs=1e-6)
    assert p_ni == pytest.approx(0.308243, abs=1e-6)
