"""The Dagster UI as an operator uses it, in headless Chromium against a real
``dagster dev`` on the project's ``workspace.yaml``: the lineage from ``weblogs`` to
``promoted_image`` is drawn (and its edges are in the GraphQL API), and a backfill over
a range of ``weblogs`` partitions completes, materializing them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from browser_support import browser, console_errors, wait_until  # noqa: F401

from recsys_serving.lake import LocalLake, read_parquet
from support import free_port, land

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAYS = ("2024-06-01", "2024-06-02", "2024-06-03")
EVENTS_PER_DAY = 60
SOURCE, TARGET = "weblogs", "promoted_image"


@dataclass
class DagsterUI:
    url: str
    home: Path
    log: Path

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30
        )
        r.raise_for_status()
        body = r.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]


def _weblog_events() -> list[dict[str, Any]]:
    """A few quiet users per day (no bot rates), clicks among impressions."""
    events = []
    for d, day in enumerate(DAYS):
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        for i in range(EVENTS_PER_DAY):
            events.append(
                {
                    "event_id": f"e{d}-{i}",
                    "event_type": "click" if i % 5 == 0 else "impression",
                    "user_id": f"u{i % 9}",
                    "item_id": f"i{i % 13}",
                    "ts": (start + timedelta(minutes=7 * i)).timestamp(),
                }
            )
    return events


@pytest.fixture
def dagster_ui(tmp_path: Path) -> Iterator[DagsterUI]:
    """``dagster dev`` (webserver + daemon + code server) on a fresh instance and lake
    holding three days of landed weblogs; every process it started is killed after."""
    home = tmp_path / "home"
    result = land(LocalLake(home / "lake"), _weblog_events())
    assert result.accepted == len(DAYS) * EVENTS_PER_DAY and set(result.days) == set(DAYS)
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "RECSYS_LOG_LEVEL": "WARNING",
        "GX_ANALYTICS_ENABLED": "false",
    }
    for name in (
        "RECSYS_LAKE_URI",
        "RECSYS_DAGSTER_PG_URL",
        *[f"DAGSTER_PG_{p}" for p in ("HOST", "PORT", "DB", "USERNAME", "PASSWORD")],
    ):
        env.pop(name, None)
    log_path = tmp_path / "dagster-dev.log"
    log = open(log_path, "wb")  # noqa: SIM115  (closed below)
    # recsys_assets.instance installs the project's dagster.yaml, then execs dagster dev.
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "recsys_assets.instance", str(BIN / "dagster"), "dev"),
            *("-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: webserver, daemon, code servers, runs
    )
    ui = DagsterUI(f"http://127.0.0.1:{port}", home, log_path)
    try:

        def location_loaded() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dagster dev exited:\n{log_path.read_text()[-3000:]}")
            try:
                nodes = ui.graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]
            except (httpx.HTTPError, AssertionError):
                return False
            return any(n["assetKey"]["path"] == [TARGET] for n in nodes)

        _wait(location_loaded, 120, "the Dagster webserver and the recsys code location")
        yield ui
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever did not stop in time
        proc.wait(timeout=10)
        log.close()


def _wait(predicate: Any, timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def _lineage(ui: DagsterUI) -> tuple[set[str], list[str], dict[str, set[str]]]:
    """Assets on any path ``weblogs`` -> ``promoted_image``, one shortest path, and the
    downstream edges, all from the GraphQL API."""
    nodes = ui.graphql(
        "{ assetNodes { assetKey { path } dependencyKeys { path } dependedByKeys { path } } }"
    )["assetNodes"]
    down: dict[str, set[str]] = {}
    up: dict[str, set[str]] = {}
    for node in nodes:
        name = "/".join(node["assetKey"]["path"])
        down[name] = {"/".join(k["path"]) for k in node["dependedByKeys"]}
        up[name] = {"/".join(k["path"]) for k in node["dependencyKeys"]}
    # Both directions of the API must describe the same edges.
    assert {(a, b) for a, bs in down.items() for b in bs} == {
        (a, b) for b, as_ in up.items() for a in as_
    }

    def reach(start: str, edges: dict[str, set[str]]) -> dict[str, str | None]:
        seen: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for nxt in sorted(edges.get(here, ())):
                if nxt not in seen:
                    seen[nxt] = here
                    queue.append(nxt)
        return seen

    from_source = reach(SOURCE, down)
    assert TARGET in from_source, f"no lineage from {SOURCE} to {TARGET}: {sorted(from_source)}"
    between = set(from_source) & set(reach(TARGET, up))
    path = [TARGET]
    while path[-1] != SOURCE:
        parent = from_source[path[-1]]
        assert parent is not None
        path.append(parent)
    return between, path[::-1], down


def _expand_all_groups(driver: Any) -> None:
    """Graph settings (the gear) -> "Expand all groups"; the menu is retried because the
    graph may still be laying out when the gear is first clicked."""
    from selenium.webdriver.common.by import By

    item = "//*[@role='menuitem'][contains(normalize-space(), 'Expand all groups')]"
    clicked_at = 0.0

    def menu_item(d: Any) -> Any:
        nonlocal clicked_at
        found = d.find_elements(By.XPATH, item)
        if found:
            return found[0]
        if time.time() - clicked_at > 3:
            # The gear of the graph, not the navigation's "Settings" (same icon).
            gears = d.find_elements(By.CSS_SELECTOR, 'button:has([aria-label="settings"])')
            [g for g in gears if "Navigation" not in (g.get_attribute("class") or "")][-1].click()
            clicked_at = time.time()
        return None

    wait_until(driver, menu_item, 20, "the graph settings menu").click()


def _drawn_assets(driver: Any) -> set[str]:
    names = driver.execute_script(
        "return [...document.querySelectorAll('foreignObject [class*=\"assetName\"]')]"
        ".map(e => e.textContent.trim())"
    )
    return set(names)


@pytest.mark.slow
@pytest.mark.timeout(600)  # above the sum of its inner waits, fixtures included
def test_lineage_is_drawn_and_a_weblogs_backfill_completes(
    dagster_ui: DagsterUI,
    browser: Any,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By

    ui = dagster_ui
    between, path, down = _lineage(ui)
    for a, b in pairwise(path):
        assert b in down[a], f"edge {a} -> {b} missing"
    assert {"interactions", "registered_model", "production_model"} <= between

    # The asset graph, filtered to the lineage between the two assets, groups expanded.
    # (The one-time "join the community" prompt is answered "Skip" beforehand, as its
    # button would: it only sets this flag.)
    browser.get(f"{ui.url}/health")
    browser.execute_script("window.localStorage.setItem('communityNux', '\"1\"')")
    selection = quote(f'key:"{SOURCE}"+ and +key:"{TARGET}"', safe="")
    browser.get(f"{ui.url}/asset-groups~{selection}")
    wait_until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "foreignObject"),
        60,
        "the asset graph",
    )
    if not between <= _drawn_assets(browser):
        _expand_all_groups(browser)
    drawn = wait_until(
        browser,
        lambda d: (names := _drawn_assets(d)) >= between and names,
        30,
        f"every asset between {SOURCE} and {TARGET} drawn",
    )
    assert drawn == between  # the selection is exactly the lineage
    assert console_errors(browser) == []

    # A backfill of three weblogs partitions, launched as the UI's backfill dialog does.
    launched = ui.graphql(
        """mutation($params: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $params) {
            __typename
            ... on LaunchBackfillSuccess { backfillId }
            ... on Error { message }
          }
        }""",
        params={
            "partitionsByAssets": [
                {
                    "assetKey": {"path": [SOURCE]},
                    "partitions": {"range": {"start": DAYS[0], "end": DAYS[-1]}},
                }
            ],
            "title": "browser test backfill",
            # Weblog runs of one lake are serialized by the instance's coordinator.
            "tags": [{"key": "recsys/pipeline", "value": "weblogs"}],
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def finished() -> dict[str, Any] | None:
        found = ui.graphql(
            """query($id: String!) {
              partitionBackfillOrError(backfillId: $id) {
                ... on PartitionBackfill {
                  status numPartitions
                  runs(limit: 20) { runId status }
                  assetBackfillData { assetBackfillStatuses {
                    ... on AssetPartitionsStatusCounts {
                      assetKey { path } numPartitionsTargeted numPartitionsMaterialized
                      numPartitionsFailed
                    } } }
                }
                ... on Error { message }
              }
            }""",
            id=backfill_id,
        )["partitionBackfillOrError"]
        if found.get("status") in ("REQUESTED", "CANCELING", "FAILING", None):
            return None
        return found

    backfill = _wait(finished, 180, "the backfill to finish", every=2.0)
    assert backfill["status"] == "COMPLETED_SUCCESS", backfill
    assert backfill["numPartitions"] == len(DAYS)
    (counts,) = backfill["assetBackfillData"]["assetBackfillStatuses"]
    assert counts == {
        "assetKey": {"path": [SOURCE]},
        "numPartitionsTargeted": len(DAYS),
        "numPartitionsMaterialized": len(DAYS),
        "numPartitionsFailed": 0,
    }
    run_ids = {r["runId"] for r in backfill["runs"]}
    assert run_ids and {r["status"] for r in backfill["runs"]} == {"SUCCESS"}

    # Each partition was materialized by the backfill's runs, and is in the lake.
    materializations = ui.graphql(
        """query($days: [String!]) { assetOrError(assetKey: {path: ["weblogs"]}) {
             ... on Asset { assetMaterializations(partitions: $days) { partition runId } } } }""",
        days=list(DAYS),
    )["assetOrError"]["assetMaterializations"]
    by_backfill = {m["partition"] for m in materializations if m["runId"] in run_ids}
    assert by_backfill == set(DAYS)
    lake = LocalLake(ui.home / "lake")
    for day in DAYS:
        assert read_parquet(lake, f"weblogs/date={day}/part-0.parquet").height == EVENTS_PER_DAY

    # The UI's backfill page says so too.
    browser.get(f"{ui.url}/runs/b/{backfill_id}")
    wait_until(
        browser,
        lambda d: "Succeeded" in d.find_element(By.TAG_NAME, "body").text,
        60,
        "the backfill page to show it succeeded",
    )
    assert f"{DAYS[0]}...{DAYS[-1]}" in browser.find_element(By.TAG_NAME, "body").text
    assert console_errors(browser) == []
