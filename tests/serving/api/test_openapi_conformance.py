"""schemathesis ``--checks all`` over the whole OpenAPI of a real server, zero failures.

The service (every route: events, recommendations, similar, admin, health, metrics,
dashboard data) runs under uvicorn on 127.0.0.1 with the HTTP protocol ``recsys
serve`` uses, a model loaded and a key holding every scope; the schemathesis CLI
then runs all its phases (examples, coverage, fuzzing, stateful) and every check:
status codes, content types, response schemas and headers, negative data refused,
positive data accepted, ``Allow`` on 405, auth not ignored, and the rest.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from model_support import tiny_bundle, tiny_outcome, tiny_world  # noqa: F401

from recsys_serving.api.app import create_app
from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from serving_support import new_key, running_app, service_settings

# What the OpenAPI cannot say, stated for the one operation it concerns: `POST /events`
# refuses schema-valid events whose `ts` is outside the plausible range around the
# receiver's clock, or whose `event_id` was already accepted (schemathesis resends the
# same example ids), and answers 422 with the per-event report when it refuses them all.
CONFIG = """
[[operations]]
include-path-regex = "^(/v1)?/events$"
include-method = "POST"

[operations.checks]
positive_data_acceptance = { expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"] }
"""


@pytest.fixture(scope="module", params=["service", "collector"])
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bundle: Path,  # noqa: F811
) -> Iterator[tuple[str, list[str]]]:
    """`recsys serve` (a model, a key with every scope) or `recsys collector` (no keys)."""
    settings = service_settings(tmp_path_factory.mktemp("schemathesis") / "home")
    if request.param == "collector":
        with running_app(create_app(settings, collector_only=True)) as base:
            yield base, []
        return
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    key = new_key(settings, "recommend,events,admin")
    with running_app(create_app(settings, docstore=None)) as base:
        yield base, ["--header", f"X-API-Key: {key}"]


@pytest.mark.slow
def test_schemathesis_all_checks_pass_over_the_whole_openapi(
    server: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, auth = server
    spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
    operations = sum(len(ops) for ops in spec["paths"].values())
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(cli),
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        *auth,
        "--max-examples",
        "25",
        "--seed",
        "20261206",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-12_000:]
    # The whole schema was exercised, and nothing failed or errored.
    assert f"Selected: {operations}/{operations}" in report and f"Tested: {operations}" in report
    assert "Failures:" not in report and "Errors:" not in report, report[-12_000:]
