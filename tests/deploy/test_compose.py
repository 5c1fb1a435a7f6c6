"""docker/compose.yaml, checked by reading it (no container engine runs here): what it
builds and mounts exists, the commands it runs are real, every service the environment,
Prometheus, nginx or the Dagster workspace points at is defined and listens there."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from test_docker_files import INSTANCE_WRAPPER, assert_real_command, exec_form

from recsys_serving.settings import setting_fields

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
DAGSTER_SERVICES = ("dagster-code", "dagster-webserver", "dagster-daemon")
# Ports the third-party images listen on by default.
LISTENS = {
    "minio": 9000,
    "mongo": 27017,
    "elasticsearch": 9200,
    "postgres": 5432,
    "registry": 5000,
    "alertmanager": 9093,
    "prometheus": 9090,
}
# RECSYS_* variables read outside Settings (logging is configured before Settings exists).
NON_SETTINGS_VARS = {"RECSYS_LOG_FORMAT", "RECSYS_LOG_LEVEL"}
_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's interpolation with an empty shell: ``${VAR:-default}`` -> default."""
    if isinstance(value, str):
        return _DEFAULTED.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    assert isinstance(raw, dict), "use the mapping form of environment"
    return {k: (None if v is None else str(v)) for k, v in raw.items()}


def host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url if "://" in url else f"//{url}")
    return parts.hostname or "", parts.port


def test_builds_use_existing_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(built) >= {"recsys-serving", *DAGSTER_SERVICES}
    for name, build in built.items():
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build from the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
    assert {services[n]["image"] for n in DAGSTER_SERVICES} == {"recsys-dagster:local"}
    assert built["dagster-code"]["dockerfile"] == "docker/dagster.Dockerfile"
    assert built["recsys-serving"]["dockerfile"] == "docker/serving.Dockerfile"


def test_bind_mounts_and_config_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        mounts: dict[str, Path] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                host = (COMPOSE.parent / source).resolve()
                assert host.exists(), f"{name}: mounted {source} does not exist"
                mounts[target] = host
        for arg in service.get("command", []) if isinstance(service.get("command"), list) else []:
            if arg.startswith("--config.file="):
                inside = arg.split("=", 1)[1]
                owner = next((t for t in mounts if inside.startswith(t + "/")), None)
                assert owner, f"{name}: {inside} is not in a mounted directory"
                host = mounts[owner] / inside[len(owner) + 1 :]
                assert host.is_file(), f"{name}: {host.relative_to(ROOT)} does not exist"


def test_dagster_and_recsys_commands_are_real(services: dict[str, dict[str, Any]]) -> None:
    entrypoint = exec_form(ROOT / "docker" / "dagster.Dockerfile", "ENTRYPOINT")
    assert entrypoint == INSTANCE_WRAPPER  # every Dagster process installs the instance
    for name in DAGSTER_SERVICES:
        service = services[name]
        assert_real_command([*entrypoint, *service["command"]], f"compose {name}")
        check = service.get("healthcheck", {}).get("test")
        if check:
            assert check[0] == "CMD", f"{name}: exec-form healthcheck"
            assert_real_command(check[1:], f"compose {name} healthcheck")


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    dockerfile_checks = {"dagster-webserver"}  # HEALTHCHECK in docker/dagster.Dockerfile
    for name, service in services.items():
        if name == "minio-init" or name in dockerfile_checks:
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_depends_on_and_volumes_are_defined(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            if spec["condition"] == "service_healthy":
                has_check = bool(services[dep].get("healthcheck")) or dep == "dagster-webserver"
                assert has_check, f"{name} waits for {dep} to be healthy, but it has no check"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source}"


def test_environment_points_at_defined_services(services: dict[str, dict[str, Any]]) -> None:
    fields = {field.env for field in setting_fields()}
    for name in ("recsys-serving", *DAGSTER_SERVICES):
        variables = env(services[name])
        unknown = {k for k in variables if k.startswith("RECSYS_")} - fields - NON_SETTINGS_VARS
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"
        assert (variables["RECSYS_LAKE_URI"] or "").startswith("s3://"), name
        for var in ("RECSYS_S3_ENDPOINT_URL", "RECSYS_MONGO_URI", "RECSYS_ES_URL"):
            host, port = host_port(variables[var] or "")
            assert host in services, f"{name}: {var} points at undefined service {host}"
            assert port == LISTENS[host], (
                f"{name}: {var} port {port}, {host} listens on {LISTENS[host]}"
            )
        registry_host = (variables["RECSYS_OCI_REPOSITORY"] or "").split("/")[0]
        host, port = host_port(registry_host)
        assert host in services and port == LISTENS[host], f"{name}: RECSYS_OCI_REPOSITORY"
        assert variables["RECSYS_OCI_INSECURE"] == "true"  # the local registry is plain HTTP


def test_lake_bucket_is_created(services: dict[str, dict[str, Any]]) -> None:
    lake = env(services["recsys-serving"])["RECSYS_LAKE_URI"] or ""
    bucket = lake.removeprefix("s3://").split("/")[0]
    init = " ".join(services["minio-init"]["command"])
    assert f"mc mb --ignore-existing lake/{bucket}" in init
    credentials = env(services["recsys-serving"])
    minio = env(services["minio"])
    assert credentials["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert credentials["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def test_dagster_storage_is_the_compose_postgres(services: dict[str, dict[str, Any]]) -> None:
    from sqlalchemy.engine import make_url

    pg = env(services["postgres"])
    for name in DAGSTER_SERVICES:
        url = make_url(env(services[name])["RECSYS_DAGSTER_PG_URL"] or "")
        assert (url.host, url.port) == ("postgres", LISTENS["postgres"]), name
        assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
        assert url.database == pg["POSTGRES_DB"], name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_dagster_workspace_reaches_the_code_server(services: dict[str, dict[str, Any]]) -> None:
    command = services["dagster-code"]["command"]
    port = int(command[command.index("--port") + 1])
    location = command[command.index("--location-name") + 1]
    for name in ("dagster-webserver", "dagster-daemon"):
        cmd = services[name]["command"]
        workspace_in_image = cmd[cmd.index("--workspace") + 1]
        assert workspace_in_image.startswith("/app/"), "the image's WORKDIR is /app"
        workspace = yaml.safe_load((ROOT / workspace_in_image.removeprefix("/app/")).read_text())
        (entry,) = workspace["load_from"]
        grpc = entry["grpc_server"]
        assert (grpc["host"], grpc["port"]) == ("dagster-code", port), name
        assert grpc["location_name"] == location
    project = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert project["load_from"][0]["python_module"]["location_name"] == location


def test_serving_runs_replicas_behind_the_load_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["recsys-serving"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["recsys-serving"]  # only reachable through the balancer
    nginx = compose["configs"]["nginx-lb"]["content"]
    upstream = re.search(r"server ([\w-]+):(\d+) resolve;", nginx)
    assert upstream and upstream.group(1) == "recsys-serving"
    assert upstream.group(2) == "8000"
    assert "$host" in nginx  # $$ escaping reached nginx as a single $
    listen = re.search(r"listen (\d+);", nginx)
    assert listen and services["recsys-lb"]["ports"] == [f"127.0.0.1:8000:{listen.group(1)}"]


def test_prometheus_scrapes_and_alerts_defined_services(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets: list[str] = []
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets += [f"{n}:{sd['port']}" for n in sd["names"]]
        for static in job.get("static_configs", []):
            targets += static["targets"]
    for am in config.get("alerting", {}).get("alertmanagers", []):
        for static in am.get("static_configs", []):
            targets += static["targets"]
    assert "recsys-serving:8000" in targets
    for target in targets:
        host, port = host_port(target)
        if host == "localhost":
            continue
        assert host in services, f"prometheus targets undefined service {host}"
        assert port == LISTENS.get(host, 8000), f"prometheus target {target}"
