"""The Grafana dashboards of the compose stack (docker/grafana/).

Grafana cannot run here (no container engine), so what Grafana needs to provision them
is checked by reading the files; and every panel's query, as Grafana would send it, is
answered by a real Prometheus that scrapes a real ``recsys serve`` with the project's
recording rules loaded, while simulated clients use the service.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_world  # noqa: F401
from serve_process import ServeProcess, recsys_serve
from test_prometheus_rules import all_rules, contract_metrics

from recsys_serving.lake import LocalLake
from recsys_serving.registry import ModelRegistry
from serving_support import wait_for
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "recsys.yml"
COMPOSE = ROOT / "docker" / "compose.yaml"
RULES = ROOT / "docker" / "prometheus" / "rules"
JOB = "recsys-serving"
GRID_COLUMNS = 24

# What Grafana substitutes for its built-in variables, as it would for a short range
# over a Prometheus scraped every second (the test's scrape interval).
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def load(path: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(path.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # panel title and refId, or annotation name
    expr: str


def queries(dashboard: dict[str, Any]) -> list[Query]:
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target['refId']}"
            found.append(Query(dashboard["uid"], where, target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            found.append(
                Query(dashboard["uid"], f"annotation {annotation['name']!r}", annotation["expr"])
            )
    return found


def variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variables with the value the test substitutes: their current value."""
    values = dict(BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable["current"]["value"]
        values[variable["name"]] = "|".join(current) if isinstance(current, list) else current
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"undefined variable ${name} in {expr}")
        return values[name]

    return _VARIABLE.sub(one, expr)


@pytest.fixture(scope="module")
def dashboards() -> list[dict[str, Any]]:
    assert DASHBOARD_FILES, "no dashboard under docker/grafana/dashboards"
    return [load(path) for path in DASHBOARD_FILES]


# ------------------------------------------------------------------ the files themselves


def datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return dict(source)


def test_every_dashboard_has_what_grafana_needs(dashboards: list[dict[str, Any]]) -> None:
    uids = [d["uid"] for d in dashboards]
    assert len(set(uids)) == len(uids), "dashboard uids must be unique"
    source = {"type": "prometheus", "uid": datasource()["uid"]}
    for dashboard in dashboards:
        name = dashboard["uid"]
        assert re.fullmatch(r"[\w-]{1,40}", name), f"{name}: a uid Grafana accepts"
        assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
        assert "id" not in dashboard or dashboard["id"] is None, "provisioning assigns ids"
        ids = [p["id"] for p in all_panels(dashboard)]
        assert len(set(ids)) == len(ids), f"{name}: panel ids must be unique"
        cells: set[tuple[int, int]] = set()
        for panel in all_panels(dashboard):
            where = f"{name} / {panel.get('title')!r}"
            assert panel["type"] and panel["title"], where
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), where
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS
            area = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not area & cells, f"{where} overlaps another panel"
            cells |= area
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == source, f"{where}: the provisioned datasource"
            assert panel["targets"], f"{where} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                assert target["datasource"] == source and target["expr"].strip(), where
            assert panel["description"], f"{where}: say what the panel shows"
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"] == source, f"{name}: variable {variable['name']}"


def test_the_dashboards_cover_what_operators_watch(dashboards: list[dict[str, Any]]) -> None:
    exprs = " ".join(q.expr for d in dashboards for q in queries(d))
    wanted = {
        "calls": "job_route:recsys_http_requests:rate5m",
        "latency percentiles": "job_route:recsys_http_request_duration_seconds:p99_5m",
        "errors": "job:recsys_http_5xx_ratio:rate5m",
        "fallback share": "job:recsys_fallback_share:rate5m",
        "online CTR per model version": "sum by (model_version) (increase(recsys_clicks_total",
        "promotions": "count by (alias, version) (recsys_model_info",
    }
    for what, expr in wanted.items():
        assert expr in exprs, f"no panel shows {what}"


def test_queries_read_promised_metrics_and_defined_recording_rules(
    dashboards: list[dict[str, Any]],
) -> None:
    promised = contract_metrics()
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    for dashboard in dashboards:
        for query in queries(dashboard):
            expr = substitute(query.expr, variables(dashboard))
            raw = {
                re.sub(r"_(bucket|count|sum)$", "", m)
                for m in re.findall(r"(?<![\w:])recsys_\w+", expr)
            }
            assert raw <= promised, f"{query.where}: {sorted(raw - promised)} not promised"
            rules = set(re.findall(r"\b\w+:recsys_\w+:\w+", expr))
            assert rules <= recorded, f"{query.where}: no recording rule {sorted(rules - recorded)}"


def test_compose_provisions_the_datasource_and_the_dashboards() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert provider["type"] == "file" and provider["folder"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.removeprefix(provider["options"]["path"] + "/") in {p.name for p in DASHBOARD_FILES}
    source = datasource()
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    prometheus = compose["services"]["prometheus"]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    # $__rate_interval is four of these: it must be the real scrape interval.
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    assert all(port.startswith("127.0.0.1:") for port in grafana["ports"])


# ------------------------------------------------------------------ a real Prometheus


@dataclass
class Prometheus:
    url: str
    log: Path
    started: float

    def query_range(self, expr: str) -> dict[str, Any]:
        now = time.time()
        response = httpx.post(
            f"{self.url}/api/v1/query_range",
            data={"query": expr, "start": self.started, "end": now, "step": 1},
            timeout=10,
        )
        body: dict[str, Any] = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body


def has_data(body: dict[str, Any]) -> bool:
    """At least one finite sample: what a Grafana panel draws."""
    return any(
        math.isfinite(float(value))
        for series in body["data"]["result"]
        for _, value in series["values"]
    )


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    with recsys_serve(tmp_path, env={"RECSYS_AUTH_ENABLED": "false"}) as server:
        yield server


@pytest.fixture
def prometheus(
    prometheus_binary: str, served: ServeProcess, tmp_path: Path
) -> Iterator[Prometheus]:
    """The project's rule files; one scrape target, the test's server, as job
    ``recsys-serving``; scrapes and rule evaluations every second."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", log, time.time())

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "Prometheus to be ready")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Clients(threading.Thread):
    """Simulated users: recommendations (impressions), clicks on what they were shown,
    similar items for an unknown item (404) and an invalid event (rejected)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.clicks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=10) as client:
                turn = 0
                while not self.stop.is_set():
                    self.visit(client, turn)
                    turn += 1
                    self.stop.wait(0.05)  # pacing between visits, not a synchronisation
        except BaseException as exc:  # reported by the test
            self.error = exc

    def visit(self, client: httpx.Client, turn: int) -> None:
        user = f"u{turn % 20}"
        answer = client.get(f"/recommendations/{user}", params={"k": 5})
        answer.raise_for_status()
        body = answer.json()
        events = [
            {
                "event_id": f"click-{turn}",
                "event_type": "click",
                "user_id": user,
                "item_id": body["items"][0]["item_id"],
                "ts": time.time(),
                "request_id": body["request_id"],
                "position": 0,
                "model_version": body["model_version"],
            },
            {
                "event_id": f"bad-{turn}",
                "event_type": "teleport",
                "user_id": user,
                "ts": time.time(),
            },
        ]
        assert client.post("/events", json=events).status_code == 202
        self.clicks += 1
        assert client.get("/similar/no-such-item").status_code == 404


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(
    dashboards: list[dict[str, Any]],
    served: ServeProcess,
    prometheus: Prometheus,
    tiny_bundle: Path,  # noqa: F811
) -> None:
    # Before any model: a 503 (an error, and a fallback with reason no_model).
    assert httpx.get(f"{served.url}/recommendations/u0", timeout=10).status_code == 503
    registry = ModelRegistry(LocalLake(served.home / "lake"))
    version = registry.register(tiny_bundle).version
    registry.promote(version, reason="test: first model")
    wait_for(
        lambda: httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200,
        60,
        "the server to load the promoted model",
    )
    clients = Clients(served.url)
    clients.start()
    try:
        pending = [(q, substitute(q.expr, variables(d))) for d in dashboards for q in queries(d)]
        deadline = time.monotonic() + 120
        last: dict[str, Any] = {}
        while pending and time.monotonic() < deadline:
            assert clients.error is None, repr(clients.error)
            expr = pending[0][1]
            last = prometheus.query_range(expr)
            if has_data(last):
                pending.pop(0)
            else:  # polled: the next scrape or rule evaluation is a second away
                time.sleep(0.25)
        assert not pending, (
            f"no data for {pending[0][0].where}: {pending[0][1]}\nlast answer: {last}\n"
            f"prometheus said:\n{prometheus.log.read_text()[-2000:]}"
        )
    finally:
        clients.stop.set()
        clients.join(timeout=30)
    assert clients.error is None and clients.clicks > 0

    # Each variable's own query (label values of a metric) lists the scraped job.
    for dashboard in dashboards:
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]
            assert query["query"] == f"label_values({query['metric']},{query['label']})"
            values = httpx.get(
                f"{prometheus.url}/api/v1/label/{query['label']}/values",
                params={"match[]": query["metric"]},
                timeout=10,
            ).json()["data"]
            assert set(variable["current"]["value"]) <= set(values), (variable, values)
    # The promotion is seen as the served version, under its alias.
    info = prometheus.query_range(f'count by (alias, version) (recsys_model_info{{job="{JOB}"}})')
    assert {(s["metric"]["alias"], s["metric"]["version"]) for s in info["data"]["result"]} == {
        ("production", version)
    }
