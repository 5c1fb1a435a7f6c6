"""Prometheus configuration and alert rules, checked and unit-tested by promtool itself.

The rule unit tests (docker/prometheus/tests/*.test.yml) hold the input series; this
module runs them and checks that they leave no alert unproven: each alert rule must be
seen firing, and each alert name seen staying quiet, in at least one test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "docker" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.test.yml"))
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=PROM_DIR, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [rule for rule in group["rules"] if "alert" in rule]
    return rules


def all_rules() -> list[dict[str, Any]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += group["rules"]
    return rules


def test_the_configuration_is_valid(promtool: str) -> None:
    result = run([promtool, "check", "config", "prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


def test_the_rules_are_valid_and_lint_clean(promtool: str) -> None:
    assert RULE_FILES
    result = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_every_alert_fires_on_its_condition_and_stays_quiet_otherwise(promtool: str) -> None:
    assert TEST_FILES
    result = run([promtool, "test", "rules", *map(str, TEST_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)


def test_no_alert_rule_is_left_unproven() -> None:
    fired: dict[str, set[str | None]] = defaultdict(set)
    quiet: set[str] = set()
    for path in TEST_FILES:
        spec = yaml.safe_load(path.read_text())
        tested = {Path(f).name for f in spec["rule_files"]}
        assert tested == {p.name for p in RULE_FILES}, f"{path.name} must load every rule file"
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    for alert in check["exp_alerts"]:
                        fired[check["alertname"]].add(alert["exp_labels"].get("cause"))
                else:
                    quiet.add(check["alertname"])
    for rule in alert_rules():
        name, cause = rule["alert"], rule["labels"].get("cause")
        assert cause in fired[name], f"no test shows {name} (cause={cause}) firing"
        assert name in quiet, f"no test shows {name} staying quiet"


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        doc, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert doc == "docs/operations.md", name
        assert anchor in anchors, f"{name}: docs/operations.md has no heading #{anchor}"


def contract_metrics() -> set[str]:
    """Metric names of the table in docs/architecture.md ("Prometheus metrics")."""
    section = ARCHITECTURE_DOC.read_text().split("## Prometheus metrics", 1)[1].split("\n## ")[0]
    return set(re.findall(r"^\| `(recsys_\w+)` \|", section, re.M))


def test_rules_read_only_the_metrics_the_server_promises() -> None:
    promised = contract_metrics()
    assert "recsys_model_ready" in promised
    used = set()
    for rule in all_rules():
        # Raw metric names; recorded series (level:recsys_...:op) start with a colon part.
        used |= set(re.findall(r"(?<![\w:])recsys_\w+", rule["expr"]))
    series = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert series, "no metric found in the rules"
    assert series <= promised, f"not in docs/architecture.md: {sorted(series - promised)}"


def test_prometheus_scrapes_every_serving_replica_and_sends_to_alertmanager() -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    serving = jobs["recsys-serving"]
    assert serving["metrics_path"] == "/metrics"
    # DNS discovery: each replica behind the compose service name is its own target.
    assert serving["dns_sd_configs"] == [
        {"names": ["recsys-serving"], "type": "A", "port": 8000, "refresh_interval": "30s"}
    ]
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules/*.yml"]
