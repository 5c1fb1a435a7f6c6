"""The service dashboard in headless Chromium, against a real ``recsys serve --workers 2``
with real models: the key is asked for once, the charts render, the console stays clean,
and the figures on the page are the ones ``/metrics`` reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from browser_support import browser, console_errors, wait_until  # noqa: F401
from model_support import TinyWorld, tiny_params, tiny_world  # noqa: F401

from recsys_assets.training.pipeline import train_bundle
from recsys_serving.api.metrics import parse_metrics
from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from support import free_port

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
ADMIN_KEY = "rsk_dashboard-admin-test-key-0123456789abcdef"
CLIENT_KEY = "rsk_dashboard-client-test-key-0123456789abcdef"
WORKERS = 2
CHARTS = ("calls", "latency", "errors", "fallback", "ctr")


@dataclass
class Served:
    url: str
    production: str
    candidate: str


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


@pytest.fixture
def served(
    tmp_path: Path,
    tiny_world: TinyWorld,  # noqa: F811
) -> Iterator[Served]:
    """``recsys serve`` with two workers, a production model and a candidate at 50%."""
    home = tmp_path / "home"
    registry = ModelRegistry(LocalLake(home / "lake"))
    bundles = tmp_path / "bundles"
    first = train_bundle(tiny_world.lake, tiny_params(3, tiny_world.settings), bundles)
    time.sleep(1.05)  # versions carry their creation second: keep them in order
    second = train_bundle(tiny_world.lake, tiny_params(4, tiny_world.settings), bundles)
    production = registry.register(first.bundle_path).version
    candidate = registry.register(second.bundle_path).version
    registry.promote(production, reason="first model")
    registry.set_alias("candidate", candidate, reason="canary: new training", share=0.5)

    port = free_port()
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "RECSYS_API_KEYS": json.dumps({ADMIN_KEY: ["admin"], CLIENT_KEY: ["recommend", "events"]}),
        "RECSYS_MODEL_POLL_SECONDS": "0.5",
        "RECSYS_LOG_LEVEL": "WARNING",
    }
    for name in ("RECSYS_LAKE_URI", "RECSYS_MODEL_URI", "RECSYS_RUN_DIR", "RECSYS_AUTH_ENABLED"):
        env.pop(name, None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            *(str(BIN / "recsys"), "serve", "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", str(WORKERS)),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,  # its own process group: the workers go with it
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def every_worker_serves_both() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"recsys serve exited: {(tmp_path / 'serve.log').read_text()}")
            try:
                info = _metrics(url).get("recsys_model_info", [])
            except httpx.HTTPError:
                return False
            loaded = {(labels["worker"], labels["alias"], labels["version"]) for labels, _ in info}
            workers = {w for w, _, _ in loaded}
            return len(workers) == WORKERS and all(
                {(w, "production", production), (w, "candidate", candidate)} <= loaded
                for w in workers
            )

        _wait(every_worker_serves_both, 90, "both workers to load both models")
        yield Served(url, production, candidate)
    finally:
        # The group is the server and its workers, all started here.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever did not stop in time
        proc.wait(timeout=10)
        log.close()


def _send_known_traffic(url: str) -> dict[str, int]:
    """Recommendations for many users (both arms), clicks on some, one invalid call."""
    headers = {"X-API-Key": CLIENT_KEY}
    answers = []
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for i in range(60):
            r = client.get(f"/recommendations/user-{i}", params={"k": 5})
            assert r.status_code == 200, r.text
            answers.append(r.json())
        assert client.get("/recommendations/user-1", params={"k": 1000}).status_code == 422
        now = time.time()
        clicks = [
            {
                "event_id": f"click-{n}",
                "event_type": "click",
                "user_id": a["user_id"],
                "item_id": a["items"][0]["item_id"],
                "ts": now,
                "request_id": a["request_id"],
                "position": 0,
                "model_version": a["model_version"],
            }
            for n, a in enumerate(answers)
            if n % 4 == 0 and a["items"]
        ]
        r = client.post(
            "/events",
            content=b"\n".join(orjson.dumps(c) for c in clicks),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 202 and r.json()["accepted"] == len(clicks)
    served = {}
    for a in answers:
        served[a["served_by"]] = served.get(a["served_by"], 0) + 1
    return served


def _figure(driver: Any, name: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, f'[data-figure="{name}"]')
    return el.text, el.get_attribute("data-value")


@pytest.mark.slow
def test_dashboard_shows_what_the_server_reports(served: Served, browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    served_by = _send_known_traffic(served.url)
    assert {"champion", "challenger"} <= set(served_by)  # the 50% canary got users

    # Auth is on: the page asks for the admin key once, before any data request.
    browser.get(f"{served.url}/dashboard?refresh=1")
    form = wait_until(
        browser,
        lambda d: d.find_element(By.ID, "auth").is_displayed() and d.find_element(By.ID, "auth"),
        30,
        "the API key form",
    )
    assert not browser.find_element(By.ID, "board").is_displayed()
    form.find_element(By.ID, "api-key").send_keys(ADMIN_KEY)
    form.find_element(By.ID, "api-key-save").click()
    wait_until(
        browser,
        lambda d: d.find_element(By.ID, "updated").get_attribute("data-generated-at"),
        60,
        "the first figures",
    )

    # Charts: vega-embed drew every one of them as SVG.
    for name in CHARTS:
        wait_until(
            browser,
            lambda d, name=name: d.find_elements(By.CSS_SELECTOR, f"#chart-{name} svg.marks"),
            30,
            f"the {name} chart",
        )
    # Rates need two readings: after a few polls the call series has a drawn line.
    wait_until(
        browser,
        lambda d: any(
            (p.get_attribute("d") or "").count("L") >= 1
            for p in d.find_elements(By.CSS_SELECTOR, "#chart-calls .mark-line path")
        ),
        30,
        "a line in the calls chart",
    )
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart-ctr .mark-rect path")
    assert len(bars) == 2  # one bar per model version with impressions

    samples = _metrics(served.url)  # after the page's last poll: only /dashboard/* since
    requests = [
        (labels, n)
        for labels, n in samples["recsys_http_requests_total"]
        if not labels["route"].startswith("/dashboard")
    ]
    # The server counts this /metrics call once its answer is sent, so the page's next
    # poll shows one call more than the samples; wait for that poll rather than racing it.
    calls = int(sum(n for _, n in requests)) + 1
    wait_until(
        browser,
        lambda d: _figure(d, "calls")[1] == str(calls),
        15,
        f"the calls figure to reach {calls}",
    )
    assert _figure(browser, "calls")[0] == f"{calls:,}"
    answers = int(sum(n for _, n in samples["recsys_recommendations_total"]))
    assert answers == 60
    assert _figure(browser, "recommendations") == (f"{answers:,}", str(answers))
    assert _figure(browser, "errors_5xx") == ("0", "0")
    fallbacks = sum(
        n
        for labels, n in samples["recsys_recommendations_total"]
        if labels["served_by"] == "fallback"
    )
    text, value = _figure(browser, "fallback_share")
    assert text == f"{100 * fallbacks / answers:.2f}%"
    assert float(value) == pytest.approx(fallbacks / answers)
    assert _figure(browser, "ready")[0] == "yes"
    assert _figure(browser, "candidate_share")[0] == "candidate gets 50.00%"
    p99 = float(_figure(browser, "latency")[1])
    assert 0 < p99 < 10_000

    # CTR per model version, as the server computes it.
    rows = browser.find_elements(By.CSS_SELECTOR, "#ctr tbody tr")
    shown = {
        row.get_attribute("data-model-version"): [
            td.text for td in row.find_elements(By.TAG_NAME, "td")
        ]
        for row in rows
    }
    ctr = {labels["model_version"]: v for labels, v in samples["recsys_online_ctr"]}
    impressions = {labels["model_version"]: v for labels, v in samples["recsys_impressions_total"]}
    clicks = {labels["model_version"]: v for labels, v in samples["recsys_clicks_total"]}
    assert set(shown) == set(ctr) == {served.production, served.candidate}
    for version, cells in shown.items():
        assert cells == [
            version,
            f"{int(impressions[version]):,}",
            f"{int(clicks[version]):,}",
            f"{100 * ctr[version]:.2f}%",
        ]

    # The versions each worker serves, as /metrics lists them.
    rows = browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    on_page = sorted(
        (
            r.get_attribute("data-worker"),
            r.get_attribute("data-alias"),
            r.get_attribute("data-version"),
        )
        for r in rows
    )
    in_metrics = sorted(
        (labels["worker"], labels["alias"], labels["version"])
        for labels, _ in samples["recsys_model_info"]
    )
    assert on_page == in_metrics and len(on_page) == 2 * WORKERS

    # The registry's recent moves, with their reasons.
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    assert [
        (r.get_attribute("data-kind"), r.find_elements(By.TAG_NAME, "td")[-1].text) for r in rows
    ] == [("phase-in", "canary: new training"), ("promotion", "first model")]

    # The key stays for the tab's session: a reload goes straight to the figures.
    browser.refresh()
    wait_until(
        browser,
        lambda d: d.find_element(By.ID, "updated").get_attribute("data-generated-at"),
        30,
        "figures after a reload",
    )
    assert not browser.find_element(By.ID, "auth").is_displayed()
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "live"
    assert browser.find_element(By.ID, "server").text == f"server {socket.gethostname()}"
    assert console_errors(browser) == []
