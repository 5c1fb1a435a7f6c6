"""Bad input gets a clear 4xx with a JSON body; a schemathesis run over the OpenAPI
schema finds no 5xx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from model_support import tiny_bundle, tiny_outcome, tiny_world  # noqa: F401
from schemathesis import GenerationMode

from recsys_serving.api.app import create_app
from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from serving_support import new_key, running_app, service_settings, wait_for


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bundle: Path,  # noqa: F811
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = service_settings(tmp_path_factory.mktemp("bad-input") / "home")
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    headers = {"X-API-Key": new_key(settings, "recommend,events,admin")}
    with TestClient(create_app(settings, docstore=None)) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 20, "model")
        yield client, headers


def _error(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"}
    if code is not None:
        assert body["error"] == code
    return body


@pytest.mark.parametrize("k", ["0", "101", "-1", "ten", "1e3", ""])
def test_k_out_of_range_or_not_a_number(served: tuple[TestClient, dict[str, str]], k: str) -> None:
    client, headers = served
    body = _error(
        client.get("/recommendations/u1", params={"k": k}, headers=headers), 422, "invalid_request"
    )
    assert body["detail"][0]["loc"] == ["query", "k"]


@pytest.mark.parametrize(
    "user",
    ["u" * 257, "bad%01id", "tab%09id", "nul%00", "del%7F"],
    ids=["long", "soh", "tab", "nul", "del"],
)
def test_absurd_user_ids(served: tuple[TestClient, dict[str, str]], user: str) -> None:
    client, headers = served
    body = _error(client.get(f"/recommendations/{user}", headers=headers), 422)
    assert body["detail"][0]["loc"] == ["path", "user_id"]


def test_a_user_id_of_256_printable_characters_is_fine(
    served: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = served
    r = client.get("/recommendations/" + "ü" * 256, headers=headers)
    assert r.status_code == 200 and r.json()["user_id"] == "ü" * 256


def test_too_many_exclusions(served: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = served
    params = [("exclude", f"i{n}") for n in range(1001)]
    _error(client.get("/recommendations/u1", params=params, headers=headers), 422)


def test_unknown_routes_and_methods(served: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = served
    _error(client.get("/nope", headers=headers), 404, "not_found")
    _error(client.get("/recommendations/", headers=headers), 404, "not_found")
    _error(client.get("/v2/recommendations/u1", headers=headers), 404, "not_found")
    _error(client.delete("/recommendations/u1", headers=headers), 405, "method_not_allowed")
    _error(client.get("/events", headers=headers), 405, "method_not_allowed")


def test_malformed_json_and_wrong_content_types(served: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = served
    _error(
        client.post(
            "/events",
            content=b'[{"event_id": ',
            headers={**headers, "Content-Type": "application/json"},
        ),
        400,
        "invalid_json",
    )
    _error(
        client.post("/events", content=b"a=b", headers={**headers, "Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    _error(
        client.post(
            "/admin/models/rollback",
            content=b"{not json",
            headers={**headers, "Content-Type": "application/json"},
        ),
        422,
    )
    _error(
        client.post(
            "/admin/models/promote",
            content=b"version=v1",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        ),
        422,
    )
    _error(client.post("/admin/models/promote", json={"version": "v1"}, headers=headers), 422)


def test_every_route_in_the_schema_answers_json_errors(
    served: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = served
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for path in ("/recommendations/{user_id}", "/similar/{item_id}", "/events", "/admin/models"):
        assert path in paths and "/v1" + path in paths
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    secured = 0
    for path, operations in spec["paths"].items():
        url = re.sub(r"\{[^}]+\}", "x1", path)
        for method, operation in operations.items():
            if operation.get("security"):  # no key: a JSON 401, whatever the route
                secured += 1
                _error(client.request(method.upper(), url), 401, "unauthorized")
        assert "patch" not in operations
        _error(client.patch(url), 405, "method_not_allowed")
    assert secured >= 18  # (v1 and unversioned) events, recommendations, similar, admin


# ----------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bundle: Path,  # noqa: F811
) -> Iterator[tuple[str, dict[str, str]]]:
    settings = service_settings(tmp_path_factory.mktemp("fuzz") / "home")
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    headers = {"X-API-Key": new_key(settings, "recommend,events,admin")}
    app = create_app(settings, docstore=None)
    with running_app(app) as base:
        wait_for(lambda: app.state.manager.state.ready, 20, "model")
        yield base, headers


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(fuzz_target: tuple[str, dict[str, str]]) -> None:
    """Every operation, valid and invalid inputs generated from the schema (bounded)."""
    base, headers = fuzz_target
    api = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    calls: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=15,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],  # report as found: no slow shrinking
            )
            def run(case: Any) -> None:
                calls.append(case.method)
                response = case.call(base_url=base, headers=headers, timeout=10)
                where = f"{case.method} {case.formatted_path} -> {response.status_code}"
                assert response.status_code < 500, f"{where}: {response.text[:300]}"
                if response.status_code >= 400 and not _rejected_by_http_parser(response):
                    ctype = (response.headers.get("content-type") or [""])[0]
                    assert ctype.startswith("application/json"), where
                    body = response.json()
                    # The error shape, or the collector's documented all-rejected report.
                    assert "error" in body or "rejected" in body, where

            try:
                run()
            except Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters)
            except AssertionError as exc:
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert operations >= 20 and len(calls) >= 20 * operations
    assert not failures, "\n".join(failures)


def _rejected_by_http_parser(response: Any) -> bool:
    """uvicorn's HTTP parser refuses malformed requests (e.g. a request line longer than
    its limit) with a plain-text 400 before any application code runs."""
    return response.status_code == 400 and response.text == "Invalid HTTP request received."
