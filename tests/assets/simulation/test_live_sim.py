"""The live traffic simulator against an HTTP server on loopback.

The stub service ranks items by the *pre-drift* ground truth, i.e. it is a perfect
model of the old world: after a strong drift its slates must be worth fewer clicks,
which is exactly the staleness the closed loop has to notice.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from model_support import tiny_bundle, tiny_outcome, tiny_world  # noqa: F401
from typer.testing import CliRunner

from recsys_assets.simulation.live import LiveConfig, LiveSimulator, read_timeline, run_live
from recsys_assets.simulation.truth import GroundTruth
from support import free_port

KEY = "live-test-key"


@dataclass
class Stub:
    url: str
    truth: GroundTruth
    delay: float = 0.0
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    unauthorized: int = 0


def stub_app(stub: Stub) -> FastAPI:
    app = FastAPI()
    truth = stub.truth

    def authorized(request: Request) -> bool:
        ok = request.headers.get("x-api-key") == KEY
        stub.unauthorized += not ok
        return ok

    @app.get("/recommendations/{user_id}")
    async def recommend(user_id: str, request: Request, k: int = 10) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        stub.in_flight += 1
        stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            if stub.delay:
                await asyncio.sleep(stub.delay)
            user = truth.user_index([user_id])[0]
            scores = truth.relevance_matrix([user])[0]
            top = np.argsort(-scores)[:k]
            answer = {
                "user_id": user_id,
                "items": [
                    {"item_id": truth.item_ids[i], "score": float(scores[i]), "rank": r + 1}
                    for r, i in enumerate(top)
                ],
                "model_version": "v-stub",
                "request_id": uuid.uuid4().hex,
                "served_by": "champion",
            }
            stub.answers[answer["request_id"]] = answer
            return JSONResponse(answer)
        finally:
            stub.in_flight -= 1

    @app.post("/events", status_code=202)
    async def events(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        assert request.headers["content-type"] == "application/x-ndjson"
        lines = (await request.body()).splitlines()
        stub.events += [orjson.loads(line) for line in lines]
        body = {"received": len(lines), "accepted": len(lines), "rejected": 0, "reasons": {}}
        return JSONResponse(body, status_code=202)

    return app


@pytest.fixture(scope="module")
def truth() -> GroundTruth:
    end = datetime(2026, 1, 1, tzinfo=UTC)
    return GroundTruth.generate(300, 400, 8, seed=5, start=end - timedelta(days=3), end=end)


@pytest.fixture
def stub(truth: GroundTruth) -> Iterator[Stub]:
    port = free_port()
    state = Stub(f"http://127.0.0.1:{port}", truth)
    server = uvicorn.Server(
        uvicorn.Config(stub_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_plays_users_posts_attributable_clicks_and_drift_makes_the_model_stale(
    stub: Stub, truth: GroundTruth, tmp_path: Path
) -> None:
    lines: list[str] = []
    timeline = tmp_path / "live.ndjson"
    config = LiveConfig(
        base_url=stub.url,
        api_key=KEY,
        users=25,
        rps=80,
        duration=6.0,
        drift_at=3.0,
        drift_strength=1.0,
        trend_shift=0.5,
        browse=0.5,
        interval=1.0,
        seed=1,
        timeline_path=timeline,
    )
    result = run_live(truth, config, on_line=lines.append)

    assert stub.unauthorized == 0 and result.errors == 0
    # Paced at the asked rate: never above it; the floor leaves room for a busy machine.
    assert 0.4 * 80 * 6 <= result.requests <= 1.05 * 80 * 6
    assert result.requests == len(stub.answers)
    assert len({a["user_id"] for a in stub.answers.values()}) <= 25

    clicks = [e for e in stub.events if e["event_type"] == "click"]
    assert len(clicks) == result.clicks > 50
    for click in clicks:
        answer = stub.answers[click["request_id"]]
        assert answer["items"][click["position"]]["item_id"] == click["item_id"]
        assert click["model_version"] == "v-stub"
        assert click["user_id"] == answer["user_id"]
    kinds = {e["event_type"] for e in stub.events}
    assert {"click", "view"} <= kinds and kinds <= {"click", "view", "add_to_cart", "purchase"}
    assert len({e["event_id"] for e in stub.events}) == len(stub.events)
    assert result.events_posted == len(stub.events) and result.events_unsent == 0
    # Organic discovery: views outside the slates, never carrying a request_id.
    assert 0.35 * result.requests < result.organic_views < 0.65 * result.requests
    views = [e for e in stub.events if e["event_type"] == "view"]
    assert len(views) >= result.organic_views
    assert all("request_id" not in e for e in stub.events if e["event_type"] != "click")

    # A perfect model of the old world is much worse in the new one; the oracle is not.
    before, after = result.before, result.after
    assert before["expected_ctr"] > 1.5 * after["expected_ctr"]
    assert before["expected_ctr"] == pytest.approx(before["oracle_ctr"], rel=1e-6)
    assert after["oracle_ctr"] > 1.5 * after["expected_ctr"]
    assert result.impressions == result.requests * 10

    records = read_timeline(timeline)
    assert records[0]["type"] == "start" and records[-1]["type"] == "end"
    assert [r["type"] for r in records].count("drift") == 1
    intervals = [r for r in records if r["type"] == "interval"]
    assert len(intervals) >= 5
    assert sum(r["requests"] for r in intervals) == result.requests
    assert intervals[0]["served_by"] == {"champion": intervals[0]["requests"]}
    assert "v-stub" in intervals[0]["by_version"] and intervals[0]["latency_ms"]["p50"] > 0
    assert any("DRIFT" in line for line in lines)
    assert any("rps  CTR" in line and "served_by champion 100%" in line for line in lines)
    assert "before drift" in result.describe()


@pytest.mark.slow
def test_concurrency_is_bounded_and_errors_are_counted(stub: Stub, truth: GroundTruth) -> None:
    stub.delay = 0.05
    result = asyncio.run(
        LiveSimulator(
            truth,
            LiveConfig(base_url=stub.url, api_key=KEY, users=5, rps=200, duration=2, concurrency=4),
        ).run()
    )
    assert stub.max_in_flight <= 4
    # 4 slots x 50 ms each: about 80 rps achievable, far below the 200 asked for.
    assert result.requests < 0.7 * 200 * 2 and result.errors == 0

    wrong = run_live(
        truth, LiveConfig(base_url=stub.url, api_key="wrong", users=5, rps=20, duration=1)
    )
    assert wrong.requests == 0 and wrong.errors > 0

    stub.delay = 0.0
    started = time.monotonic()
    early = run_live(
        truth,
        LiveConfig(base_url=stub.url, api_key=KEY, users=5, rps=20, duration=30),
        should_stop=lambda: time.monotonic() - started > 1.0,
    )
    assert early.elapsed < 5 and 0 < early.requests < 60


def test_trend_shift_reassigns_shared_appeal(truth: GroundTruth) -> None:
    from recsys_assets.simulation.live import shift_trends

    same = shift_trends(truth, 0.0, seed=1)
    assert np.array_equal(same.item_bias, truth.item_bias)
    moved = shift_trends(truth, 1.0, seed=1)
    assert np.allclose(np.sort(moved.item_bias), np.sort(truth.item_bias))
    old_hits = set(np.argsort(-truth.item_bias)[:20].tolist())
    assert len(old_hits & set(np.argsort(-moved.item_bias)[:20].tolist())) < 10
    assert moved.item_popularity.sum() == pytest.approx(1.0)
    assert np.array_equal(moved.user_vectors, truth.user_vectors)
    assert moved.meta["trend_shift"] == [1.0]
    with pytest.raises(ValueError, match="strength"):
        shift_trends(truth, 1.5, seed=1)


def test_config_is_validated() -> None:
    for bad in [
        {"users": 0},
        {"rps": 0},
        {"drift_at": 20.0},
        {"drift_strength": 1.5},
        {"trend_shift": -0.1},
        {"browse": 11.0},
        {"k": 0},
        {"concurrency": 0},
    ]:
        with pytest.raises(ValueError):
            LiveConfig(**{"base_url": "http://x", "users": 5, "rps": 1, "duration": 10, **bad})


@pytest.mark.slow
def test_cli_simulate_live(stub: Stub, truth: GroundTruth, tmp_path: Path) -> None:
    from recsys_assets.cli import app

    truth.save(tmp_path / "truth")
    timeline = tmp_path / "t.ndjson"
    args = ["simulate", "live", "--url", stub.url, "--api-key", KEY]
    args += ["--truth", str(tmp_path / "truth"), "--users", "10", "--rps", "30"]
    args += ["--duration", "3s", "--drift-at", "1.5s", "--interval", "1s", "--new-items", "5"]
    args += ["--timeline", str(timeline)]
    home = tmp_path / "home"
    result = CliRunner().invoke(app, args, env={"RECSYS_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert "live:" in result.stdout and "before drift" in result.stdout
    assert str(timeline) in result.stdout
    new_items = tmp_path / "t.new-items.ndjson"
    docs = [orjson.loads(line) for line in new_items.read_bytes().splitlines()]
    assert [d["item_id"] for d in docs] == [f"i{n:05d}" for n in range(400, 405)]
    assert docs[0]["categories"] and docs[0]["title"]
    # ...and loaded into the document store the service reads.
    from recsys_serving.settings import Settings
    from recsys_serving.stores.docstore import open_docstore

    with open_docstore(Settings(home=home)) as store:
        assert store.get_item("i00404") is not None and store.get_item("i00405") is None
    assert "catalog: items" in result.stdout

    missing = CliRunner().invoke(app, ["simulate", "live", "--truth", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "recsys simulate" in missing.output
    bad = CliRunner().invoke(
        app, ["simulate", "live", "--truth", str(tmp_path / "truth"), "--duration", "soon"]
    )
    assert bad.exit_code == 1 and "--duration" in bad.output


@pytest.mark.slow
def test_against_the_real_server_clicks_join_the_logged_impressions(
    tmp_path: Path,
    tiny_world: Any,  # noqa: F811 (fixtures)
    tiny_bundle: Path,  # noqa: F811 (fixtures)
) -> None:
    """The real service logs impressions, the simulator posts clicks; joined on
    request_id they give the model's online CTR, as the closed loop reads it."""
    from recsys_assets.monitoring.ctr import load_ctr_series
    from recsys_serving.api.app import create_app
    from recsys_serving.lake import LocalLake
    from recsys_serving.layout import PRODUCTION
    from recsys_serving.registry import ModelRegistry
    from serving_support import new_key, running_app, service_settings

    settings = service_settings(tmp_path / "home", landing_segment_max_age_seconds=1.0)
    lake = LocalLake(settings.resolved_lake_uri)
    registry = ModelRegistry(lake)
    version = registry.register(tiny_bundle).version
    registry.set_alias(PRODUCTION, version, reason="test")
    key = new_key(settings, "recommend,events")
    world = GroundTruth.load(tiny_world.summary.truth_path)
    with running_app(create_app(settings, docstore=None)) as url:
        result = run_live(
            world,
            LiveConfig(base_url=url, api_key=key, users=20, rps=40, duration=4, seed=3),
        )
    assert result.errors == 0 and result.requests > 40  # 160 asked; room for a busy machine
    assert set(result.by_version) == {version} and result.clicks > 0
    assert result.served_by.get("champion") == result.requests
    series, orphans = load_ctr_series(
        lake, datetime.now(UTC), lookback=timedelta(minutes=10), bucket_seconds=60
    )
    assert orphans == 0
    assert set(series["model_version"].to_list()) == {version}
    assert series["impressions"].sum() == result.impressions
    assert series["clicks"].sum() == result.clicks
