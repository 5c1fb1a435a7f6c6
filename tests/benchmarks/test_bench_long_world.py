"""bench/serve.py's long-history world: Zipf-distributed history lengths, distinct items."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import serve


def test_long_history_world_has_zipf_history_lengths(tmp_path: Path) -> None:
    info = serve.long_history_world(tmp_path, n_users=300, n_items=2_500, seed=3)
    events = pl.read_ndjson(tmp_path / "events.ndjson")
    per_user = events.group_by("user_id").agg(
        pl.len().alias("n"), pl.col("item_id").n_unique().alias("distinct")
    )
    assert per_user.height == 300
    # Every user rates distinct items; the most active LONG_MAX_EVENTS, the least
    # LONG_MIN_EVENTS, and most users few (a long tail, not a uniform spread).
    assert (per_user["n"] == per_user["distinct"]).all()
    assert per_user["n"].max() == serve.LONG_MAX_EVENTS
    assert per_user["n"].min() == serve.LONG_MIN_EVENTS
    assert per_user["n"].median() < (serve.LONG_MIN_EVENTS + serve.LONG_MAX_EVENTS) / 4
    assert info["events"] == events.height
    assert set(events["event_type"].unique()) == {"rating"}
    assert events["value"].is_between(1, 5).all()
    assert events["ts"].is_sorted()
    items = pl.read_ndjson(tmp_path / "items.ndjson")
    assert set(events["item_id"].unique()) <= set(items["item_id"])


def test_the_declared_route_overlay_serves_without_fast_route(tmp_path: Path) -> None:
    """``--declared-route`` measures the FastRoute bypass against a copy of the package
    whose recommendations router is FastAPI's own."""
    import subprocess

    overlay = serve.declared_route_overlay(tmp_path)
    probe = (
        "import recsys_serving, recsys_serving.api.recommendations as r; "
        "from fastapi.routing import APIRoute; "
        "print(recsys_serving.__file__, r.router.route_class is APIRoute)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(overlay), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the repository root, whose own package `-c` would import first
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(overlay)) and out[1] == "True"
