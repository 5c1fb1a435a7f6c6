"""The demo report: phases, recovery arithmetic, markers, and real HTML + PNG files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from recsys_assets.report import RetrainRun, build_report_data, render_report

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
V1, V2 = "v20260302110000-aaaaaaaa", "v20260302120500-bbbbbbbb"


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def synthetic_timeline(path: Path) -> None:
    """12 minutes: drift at 4, promotion at 8; CTR 8% -> 4% -> 7.5% (expected alike)."""
    records: list[dict[str, Any]] = [{"type": "start", "t": 0, "ts": T0.timestamp()}]
    for step in range(1, 73):
        minute = step / 6
        version = V1 if minute <= 8 else V2
        ctr = 0.08 if minute <= 4 else 0.04 if minute <= 8 else 0.075
        by_version = {
            version: {
                "impressions": 1000,
                "clicks": int(ctr * 1000),
                "expected_ctr": ctr,
                "oracle_ctr": 0.14,
            }
        }
        if 7 < minute <= 8:  # the canary: the new model serves part of the traffic
            by_version[V2] = {
                "impressions": 500,
                "clicks": 37,
                "expected_ctr": 0.075,
                "oracle_ctr": 0.14,
            }
        records.append(
            {
                "type": "interval",
                "ts": at(minute).timestamp(),
                "seconds": 10,
                "by_version": by_version,
            }
        )
        if step == 24:
            records.append({"type": "drift", "ts": at(4).timestamp(), "t": 240})
    records.append({"type": "end", "ts": at(12).timestamp(), "requests": 7200})
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records))


DECISIONS = [
    {
        "at": at(5.5).isoformat(),
        "action": "drop_detected",
        "version": V1,
        "share": None,
        "reason": "drop: CTR 8.0% -> 4.0%",
    },
    {
        "at": at(7).isoformat(),
        "action": "canary_started",
        "version": V2,
        "share": 0.5,
        "reason": "offline evaluation says promote",
    },
    {
        "at": at(8).isoformat(),
        "action": "promote",
        "version": V2,
        "share": None,
        "reason": "canary not_worse",
    },
]


def test_phases_recovery_and_markers(tmp_path: Path) -> None:
    timeline = tmp_path / "live.ndjson"
    synthetic_timeline(timeline)
    retrain = RetrainRun("r1", at(5.6), at(6.9), "SUCCESS", "ctr_drop")
    data = build_report_data(timeline, DECISIONS, [retrain], initial_version=V1)
    assert set(data.phases) == {"before", "during", "after"}
    assert data.phases["before"].ctr == pytest.approx(0.08)
    assert data.phases["during"].ctr == pytest.approx(0.04)  # the stale model's own traffic
    assert data.phases["after"].ctr == pytest.approx(0.075)
    recovery = data.recovery
    assert recovery is not None
    assert recovery.expected == pytest.approx((0.075 - 0.04) / (0.08 - 0.04))
    kinds = [m.kind for m in data.markers]
    assert kinds == ["drift", "drop_detected", "retrain", "canary_started", "promote"]
    assert data.labels[V1].startswith("model before the drift")
    assert data.labels[V2].startswith("retrained model #1")

    files = render_report(data, tmp_path / "report", DECISIONS, {"Dagster UI": "http://x:3000"})
    png = files.png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = files.html.read_text()
    assert "data:image/png;base64," in page and "drop_detected" in page
    assert "87.50%" in page  # expected-CTR recovery
    assert "http://x:3000" in page


def test_without_drift_or_promotion_the_report_still_renders(tmp_path: Path) -> None:
    timeline = tmp_path / "live.ndjson"
    records = [
        {"type": "start", "ts": T0.timestamp()},
        {
            "type": "interval",
            "ts": at(1).timestamp(),
            "seconds": 10,
            "by_version": {
                V1: {"impressions": 100, "clicks": 5, "expected_ctr": 0.05, "oracle_ctr": 0.1}
            },
        },
    ]
    timeline.write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    data = build_report_data(timeline, [])
    assert list(data.phases) == ["before"] and data.recovery is None
    files = render_report(data, tmp_path / "r", [])
    assert "No promotion after the drift" in files.html.read_text()
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b'{"type": "interval"}\n')
    with pytest.raises(ValueError, match="no start record"):
        build_report_data(bad, [])
