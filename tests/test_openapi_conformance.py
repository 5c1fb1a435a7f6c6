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


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bundle: Path,  # noqa: F811
) -> Iterator[tuple[str, str]]:
    settings = service_settings(tmp_path_factory.mktemp("schemathesis") / "home")
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    key = new_key(settings, "recommend,events,admin")
    app = create_app(settings, docstore=None)
    with running_app(app) as base:
        yield base, key


@pytest.mark.slow
def test_schemathesis_all_checks_pass_over_the_whole_openapi(
    server: tuple[str, str], tmp_path: Path
) -> None:
    base, key = server
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
        "--header",
        f"X-API-Key: {key}",
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
    assert "Tested: 27" in report  # the whole schema: every operation of both prefixes
    assert "Failures:" not in report and "Errors:" not in report, report[-12_000:]
