"""The production Dagster instance: one dagster.yaml, SQLite by default, PostgreSQL when
configured (tested against a real server), and one retraining at a time."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._utils.tags import TagConcurrencyLimitsCounter

from pg_support import PostgresServer, postgres_server  # noqa: F401  (fixture)
from recsys_assets.instance import (
    PG_PART_ENVS,
    PG_URL_ENV,
    PROJECT_DAGSTER_YAML,
    InstanceConfigError,
    ensure_dagster_home,
    main,
    render_instance_config,
    storage_summary,
)
from recsys_assets.runs import materialize_weblogs
from recsys_assets.weblogs.quality import CHECK_DESCRIPTIONS
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings
from support import land

DAYS = ["2026-11-18", "2026-11-19"]
PIPELINE_TAG = "recsys/pipeline"


def clear_pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first: monkeypatch records (and restores) only what it touched, and
    # ``delenv(raising=False)`` of an absent variable records nothing, so a URL that
    # ensure_dagster_home exports during the test would outlive it.
    for var in [PG_URL_ENV, *PG_PART_ENVS.values()]:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DAGSTER_HOME; monkeypatch restores what ensure_dagster_home exports."""
    clear_pg_env(monkeypatch)
    dagster_home = tmp_path / "dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    return dagster_home


def installed(home: Path) -> dict[str, Any]:
    return yaml.safe_load((home / "dagster.yaml").read_text())


# --- the embedded default and the run queue ---------------------------------------------


def test_embedded_default_is_the_repository_file_on_sqlite(home: Path, tmp_path: Path) -> None:
    assert ensure_dagster_home(Settings(home=tmp_path)) == home
    assert (home / "dagster.yaml").read_text() == PROJECT_DAGSTER_YAML.read_text()
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
    assert storage_summary(Settings(home=tmp_path)) == f"SQLite under {home}"


def test_the_run_queue_allows_one_retraining_and_one_weblogs_run(
    home: Path, tmp_path: Path
) -> None:
    ensure_dagster_home(Settings(home=tmp_path))
    with dg.DagsterInstance.get() as instance:
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, dg.QueuedRunCoordinator)
        limits = coordinator.get_run_queue_config().tag_concurrency_limits
    assert {"key": PIPELINE_TAG, "value": "retrain", "limit": 1} in limits
    assert {"key": PIPELINE_TAG, "value": "weblogs", "limit": 1} in limits
    assert {"key": PIPELINE_TAG, "value": "canary", "limit": 1} in limits  # promotion steps

    # What the daemon decides with these limits while one retraining is running. Dagster
    # has no public API for the queue's decision short of a running daemon with a loaded
    # workspace, so this one private import stays: it is the counter the daemon uses.
    def run(pipeline: str | None) -> dg.DagsterRun:
        return dg.DagsterRun(job_name="job", tags={PIPELINE_TAG: pipeline} if pipeline else {})

    counter = TagConcurrencyLimitsCounter(limits, [run("retrain")])
    assert counter.is_blocked(run("retrain"))
    assert not counter.is_blocked(run("weblogs"))
    assert not counter.is_blocked(run(None))
    counter.update_counters_with_launched_item(run("weblogs"))
    assert counter.is_blocked(run("weblogs"))


# --- rendering the PostgreSQL storage block ----------------------------------------------


def test_a_pg_url_adds_an_env_reference_and_never_the_secret(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://dagster:hunter2-secret@db.internal:5432/dagster"
    settings = Settings(home=tmp_path, dagster_pg_url=url)
    ensure_dagster_home(settings)
    text = (home / "dagster.yaml").read_text()
    assert "hunter2" not in text
    assert text.startswith(PROJECT_DAGSTER_YAML.read_text().rstrip())  # the one source
    config = installed(home)
    assert config["storage"] == {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    assert config["run_coordinator"]["config"]["tag_concurrency_limits"][1]["value"] == "retrain"
    # The URL came from a Settings object: it is exported so Dagster resolves the reference.
    assert os.environ[PG_URL_ENV] == url
    assert (
        storage_summary(settings) == "PostgreSQL postgresql://dagster:***@db.internal:5432/dagster"
    )

    # Unsetting the URL switches the same DAGSTER_HOME back to SQLite.
    monkeypatch.delenv(PG_URL_ENV)
    ensure_dagster_home(Settings(home=tmp_path))
    assert "storage" not in installed(home)


def test_the_dagster_pg_variables_render_a_postgres_db_block(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"hostname": "db", "db_name": "dagster", "username": "dagster", "password": "pw-secret"}
    for field, value in env.items():
        monkeypatch.setenv(PG_PART_ENVS[field], value)
    ensure_dagster_home(Settings(home=tmp_path))
    assert "pw-secret" not in (home / "dagster.yaml").read_text()
    postgres_db = installed(home)["storage"]["postgres"]["postgres_db"]
    assert postgres_db == {
        **{field: {"env": PG_PART_ENVS[field]} for field in env},
        "scheme": "postgresql+psycopg2",
    }
    assert storage_summary(Settings(home=tmp_path)) == "PostgreSQL dagster@db:5432/dagster"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://u:p@db/dagster", "write postgresql://, not postgres://"),
        ("mysql://u:p@db/dagster", "is not a PostgreSQL URL"),
        ("not a url", "is not a database URL"),
        ("postgresql://u:p@db", "needs a host and a database name"),
    ],
)
def test_a_bad_pg_url_is_refused_with_the_reason_and_without_the_password(
    home: Path, tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(InstanceConfigError, match=message) as caught:
        render_instance_config(Settings(home=tmp_path, dagster_pg_url=url))
    assert ":p@" not in str(caught.value)


def test_a_unix_socket_url_is_accepted(home: Path, tmp_path: Path) -> None:
    url = "postgresql://dagster@/dagster?host=/run/postgresql"
    text = render_instance_config(Settings(home=tmp_path, dagster_pg_url=url))
    assert yaml.safe_load(text)["storage"]["postgres"] == {"postgres_url": {"env": PG_URL_ENV}}


def test_a_url_whose_driver_is_missing_is_refused(home: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here")
    settings = Settings(home=tmp_path, dagster_pg_url="postgresql+pg8000://u:p@db/dagster")
    with pytest.raises(InstanceConfigError, match="driver is not installed"):
        render_instance_config(settings)


def test_ambiguous_or_half_configured_storage_is_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PG_PART_ENVS["hostname"], "db")
    with pytest.raises(InstanceConfigError, match="DAGSTER_PG_DB, DAGSTER_PG_USERNAME"):
        render_instance_config(Settings(home=tmp_path))
    settings = Settings(home=tmp_path, dagster_pg_url="postgresql://u:p@db/dagster")
    with pytest.raises(InstanceConfigError, match="one way only"):
        render_instance_config(settings)
    for field in ("db_name", "username"):
        monkeypatch.setenv(PG_PART_ENVS[field], "x")
    monkeypatch.setenv(PG_PART_ENVS["port"], "54x")
    with pytest.raises(InstanceConfigError, match="not a port number"):
        render_instance_config(Settings(home=tmp_path))
    assert not (home / "dagster.yaml").exists()  # nothing half-written on the way


def test_module_entry_point_installs_then_runs_the_command(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    probe = "import os; print(os.environ['DAGSTER_HOME'])"
    result = subprocess.run(
        [sys.executable, "-m", "recsys_assets.instance", "--", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(home)
    assert (home / "dagster.yaml").exists()
    assert main(["--", "recsys-no-such-command"]) == 127
    monkeypatch.setenv(PG_URL_ENV, "postgres://u:p@db/dagster")
    assert main([]) == 2


def documented_block(marker: str) -> dict[str, Any]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    found = [b for b in blocks if b.startswith(marker)]
    assert len(found) == 1, f"docs/operations.md: no yaml block starting with {marker!r}"
    return yaml.safe_load(found[0])


def _validate_class_config(klass: Any, config: dict[str, Any]) -> None:
    """Check ``config`` against a configurable class's own schema through public API:
    an op with that schema, and ``dg.validate_run_config`` (raises on a bad entry)."""

    @dg.op(name="configured_class", config_schema=klass.config_type())
    def configured_class() -> None: ...

    @dg.job(name="validate_class_config")
    def validate_class_config() -> None:
        configured_class()

    dg.validate_run_config(validate_class_config, {"ops": {"configured_class": {"config": config}}})


def test_the_documented_ecs_configuration_is_valid_for_dagster_aws(tmp_path: Path) -> None:
    """Validated against each class's own schema; not instantiated (that calls AWS)."""
    block = documented_block("# dagster.yaml: scale-out on Amazon ECS")
    assert set(block) == {"run_launcher", "compute_logs"}
    for section in block.values():
        module = importlib.import_module(section["module"])
        klass = getattr(module, section["class"])
        _validate_class_config(klass, section["config"])
        with pytest.raises(dg.DagsterInvalidConfigError):  # the check can fail
            _validate_class_config(klass, {**section["config"], "no_such_option": 1})
    # Merged into the project's instance config, loading an instance from it accepts it
    # (Dagster validates dagster.yaml on load; the launcher is built only when used).
    merged = {**yaml.safe_load(PROJECT_DAGSTER_YAML.read_text()), **block}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(merged))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_runs(limit=1) == []
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({**merged, "no_such_section": {}}))
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.DagsterInstance.from_config(str(tmp_path))


# --- a real PostgreSQL server ---------------------------------------------------------


def events_for(day: str, n: int) -> list[dict[str, Any]]:
    start = datetime.fromisoformat(day).replace(hour=8, tzinfo=UTC).timestamp()
    return [
        {
            "event_id": f"{day}-{i}",
            "event_type": "click" if i % 4 == 3 else "impression",
            "user_id": f"u{i % 5}",
            "item_id": f"i{i % 11}",
            "ts": start + 30 * i,
            "request_id": f"{day}-r{i // 4}",
            "position": i % 4,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pg_run(
    postgres_server: PostgresServer,  # noqa: F811  (the fixture imported above)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """Two weblogs partitions processed by the CLI's code path on a PostgreSQL instance."""
    database = postgres_server.create_database()
    url = postgres_server.url(database)
    root = tmp_path_factory.mktemp("pg-instance")
    with pytest.MonkeyPatch.context() as mp:
        clear_pg_env(mp)
        mp.setenv("DAGSTER_HOME", str(root / "dagster"))
        mp.setenv(PG_URL_ENV, url)
        settings = Settings(home=root, dagster_pg_url=url, catalog_epoch="2020-01-01")
        lake = LocalLake(settings.resolved_lake_uri)
        for day in DAYS:
            land(lake, events_for(day, 40))
        outcome = materialize_weblogs(settings, DAYS)
    try:
        yield {
            "server": postgres_server,
            "database": database,
            "url": url,
            "home": root / "dagster",
            "outcome": outcome,
        }
    finally:
        postgres_server.drop_database(database)


@pytest.mark.slow
def test_runs_materializations_and_checks_are_read_back_from_postgres(
    pg_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    outcome = pg_run["outcome"]
    assert outcome.success, outcome.failure
    home: Path = pg_run["home"]
    # Nothing went to the SQLite default beside the instance.
    assert not list(home.rglob("*.db"))

    # A fresh instance on the same database, configured the other documented way.
    server: PostgresServer = pg_run["server"]
    clear_pg_env(monkeypatch)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    parts = {
        "hostname": server.host,
        "port": str(server.port),
        "db_name": pg_run["database"],
        "username": server.user,
        "password": server.password,
    }
    for field, value in parts.items():
        monkeypatch.setenv(PG_PART_ENVS[field], value)
    ensure_dagster_home(Settings(home=tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

        run = instance.get_run_by_id(outcome.run_id)
        assert run is not None
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["recsys/trigger"] == "cli"

        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("weblogs")), limit=10
        ).records
        by_partition = {r.partition_key: r for r in records}
        assert set(by_partition) == set(DAYS)
        for day in DAYS:
            mat = by_partition[day].asset_materialization
            assert mat is not None
            # One range run, one result: every partition carries the run's totals.
            assert mat.metadata["dagster/row_count"].value == 40 * len(DAYS)
            assert by_partition[day].run_id == outcome.run_id

        checks = instance.get_records_for_run(
            outcome.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
        evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in checks]
        assert {e.check_name for e in evaluations} == set(outcome.checks)
        assert set(outcome.checks) == set(CHECK_DESCRIPTIONS)  # every check ran
        assert all(e.passed for e in evaluations)

        limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
        assert {"key": PIPELINE_TAG, "value": "retrain", "limit": 1} in limits

    # And the rows really are in PostgreSQL's tables.
    engine = sa.create_engine(pg_run["url"])
    try:
        with engine.connect() as conn:
            statuses = conn.execute(sa.text("SELECT run_id, status FROM runs")).all()
    finally:
        engine.dispose()
    assert (outcome.run_id, "SUCCESS") in statuses


@pytest.mark.slow
def test_dagster_processes_started_from_the_same_home_use_postgres(
    pg_run: dict[str, Any],
) -> None:
    """What `dagster dev` and `dagster-daemon run` do: open $DAGSTER_HOME/dagster.yaml."""
    env = {k: v for k, v in os.environ.items() if k not in {PG_URL_ENV, *PG_PART_ENVS.values()}}
    env["DAGSTER_HOME"] = str(pg_run["home"])
    dagster = str(Path(sys.executable).with_name("dagster"))
    ensure = [sys.executable, "-m", "recsys_assets.instance"]
    subprocess.run(ensure, env={**env, PG_URL_ENV: pg_run["url"]}, check=True, timeout=60)

    listed = subprocess.run(
        [dagster, "run", "list"],
        env={**env, PG_URL_ENV: pg_run["url"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert pg_run["outcome"].run_id in listed.stdout

    # Without the variable the process fails naming it; it never falls back to SQLite.
    missing = subprocess.run(
        [dagster, "run", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode != 0
    assert PG_URL_ENV in missing.stdout + missing.stderr
    assert not list(Path(pg_run["home"]).rglob("*.db"))
