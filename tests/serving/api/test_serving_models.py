"""The service with real trained bundles: readiness, answers, impressions, hot swap,
refused bundles, phase-in, rollback and fallbacks."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_world, train_tiny  # noqa: F401

from recsys_serving.api.app import create_app
from recsys_serving.api.metrics import parse_metrics
from recsys_serving.api.model_manager import user_bucket
from recsys_serving.events.schema import WeblogEvent
from recsys_serving.lake import LocalLake
from recsys_serving.layout import PRODUCTION
from recsys_serving.model.recommender import Recommender
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings
from recsys_serving.stores.docstore import DocStoreError
from serving_support import new_key, running_app, service_settings, serving_client, wait_for
from support import ndjson_lines


@pytest.fixture(scope="session")
def second_bundle(tiny_world: TinyWorld) -> Path:  # noqa: F811
    """Another real bundle (another seed): a different version of the same world."""
    return train_tiny(tiny_world, seed=1).bundle_path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return service_settings(tmp_path / "home")


@pytest.fixture
def registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(LocalLake(settings.resolved_lake_uri))


@pytest.fixture
def key(settings: Settings) -> dict[str, str]:
    return {"X-API-Key": new_key(settings, "recommend,events,admin")}


def version_of(bundle: Path) -> str:
    return Recommender.load(bundle).version


def users_of(bundle: Path, n: int) -> list[str]:
    return [str(u) for u in Recommender.load(bundle).state.user_ids[:n]]


def serving(client: TestClient, version: str, alias: str = "production") -> bool:
    return client.app.state.manager.state.versions().get(alias) == version


def metrics_of(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_metrics(client.get("/metrics").text)


# --------------------------------------------------------------------------- answers


def test_readyz_turns_ready_once_a_model_is_promoted(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
) -> None:
    with serving_client(settings) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "model": {}, "checks": {"model": False}}
        r = client.get("/recommendations/u000002", headers=key)
        assert r.status_code == 503 and r.json()["error"] == "no_model"
        assert r.headers["Retry-After"] == "5"
        v1 = registry.register(tiny_bundle).version
        registry.promote(v1, reason="test")
        wait_for(lambda: client.get("/readyz").status_code == 200, 20, "readyz")
        assert client.get("/readyz").json() == {
            "ready": True,
            "model": {"production": v1},
            "checks": {"model": True},
        }
        samples = metrics_of(client)
    assert samples["recsys_model_ready"] == [({}, 1.0)]
    assert ({"alias": "production", "version": v1}, 1.0) in [
        ({k: v for k, v in labels.items() if k != "worker"}, value)
        for labels, value in samples["recsys_model_info"]
    ]
    assert samples["recsys_fallback_total"] == [({"reason": "no_model"}, 1.0)]


def test_recommendations_answer_log_impressions_and_honour_filters(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    model = Recommender.load(tiny_bundle)
    user = users_of(tiny_bundle, 1)[0]
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v1), 20, "model")
        r = client.get(f"/v1/recommendations/{user}", params={"k": 7}, headers=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == user and body["model_version"] == v1
        assert body["served_by"] == "champion"
        assert r.headers["X-Request-ID"] == body["request_id"]
        assert [i["rank"] for i in body["items"]] == list(range(1, 8))
        shown = [i["item_id"] for i in body["items"]]
        assert len(set(shown)) == 7
        assert not set(shown) & model.seen(user)  # already-seen items are excluded
        # exclude (repeated parameter) and category filters
        r2 = client.get(
            f"/recommendations/{user}",
            params=[("k", "7"), ("exclude", shown[0]), ("exclude", shown[1])],
            headers=key,
        ).json()
        assert not {shown[0], shown[1]} & {i["item_id"] for i in r2["items"]}
        category = str(model.state.categories[0])
        r3 = client.get(
            f"/recommendations/{user}", params={"k": 5, "category": category}, headers=key
        ).json()
        item_row = model.state.item_index
        for it in r3["items"]:
            cats = {
                str(model.state.categories[c])
                for c in model.state.item_categories.row(item_row[it["item_id"]])[0]
            }
            assert category in cats
        # unknown users get the cold-start list, still from the model
        cold = client.get("/recommendations/never-seen-user", headers=key).json()
        assert cold["served_by"] == "champion" and len(cold["items"]) == 10
        sim = client.get(f"/similar/{shown[0]}", params={"k": 4}, headers=key)
        assert sim.status_code == 200 and len(sim.json()["items"]) == 4
        assert shown[0] not in {i["item_id"] for i in sim.json()["items"]}
        assert client.get("/similar/no-such-item", headers=key).status_code == 404
        samples = metrics_of(client)
    client.app.state.intake.close()
    landed = [
        e
        for e in ndjson_lines(client.app.state.lake, "landing/")
        if e["request_id"] == body["request_id"]
    ]
    assert sorted((e["position"], e["item_id"]) for e in landed) == list(enumerate(shown))
    for e in landed:
        WeblogEvent.model_validate(e)
        assert (e["event_type"], e["user_id"], e["model_version"]) == ("impression", user, v1)
        assert e["context"] == {"served_by": "champion"}
    assert ({"model_version": v1}, 7 + 7 + 5 + 10) in samples["recsys_impressions_total"]
    assert ({"served_by": "champion", "model_version": v1}, 5.0) in samples[
        "recsys_recommendations_total"
    ]


def test_clicks_with_model_version_feed_online_ctr(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v1), 20, "model")
        answer = client.get("/recommendations/u000002", params={"k": 10}, headers=key).json()
        now = time.time()
        clicks = [
            {
                "event_id": f"click-{n}",
                "event_type": "click",
                "user_id": "u000002",
                "item_id": answer["items"][n]["item_id"],
                "ts": now,
                "request_id": answer["request_id"],
                "position": n,
                "model_version": v1,
            }
            for n in range(2)
        ]
        bad = {**clicks[0], "event_id": "bad", "position": -1}
        r = client.post("/events", json=[*clicks, bad], headers=key)
        assert r.json()["accepted"] == 2 and r.json()["rejected"] == 1
        samples = metrics_of(client)
    assert samples["recsys_clicks_total"] == [({"model_version": v1}, 2.0)]
    assert samples["recsys_online_ctr"] == [({"model_version": v1}, pytest.approx(0.2))]
    accepted = {s[0]["source"]: s[1] for s in samples["recsys_events_accepted_total"]}
    assert accepted == {"impressions": 10.0, "collector": 2.0}
    assert samples["recsys_events_rejected_total"] == [({"reason": "schema"}, 1.0)]


# --------------------------------------------------------------------------- model moves


def test_corrupt_bundle_is_refused_and_the_old_model_keeps_serving(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    v2 = registry.register(second_bundle).version
    # Tamper with one file of v2 in the registry after it was registered.
    ranker = Path(registry.lake.local_path(registry.model_key(v2, "ranker.txt")))
    ranker.write_text(ranker.read_text().replace("tree", "TREE", 1))
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v1), 20, "v1")
        # Promotion refuses it now (test_registry.py); an alias moved by an older recsys,
        # or a bundle damaged after its promotion, is still refused by the servers.
        monkeypatch.setattr(ModelRegistry, "verify", lambda self, version: {})
        registry.promote(v2, reason="test: a tampered bundle")
        wait_for(lambda: v2 in client.app.state.manager.status()["refused"], 20, "v2 refused")
        r = client.get("/recommendations/u000002", headers=key)
        assert r.status_code == 200 and r.json()["model_version"] == v1
        state = client.get("/admin/models", headers=key).json()
        assert state["production"]["version"] == v1
        assert state["refused"][v2]["reason"] == "invalid_bundle"
        assert state["aliases"]["production"]["version"] == v2
        time.sleep(0.6)  # several polls later: refused once, not once per poll
        samples = metrics_of(client)
    assert samples["recsys_model_load_failures_total"] == [({"reason": "invalid_bundle"}, 1.0)]


def test_a_restart_with_an_unloadable_production_serves_the_last_good_version(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    v2 = registry.register(second_bundle).version
    registry.promote(v2, reason="test: good when promoted")
    # The bundle is damaged after its promotion; a server (re)starts with an empty cache.
    ranker = Path(registry.lake.local_path(registry.model_key(v2, "ranker.txt")))
    good = ranker.read_text()
    ranker.write_text(good.replace("tree", "TREE", 1))
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v1), 20, "the last good version")
        r = client.get("/recommendations/u000002", headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == v1 and r.json()["served_by"] == "last_good"
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["stand_in"] == {"production": {"version": v1, "instead_of": v2}}
        samples = metrics_of(client)
        (stand_in,) = samples["recsys_model_stand_in"]
        assert stand_in[0]["version"] == v1 and stand_in[0]["instead_of"] == v2
        assert ({"reason": "invalid_bundle"}, 1.0) in samples["recsys_model_load_failures_total"]
        assert samples["recsys_recommendations_total"] == [
            ({"served_by": "last_good", "model_version": v1}, 1.0)
        ]
        state = client.get("/admin/models", headers=key).json()
        assert state["production"]["stands_in_for"] == v2
        assert state["refused"][v2]["reason"] == "invalid_bundle"

        # Repaired: a forced reload brings production back at once (no 5-minute retry).
        ranker.write_text(good)
        reloaded = client.post("/admin/models/reload?force=true", headers=key)
        assert reloaded.status_code == 200 and reloaded.json()["loaded"] == [v2]
        r = client.get("/recommendations/u000002", headers=key)
        assert r.json()["model_version"] == v2 and r.json()["served_by"] == "champion"
        assert "stand_in" not in client.get("/readyz").json()
        assert "recsys_model_stand_in" not in metrics_of(client)


def test_the_admin_api_refuses_to_move_an_alias_to_a_damaged_bundle(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    v2 = registry.register(second_bundle).version
    ranker = Path(registry.lake.local_path(registry.model_key(v2, "ranker.txt")))
    ranker.write_text(ranker.read_text().replace("tree", "TREE", 1))
    with serving_client(settings) as client:
        for method, path, body in (
            ("POST", "/admin/models/promote", {"version": v2, "reason": "t"}),
            ("PUT", "/admin/aliases/production", {"version": v2, "reason": "t"}),
            ("PUT", "/admin/aliases/candidate", {"version": v2, "share": 0.1, "reason": "t"}),
        ):
            r = client.request(method, path, json=body, headers=key)
            assert r.status_code == 409, r.text
            assert r.json()["error"] == "invalid_bundle"
            assert f"{v2} fails verification" in r.json()["detail"]
            assert "ranker.txt: sha256 mismatch" in r.json()["detail"]
    assert registry.alias(PRODUCTION).version == v1  # type: ignore[union-attr]
    assert registry.alias("candidate") is None


def test_no_loadable_version_at_all_is_still_503(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    ranker = Path(registry.lake.local_path(registry.model_key(v1, "ranker.txt")))
    ranker.write_text(ranker.read_text().replace("tree", "TREE", 1))
    with serving_client(settings) as client:
        wait_for(lambda: v1 in client.app.state.manager.status()["refused"], 20, "v1 refused")
        assert client.get("/readyz").status_code == 503
        assert client.get("/recommendations/u000002", headers=key).status_code == 503


@pytest.mark.slow
def test_hot_swap_under_concurrent_requests_has_no_failed_request(
    settings: Settings,
    registry: ModelRegistry,
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    headers = {"X-API-Key": new_key(settings, "recommend")}
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(second_bundle).version
    registry.promote(v1, reason="test")
    users = users_of(tiny_bundle, 50)
    app = create_app(settings, docstore=None)
    stop = threading.Event()
    results: list[list[tuple[int, str | None]]] = [[] for _ in range(4)]

    def hammer(n: int, base: str) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            i = 0
            while not stop.is_set():
                r = http.get(f"/recommendations/{users[(n * 13 + i) % len(users)]}")
                version = r.json().get("model_version") if r.status_code == 200 else None
                results[n].append((r.status_code, version))
                i += 1

    with running_app(app) as base:
        wait_for(lambda: app.state.manager.state.versions().get("production") == v1, 20, "v1")
        threads = [threading.Thread(target=hammer, args=(n, base)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        registry.promote(v2, reason="test: hot swap")
        wait_for(lambda: all(seq and seq[-1][1] == v2 for seq in results), 30, "every client on v2")
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    flat = [r for seq in results for r in seq]
    assert Counter(status for status, _ in flat) == {200: len(flat)}
    assert {v for _, v in flat} == {v1, v2}
    for seq in results:  # per client: once on v2, never back on v1
        versions = [v for _, v in seq]
        assert v1 not in versions[versions.index(v2) :]


def test_phase_in_splits_users_by_share_and_keeps_each_user_on_one_model(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(second_bundle).version
    registry.promote(v1, reason="test")
    registry.set_alias("candidate", v2, share=0.3, reason="test: phase-in 30%")
    users = [f"user-{n}" for n in range(600)]
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v2, "candidate"), 20, "candidate")

        def ask(user: str) -> tuple[str, str]:
            body = client.get(f"/recommendations/{user}", params={"k": 1}, headers=key).json()
            return body["served_by"], body["model_version"]

        first = {u: ask(u) for u in users}
        assert set(first.values()) == {("champion", v1), ("challenger", v2)}
        share = sum(1 for s, _ in first.values() if s == "challenger") / len(users)
        assert share == pytest.approx(0.3, abs=0.05)
        # The split is the stable hash, not chance: each user is where the hash says...
        for u, (served_by, _) in first.items():
            assert (served_by == "challenger") == (user_bucket(u) < 0.3)
        # ...so asking again gives the same model.
        assert {u: ask(u) for u in users[:150]} == {u: first[u] for u in users[:150]}
        # Ramping up only moves champions to the challenger, never back.
        registry.set_alias("candidate", v2, share=0.6, reason="test: phase-in 60%")
        wait_for(lambda: client.app.state.manager.state.candidate_share == 0.6, 20, "60%")
        second = {u: ask(u) for u in users[:200]}
        assert all(second[u][0] == "challenger" for u in users[:200] if first[u][0] == "challenger")
        samples = metrics_of(client)
    assert samples["recsys_candidate_share"] == [({}, 0.6)]


def test_rollback_takes_effect_without_restart(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(second_bundle).version
    registry.promote(v1, reason="test")
    with serving_client(settings) as client:
        wait_for(lambda: serving(client, v1), 20, "v1")
        registry.promote(v2, reason="test")
        wait_for(lambda: serving(client, v2), 20, "v2")
        assert client.get("/recommendations/u1", headers=key).json()["model_version"] == v2
        registry.rollback(reason="test: v2 misbehaves")  # what `recsys models rollback` does
        wait_for(lambda: serving(client, v1), 20, "rolled back to v1")
        assert client.get("/recommendations/u1", headers=key).json()["model_version"] == v1


def test_admin_routes_move_aliases_and_reload(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    second_bundle: Path,
) -> None:
    v1 = registry.register(tiny_bundle).version
    v2 = registry.register(second_bundle).version
    slow = settings.replace(model_poll_seconds=3600.0)
    with serving_client(slow) as client:
        wait_for(lambda: client.app.state.manager.polls >= 1, 10, "first poll")
        registry.promote(v1, reason="test")
        r = client.post("/admin/models/reload", headers=key)
        assert r.status_code == 200 and r.json()["loaded"] == [v1]
        assert r.json()["state"]["production"]["version"] == v1
        # Alias moves answer with this worker's new state at once (no poll to wait for).
        r = client.put(
            "/v1/admin/aliases/candidate",
            json={"version": v2, "share": 0.25, "reason": "try v2"},
            headers=key,
        )
        assert r.status_code == 200, r.text
        assert r.json()["state"]["candidate"] == {
            "version": v2,
            "share": 0.25,
            "loaded_at": r.json()["state"]["candidate"]["loaded_at"],
            "ranker": "compiled",  # native code (model/ranker.py), else "lightgbm"
            "answers": "model",  # "popularity" while it has not beaten popularity
        }
        r = client.post("/admin/models/promote", json={"version": v2, "reason": "won"}, headers=key)
        assert r.status_code == 200
        assert r.json()["state"]["production"]["version"] == v2
        assert r.json()["state"]["candidate"] is None
        assert registry.alias("production").reason.startswith("won (via API, key k_")  # type: ignore[union-attr]
        r = client.post("/admin/models/rollback", json={"reason": "oops"}, headers=key)
        assert r.status_code == 200 and r.json()["state"]["production"]["version"] == v1
        r = client.post(
            "/admin/models/promote",
            json={"version": "v20990101000000-deadbeef", "reason": "x"},
            headers=key,
        )
        assert r.status_code == 404 and r.json()["error"] == "unknown_version"
        r = client.delete("/admin/aliases/candidate", params={"reason": "none"}, headers=key)
        assert r.status_code == 409 and r.json()["error"] == "conflict"
        r = client.put(
            "/admin/aliases/candidate",
            json={"version": v2, "share": 1.5, "reason": "x"},
            headers=key,
        )
        assert r.status_code == 422
        # Reasons are printed in terminals by `recsys models history`: no escape sequences.
        before = registry.alias("production")
        hostile = "ok\x1b[2J\x1b]0;pwned\x07"
        r = client.post(
            "/admin/models/promote", json={"version": v2, "reason": hostile}, headers=key
        )
        assert r.status_code == 422 and "reason" in r.text
        r = client.delete("/admin/aliases/candidate", params={"reason": "a\rb"}, headers=key)
        assert r.status_code == 422
        assert registry.alias("production") == before


# --------------------------------------------------------------------------- fallbacks


class BrokenDocStore:
    embedded = False

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        raise DocStoreError("mongodb://db: get_user failed: not primary")

    def ping(self) -> bool:
        return False


class SlowDocStore:
    embedded = False

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        time.sleep(1.0)
        return None

    def ping(self) -> bool:
        time.sleep(3.0)
        return True


@pytest.mark.parametrize(
    ("docstore", "reason"), [(BrokenDocStore(), "store_error"), (SlowDocStore(), "store_timeout")]
)
def test_store_failure_gives_a_flagged_fallback_not_a_500(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    docstore: Any,
    reason: str,
) -> None:
    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    model = Recommender.load(tiny_bundle)
    user = users_of(tiny_bundle, 1)[0]
    with serving_client(settings, docstore=docstore) as client:
        wait_for(lambda: serving(client, v1), 20, "v1")
        started = time.perf_counter()
        r = client.get(f"/recommendations/{user}", params={"k": 5}, headers=key)
        elapsed = time.perf_counter() - started
        assert r.status_code == 200
        body = r.json()
        assert body["served_by"] == "fallback" and body["model_version"] == v1
        popular = [i.item_id for i in model.popular(5, exclude=model.seen(user))]
        assert [i["item_id"] for i in body["items"]] == popular
        assert elapsed < 0.9  # the 100 ms budget, not the store's 1 s
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["docstore"] is False
        samples = metrics_of(client)
    assert samples["recsys_fallback_total"] == [({"reason": reason}, 1.0)]
    assert ({"served_by": "fallback", "model_version": v1}, 1.0) in samples[
        "recsys_recommendations_total"
    ]


def test_real_docstore_on_a_dead_mongodb_falls_back(
    tmp_path: Path,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
    closed_localhost_port: int,
) -> None:
    settings = service_settings(
        tmp_path / "home", mongo_uri=f"mongodb://127.0.0.1:{closed_localhost_port}/"
    )
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    headers = {"X-API-Key": new_key(settings, "recommend")}
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 20, "model")
        r = client.get("/recommendations/u000002", headers=headers)
        assert r.status_code == 200 and r.json()["served_by"] == "fallback"
        assert client.get("/readyz").status_code == 503
        samples = metrics_of(client)
    ((labels, value),) = samples["recsys_fallback_total"]
    assert labels["reason"] in {"store_timeout", "store_error"} and value == 1.0


def test_index_timeout_and_error_give_fallbacks(
    settings: Settings,
    registry: ModelRegistry,
    key: dict[str, str],
    tiny_bundle: Path,  # noqa: F811
) -> None:
    from recsys_serving.index import (
        CandidateIndexError,
        CandidateIndexTimeout,
        EmbeddedIndex,
        IndexArtifact,
    )

    class FlakyIndex:
        """The embedded index behind a backend that fails the way ElasticIndex reports."""

        def __init__(self, artifact: IndexArtifact) -> None:
            self.inner = EmbeddedIndex(artifact)
            self.version = artifact.version
            self.fail: type[Exception] | None = None

        def _check(self) -> None:
            if self.fail is not None:
                raise self.fail("es: search took longer than 100ms")

        def search(self, query: Any) -> Any:
            self._check()
            return self.inner.search(query)

        def popular(self, query: Any) -> Any:
            self._check()
            return self.inner.popular(query)

        def similar(self, item_id: str, k: int, exclude: frozenset[str] = frozenset()) -> Any:
            self._check()
            return self.inner.similar(item_id, k, exclude)

        def ping(self) -> bool:
            return self.fail is None

    indexes: list[FlakyIndex] = []

    def opener(model: Any) -> FlakyIndex:
        indexes.append(FlakyIndex(IndexArtifact.load(Path(model.path) / "index")))
        return indexes[-1]

    v1 = registry.register(tiny_bundle).version
    registry.promote(v1, reason="test")
    user = users_of(tiny_bundle, 1)[0]
    with serving_client(settings, index_opener=opener) as client:
        wait_for(lambda: serving(client, v1), 20, "v1")
        assert client.get(f"/recommendations/{user}", headers=key).json()["served_by"] == "champion"
        indexes[0].fail = CandidateIndexTimeout
        assert client.get(f"/recommendations/{user}", headers=key).json()["served_by"] == "fallback"
        assert client.get("/readyz").json()["checks"]["index"] is False
        indexes[0].fail = CandidateIndexError
        assert client.get(f"/recommendations/{user}", headers=key).json()["served_by"] == "fallback"
        sim = client.get("/similar/i00001", headers=key)
        assert sim.status_code == 200 and sim.json()["served_by"] == "fallback"
        samples = metrics_of(client)
    assert sorted(samples["recsys_fallback_total"], key=lambda s: s[0]["reason"]) == [
        ({"reason": "index_error"}, 2.0),
        ({"reason": "index_timeout"}, 1.0),
    ]


def test_a_pinned_bundle_directory_serves_without_a_registry(
    tmp_path: Path,
    tiny_bundle: Path,  # noqa: F811
) -> None:
    pinned = tmp_path / "pinned"
    shutil.copytree(tiny_bundle, pinned)
    settings = service_settings(tmp_path / "home", model_uri=str(pinned), auth_enabled=False)
    with serving_client(settings) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 20, "pinned model")
        body = client.get("/recommendations/u000002").json()
        assert body["model_version"] == version_of(tiny_bundle)
        r = client.post("/admin/models/rollback", json={"reason": "x"})
        assert r.status_code == 409 and r.json()["error"] == "pinned_model"
