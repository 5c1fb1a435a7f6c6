"""The synthetic world: ground truth, historic weblogs and ``recsys simulate``."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from recsys_assets.simulation.history import (
    CORRUPT_KINDS,
    SimulationSummary,
    simulate_history,
)
from recsys_assets.simulation.policy import logging_slates
from recsys_assets.simulation.truth import GroundTruth
from recsys_serving.events.schema import EVENT_TYPES, WeblogEvent

END = datetime(2024, 6, 1, tzinfo=UTC)
SMALL: dict[str, Any] = {
    "n_users": 300,
    "n_items": 200,
    "n_categories": 8,
    "days": 3,
    "seed": 3,
    "end": END,
}


@dataclass
class Sim:
    summary: SimulationSummary
    raw: list[bytes]
    events: list[WeblogEvent]  # the lines that pass the contract, in file order


def _raw_lines(summary: SimulationSummary) -> list[bytes]:
    lines: list[bytes] = []
    for path in summary.weblog_paths:
        lines.extend(path.read_bytes().splitlines())
    return lines


def _parse(raw: list[bytes]) -> tuple[list[WeblogEvent], int]:
    events, invalid = [], 0
    for line in raw:
        try:
            events.append(WeblogEvent.model_validate(orjson.loads(line)))
        except (orjson.JSONDecodeError, ValidationError):
            invalid += 1
    return events, invalid


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    calls: list[tuple[int, int]] = []
    summary = simulate_history(
        tmp_path_factory.mktemp("clean"),
        n_events=60_000,
        files=3,
        progress_cb=lambda done, total: calls.append((done, total)),
        **SMALL,
    )
    assert calls and calls[-1] == (60_000, 60_000)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    raw = _raw_lines(summary)
    events, invalid = _parse(raw)
    assert invalid == 0
    return Sim(summary, raw, events)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- history
def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    kwargs = {**SMALL, "n_events": 8_000, "corrupt_fraction": 0.01, "files": 2}
    simulate_history(tmp_path / "a", **kwargs)
    simulate_history(tmp_path / "b", **kwargs)
    simulate_history(tmp_path / "c", **{**kwargs, "seed": 4})
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert {"items.ndjson", "users.ndjson", "truth.npz", "truth.json"} <= set(a)
    assert {"weblogs/part-00000.ndjson", "weblogs/part-00001.ndjson"} <= set(a)
    assert a == b
    assert a["weblogs/part-00000.ndjson"] != c["weblogs/part-00000.ndjson"]


def test_rerun_replaces_previous_part_files(tmp_path: Path) -> None:
    simulate_history(tmp_path, **{**SMALL, "n_events": 3_000, "files": 3})
    summary = simulate_history(tmp_path, **{**SMALL, "n_events": 2_000, "files": 1})
    assert sorted((tmp_path / "weblogs").iterdir()) == summary.weblog_paths
    assert len(_raw_lines(summary)) == 2_000


def test_every_line_obeys_the_contract(clean: Sim) -> None:
    s = clean.summary
    assert len(clean.raw) == s.n_events == 60_000
    assert len(s.weblog_paths) == 3
    assert len({e.event_id for e in clean.events}) == len(clean.events)
    assert Counter(e.event_type for e in clean.events) == Counter(
        {k: v for k, v in s.counts.items() if v}
    )
    assert set(s.counts) == set(EVENT_TYPES) and all(s.counts.values())
    start, end = (END - timedelta(days=3)).timestamp(), END.timestamp()
    assert all(start <= e.ts <= end for e in clean.events)
    for e in clean.events:
        assert e.user_id.startswith("u") and e.item_id.startswith("i")
        if e.event_type in ("impression", "click"):
            assert e.request_id and e.position is not None and e.model_version
        else:
            assert e.request_id is None and e.position is None


def test_sessions_timestamps_and_formats(clean: Sim) -> None:
    events = clean.events
    without_session = sum(e.session_id is None for e in events) / len(events)
    assert 0.04 < without_session < 0.2
    epoch = sum(isinstance(orjson.loads(line)["ts"], float) for line in clean.raw) / len(clean.raw)
    assert 0.03 < epoch < 0.07
    assert all(b"Z" in line for line in clean.raw if b'"ts":"' in line)

    last: dict[str, float] = {}
    for e in events:
        if e.session_id is not None:
            assert e.ts >= last.get(e.session_id, 0.0), "time runs backwards in a session"
            last[e.session_id] = e.ts
    # Roughly time-ordered: only session tails crossing chunk boundaries step back.
    ts = np.array([e.ts for e in events])
    assert (np.diff(ts) < 0).mean() < 0.01
    assert clean.summary.first_ts is not None and clean.summary.last_ts is not None
    assert clean.summary.first_ts.timestamp() == pytest.approx(ts.min())
    assert clean.summary.last_ts.timestamp() == pytest.approx(ts.max())


def test_clicks_come_from_impressions_of_the_same_request(clean: Sim) -> None:
    shown: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
    clicked: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for e in clean.events:
        assert e.request_id is not None or e.event_type not in ("impression", "click")
        if e.event_type == "impression":
            assert e.request_id is not None and e.position is not None
            assert e.position not in shown[e.request_id]
            shown[e.request_id][e.position] = (e.user_id, e.item_id)
        elif e.event_type == "click":
            assert e.request_id is not None and e.position is not None
            clicked[e.request_id].append((e.position, e.user_id, e.item_id))
    assert clicked
    partial = 0
    for slate in shown.values():
        assert len(slate) <= 10
        partial += sorted(slate) != list(range(len(slate)))
        assert len({item for _, item in slate.values()}) == len(slate), "duplicate item in slate"
        assert len({user for user, _ in slate.values()}) == 1
    # The export is cut at exactly n_events, which may split one slate.
    assert partial <= 1
    for request_id, clicks in clicked.items():
        assert len(clicks) <= len(shown[request_id])
        for position, user, item in clicks:
            assert shown[request_id][position] == (user, item)


def test_funnel_follows_clicks(clean: Sim) -> None:
    items = [orjson.loads(line) for line in clean.summary.items_path.read_bytes().splitlines()]
    price = {item["item_id"]: item["price"] for item in items}
    clicked: set[tuple[str, str]] = set()
    carted: set[tuple[str, str]] = set()
    for e in clean.events:
        key = (e.user_id, e.item_id)
        if e.event_type == "click":
            clicked.add(key)
        elif e.event_type in ("view", "add_to_cart", "purchase", "rating"):
            assert key in clicked, f"{e.event_type} without an earlier click"
        if e.event_type == "add_to_cart":
            carted.add(key)
        if e.event_type == "purchase":
            assert key in carted
            assert e.value == price[e.item_id]
        if e.event_type == "rating":
            assert e.value in (1, 2, 3, 4, 5)
    c = clean.summary.counts
    assert c["impression"] > c["click"] > c["view"] > c["add_to_cart"] > c["purchase"] > 0


def test_position_bias_is_visible(clean: Sim) -> None:
    impressions, clicks = np.zeros(10), np.zeros(10)
    for e in clean.events:
        if e.event_type == "impression":
            impressions[e.position] += 1
        elif e.event_type == "click":
            clicks[e.position] += 1
    ctr = clicks / impressions
    assert ctr[0] > 2 * ctr[9]
    assert 0.03 < clean.summary.ctr < 0.08
    assert clean.summary.ctr == pytest.approx(clicks.sum() / impressions.sum())


def test_corruption_is_counted_exactly(tmp_path: Path) -> None:
    summary = simulate_history(tmp_path, n_events=20_000, corrupt_fraction=0.02, **SMALL)
    raw = _raw_lines(summary)
    assert len(raw) == 20_000
    assert summary.n_corrupt == 400
    assert sum(summary.corrupt_kinds.values()) == 400
    assert set(summary.corrupt_kinds) == set(CORRUPT_KINDS)
    assert all(summary.corrupt_kinds.values()), summary.corrupt_kinds
    events, invalid = _parse(raw)
    assert invalid == summary.n_invalid == 400 - summary.corrupt_kinds["duplicate"]
    repeats = Counter(e.event_id for e in events)
    assert sum(n - 1 for n in repeats.values()) == summary.corrupt_kinds["duplicate"]
    assert sum(summary.counts.values()) == 20_000 - 400


def test_tiny_catalogue_shows_short_slates(tmp_path: Path) -> None:
    summary = simulate_history(
        tmp_path, **{**SMALL, "n_items": 4, "n_categories": 2, "n_users": 5}, n_events=2_000
    )
    events, invalid = _parse(_raw_lines(summary))
    assert invalid == 0 and len(events) == 2_000
    per_request = Counter(e.request_id for e in events if e.event_type == "impression")
    assert max(per_request.values()) <= 4


def test_zero_events_and_bad_arguments(tmp_path: Path) -> None:
    summary = simulate_history(tmp_path, n_events=0, **SMALL)
    assert summary.n_events == 0 and [p.read_bytes() for p in summary.weblog_paths] == [b""]
    with pytest.raises(ValueError):
        simulate_history(tmp_path, n_events=10, **{**SMALL, "days": 0})
    with pytest.raises(ValueError):
        simulate_history(tmp_path, n_events=10, corrupt_fraction=1.5, **SMALL)


# ----------------------------------------------------------------------------- truth
@pytest.fixture(scope="module")
def truth() -> GroundTruth:
    return GroundTruth.generate(500, 300, 10, seed=11, start=END - timedelta(days=7), end=END)


def test_truth_ids_and_shapes(truth: GroundTruth) -> None:
    assert truth.user_ids[123] == "u000123" and truth.item_ids[42] == "i00042"
    assert truth.category_ids[7] == "c07"
    assert truth.item_index(["i00042", "i00007"]).tolist() == [42, 7]
    with pytest.raises(KeyError):
        truth.item_index(["i99999"])
    cats = truth.item_categories
    assert (cats[:, 0] >= 0).all()
    for row in cats:
        present = row[row >= 0]
        assert len(set(present.tolist())) == len(present) and (row[len(present) :] == -1).all()
    assert truth.user_activity.sum() == pytest.approx(1.0)
    assert truth.examination(np.arange(10)).tolist() == sorted(
        truth.examination(np.arange(10)).tolist(), reverse=True
    )


def test_click_probability_is_calibrated(truth: GroundTruth) -> None:
    rng = np.random.default_rng(0)
    at = rng.integers(truth.start_ms, truth.end_ms, size=5_000)
    slates = logging_slates(truth, rng, at)
    users = truth.sample_users(rng, 5_000)
    req, pos = np.nonzero(slates >= 0)
    p = truth.click_probability(users[req], slates[req, pos], pos)
    assert 0.03 < p.mean() < 0.08
    assert np.allclose(p, truth.examination(pos) * truth.relevance(users[req], slates[req, pos]))
    # Only published items are shown.
    assert (truth.item_published_ms[slates[req, pos]] <= at[req]).all()


def test_save_load_round_trip(truth: GroundTruth, tmp_path: Path) -> None:
    npz, meta = truth.save(tmp_path / "truth")
    assert (npz.name, meta.name) == ("truth.npz", "truth.json")
    loaded = GroundTruth.load(tmp_path / "truth.npz")
    for name in GroundTruth.ARRAY_FIELDS:
        assert np.array_equal(getattr(loaded, name), getattr(truth, name)), name
    assert (loaded.start, loaded.end, loaded.offset) == (truth.start, truth.end, truth.offset)
    u, i, p = np.arange(50), np.arange(50) % truth.n_items, np.arange(50) % 10
    assert np.array_equal(loaded.click_probability(u, i, p), truth.click_probability(u, i, p))
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again.npz").read_bytes() == npz.read_bytes()


def test_drift_moves_preferences_and_leaves_the_original_alone(truth: GroundTruth) -> None:
    before = truth.user_vectors.copy(), truth.user_affinity.copy(), truth.n_items
    same = truth.drifted(0.0, seed=1)
    assert np.allclose(same.user_vectors, truth.user_vectors, atol=1e-5)

    users = np.arange(200)
    base = truth.relevance_matrix(users)

    def agreement(strength: float) -> float:
        moved = truth.drifted(strength, seed=1).relevance_matrix(users)
        return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(base, moved, strict=True)]))

    mild, strong = agreement(0.2), agreement(0.9)
    assert 1.0 > mild > strong
    grown = truth.drifted(0.5, seed=2, new_items=25)
    assert grown.n_items == truth.n_items + 25
    assert grown.item_ids[-1] == f"i{truth.n_items + 24:05d}"
    assert (grown.item_published_ms[-25:] == truth.end_ms).all()
    assert grown.item_popularity.sum() == pytest.approx(1.0)
    assert np.array_equal(truth.user_vectors, before[0])
    assert np.array_equal(truth.user_affinity, before[1])
    assert truth.n_items == before[2] and len(truth.item_ids) == before[2]
    with pytest.raises(ValueError, match="read-only"):
        truth.user_vectors[0, 0] = 0.0


# ------------------------------------------------------------------------------- CLI
def test_cli_simulate(tmp_path: Path) -> None:
    from recsys_assets.cli import app

    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--users", "100", "--items", "50"]
    args += ["--categories", "5", "--days", "2", "--events", "5000", "--seed", "9"]
    args += ["--corrupt-fraction", "0.01", "--end", "2024-06-01T00:00:00Z"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "simulated 5,000 events (50 corrupt) for 100 users x 50 items over 2 days" in (
        result.stdout
    )
    assert (out / "weblogs" / "part-00000.ndjson").exists()
    assert (out / "truth.npz").exists() and (out / "items.ndjson").exists()
    meta = orjson.loads((out / "simulation.json").read_bytes())
    assert meta["end"] == "2024-06-01T00:00:00Z" and meta["n_events"] == 5_000

    bad = CliRunner().invoke(app, ["simulate", "--out", str(out), "--end", "last tuesday"])
    assert bad.exit_code == 1
    assert "--end" in bad.output
