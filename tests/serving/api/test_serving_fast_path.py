"""The plain form of GET /recommendations (answered without FastAPI's parameter
resolution) gives exactly what the declared endpoint gives, and everything else still
goes through FastAPI's validation."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from model_support import tiny_bundle, tiny_outcome, tiny_world

from recsys_serving.api.metrics import parse_metrics
from recsys_serving.api.serving import new_request_id
from recsys_serving.lake import LocalLake
from recsys_serving.model.recommender import Recommender
from recsys_serving.registry import ModelRegistry
from serving_support import new_key, service_settings, serving_client, wait_for

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(scope="module")
def service(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    settings = service_settings(tmp_path_factory.mktemp("fast") / "home")
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    keys = {
        "recommend": {"X-API-Key": new_key(settings, "recommend")},
        "events": {"X-API-Key": new_key(settings, "events")},
    }
    model = Recommender.load(tiny_bundle)
    users = [u for u in model.state.user_ids.tolist() if model.knows_user(u)][:5]
    with serving_client(settings) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 30, "model")
        yield {"client": client, "keys": keys, "users": users}


def items_of(body: dict) -> list[tuple]:
    return [(i["item_id"], i["score"], i["rank"], i["reason"]) for i in body["items"]]


def test_plain_and_declared_forms_answer_alike(service: dict) -> None:
    client: TestClient = service["client"]
    headers = service["keys"]["recommend"]
    for user in [*service["users"], "somebody-new"]:
        for prefix in ("", "/v1"):
            plain = client.get(f"{prefix}/recommendations/{user}?k=7", headers=headers)
            # An unknown parameter is not the plain form: the declared endpoint answers.
            declared = client.get(f"{prefix}/recommendations/{user}?k=7&x=1", headers=headers)
            assert plain.status_code == declared.status_code == 200
            a, b = plain.json(), declared.json()
            assert items_of(a) == items_of(b) and len(a["items"]) == 7
            assert {k: a[k] for k in ("user_id", "model_version", "served_by")} == {
                k: b[k] for k in ("user_id", "model_version", "served_by")
            }
            assert a["request_id"] != b["request_id"]
            assert plain.headers["X-Request-ID"] == a["request_id"]
            assert re.fullmatch(r"[0-9a-f]{32}", a["request_id"])
    default = client.get(f"/recommendations/{service['users'][0]}", headers=headers)
    assert default.status_code == 200 and len(default.json()["items"]) == 10
    k100 = client.get(f"/recommendations/{service['users'][0]}?k=100", headers=headers)
    assert k100.status_code == 200 and len(k100.json()["items"]) > 10


def test_answers_are_the_models_recommendations_in_order(
    service: dict,
    tiny_bundle: Path,
) -> None:
    """The HTTP answer is what ``Recommender.recommend`` returns for the same request:
    the same items in the same order with the same scores and reasons, ranks from 1."""
    client: TestClient = service["client"]
    headers = service["keys"]["recommend"]
    model = Recommender.load(tiny_bundle)
    category = str(model.state.categories[0])
    for user in [*service["users"], "somebody-new"]:
        best = model.recommend(user, 7)
        excluded = frozenset(item.item_id for item in best[:2])
        cases = [
            (f"/recommendations/{user}?k=7", best),  # the plain form
            (f"/v1/recommendations/{user}?k=7&x=1", best),  # the declared endpoint
            (
                f"/recommendations/{user}?k=5&category={category}"
                + "".join(f"&exclude={item}" for item in sorted(excluded)),
                model.recommend(user, 5, categories=[category], exclude=excluded),
            ),
        ]
        for url, expected in cases:
            r = client.get(url, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["served_by"] == "champion"
            assert items_of(r.json()) == [
                (item.item_id, float(item.score), rank, item.reason)
                for rank, item in enumerate(expected, 1)
            ], url
        assert len({item.score for item in best}) > 1  # an order that reversing would break


@pytest.mark.parametrize(
    "query",
    ["k=0", "k=101", "k=-1", "k=abc", "k=", "k=1e1", "k=10&k=x"],
)
def test_other_forms_are_still_validated(service: dict, query: str) -> None:
    r = service["client"].get(
        f"/recommendations/{service['users'][0]}?{query}", headers=service["keys"]["recommend"]
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_bad_ids_and_keys_on_the_plain_form(service: dict) -> None:
    client: TestClient = service["client"]
    headers = service["keys"]["recommend"]
    assert client.get("/recommendations/a%01b?k=5", headers=headers).status_code == 422
    assert client.get(f"/recommendations/{'u' * 257}?k=5", headers=headers).status_code == 422
    ok = client.get(f"/recommendations/{'u' * 256}?k=5", headers=headers)
    assert ok.status_code == 200  # the longest valid id: an unknown user, cold start
    user = service["users"][0]
    missing = client.get(f"/recommendations/{user}?k=5")
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    wrong = client.get(f"/recommendations/{user}?k=5", headers=service["keys"]["events"])
    assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"


def test_plain_form_requests_are_counted_by_route_template(service: dict) -> None:
    client: TestClient = service["client"]
    before = parse_metrics(client.get("/metrics").text)
    headers = service["keys"]["recommend"]
    for prefix in ("", "/v1"):
        assert client.get(f"{prefix}/recommendations/u-x?k=3", headers=headers).status_code == 200
    after = parse_metrics(client.get("/metrics").text)

    def count(samples: dict) -> float:
        return sum(
            v
            for labels, v in samples.get("recsys_http_requests_total", [])
            if labels["route"] == "/recommendations/{user_id}" and labels["status"] == "200"
        )

    assert count(after) - count(before) == 2


def test_request_ids_are_unique_and_redrawn_in_a_forked_child() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child[:16] != parent[:16]  # another process, another prefix
