"""The Dagster instance every entry point shares (CLI, ``dagster dev``, daemon, tests).

Runs launched by ``recsys ingest`` or ``recsys retrain`` must show up in the UI like
any other, so all of them use ``$RECSYS_HOME/dagster`` unless ``DAGSTER_HOME`` says
otherwise, with the repository's ``dagster.yaml`` installed there.

That file is the single source of truth. The only thing added at install time is the
storage block when PostgreSQL is configured, and it holds ``{env: VAR}`` references
rather than values: Dagster resolves them in every process that opens the instance,
so credentials never reach the disk, and a webserver or daemon started straight from
the same ``DAGSTER_HOME`` (``dagster dev``, ``dagster-daemon run``) uses the same
storage as the CLI, or fails naming the missing variable instead of silently writing
to SQLite.

Containers that run ``dagster-webserver`` or ``dagster-daemon`` directly can install
the instance first: ``python -m recsys_assets.instance dagster-daemon run -w ...``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from recsys_serving.lake import atomic_file
from recsys_serving.settings import Settings

# Package data (links to the repository's files in a checkout, copies in a wheel), so a
# non-editable install configures the instance and loads the code location the same way.
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parent / "dagster.yaml"
PROJECT_WORKSPACE_YAML = Path(__file__).resolve().parent / "workspace.yaml"

PG_URL_ENV = "RECSYS_DAGSTER_PG_URL"
# The split form, for platforms that inject the password as its own secret variable
# (ECS task secrets, Kubernetes secretKeyRef); names follow Dagster's Helm chart.
PG_PART_ENVS: dict[str, str] = {
    "hostname": "DAGSTER_PG_HOST",
    "port": "DAGSTER_PG_PORT",
    "db_name": "DAGSTER_PG_DB",
    "username": "DAGSTER_PG_USERNAME",
    "password": "DAGSTER_PG_PASSWORD",
}
PG_REQUIRED_PARTS = ("hostname", "db_name", "username")
# psycopg2 is what dagster-postgres installs; naming it keeps the split form working
# whatever SQLAlchemy's default driver for ``postgresql://`` is.
PG_SCHEME = "postgresql+psycopg2"
STORAGE_KEYS = ("storage", "run_storage", "event_log_storage", "schedule_storage")


class InstanceConfigError(ValueError):
    """The Dagster instance cannot be configured as asked (message says what to fix)."""


def postgres_storage(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """The ``storage:`` block for PostgreSQL, or None for the embedded SQLite default."""
    environ = os.environ if environ is None else environ
    url = settings.platform.dagster_pg_url or None
    parts = {field: var for field, var in PG_PART_ENVS.items() if environ.get(var)}
    if url and parts:
        raise InstanceConfigError(
            f"both {PG_URL_ENV} and {', '.join(parts.values())} are set: "
            "configure Dagster's PostgreSQL storage one way only"
        )
    if url:
        validate_pg_url(url)
        return {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    if not parts:
        return None
    missing = [PG_PART_ENVS[f] for f in PG_REQUIRED_PARTS if f not in parts]
    if missing:
        raise InstanceConfigError(
            f"PostgreSQL storage is half configured: set {', '.join(missing)} "
            f"(or {PG_URL_ENV} instead of the DAGSTER_PG_* variables)"
        )
    if "port" in parts and not environ[parts["port"]].isdigit():
        raise InstanceConfigError(
            f"{parts['port']}={environ[parts['port']]!r} is not a port number"
        )
    postgres_db: dict[str, Any] = {field: {"env": var} for field, var in parts.items()}
    postgres_db["scheme"] = PG_SCHEME
    return {"postgres": {"postgres_db": postgres_db}}


def validate_pg_url(url: str) -> None:
    """Fail now, with the reason, rather than after Dagster's connection retries."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InstanceConfigError(
            f"{PG_URL_ENV} is not a database URL (expected "
            "postgresql://user:password@host:5432/dbname)"
        ) from exc
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() != "postgresql":
        hint = " (write postgresql://, not postgres://)" if parsed.drivername == "postgres" else ""
        raise InstanceConfigError(f"{PG_URL_ENV}={shown} is not a PostgreSQL URL{hint}")
    # A Unix-socket URL names its directory in the query: postgresql://u@/db?host=/run/pg
    if not (parsed.host or parsed.query.get("host")) or not parsed.database:
        raise InstanceConfigError(f"{PG_URL_ENV}={shown} needs a host and a database name")
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        raise InstanceConfigError(
            f"{PG_URL_ENV}={shown}: its driver is not installed ({exc}); "
            f"use {PG_SCHEME}://, the driver dagster-postgres installs"
        ) from exc


def render_instance_config(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The repository's ``dagster.yaml``, plus the PostgreSQL storage block if configured."""
    if not PROJECT_DAGSTER_YAML.exists():
        raise InstanceConfigError(
            f"{PROJECT_DAGSTER_YAML} is missing: the recsys package is installed without "
            "its package data (dagster.yaml configures the instance); reinstall it"
        )
    template = PROJECT_DAGSTER_YAML.read_text()
    storage = postgres_storage(settings, environ)
    if storage is None:
        return template
    base = yaml.safe_load(template) or {}
    clash = [key for key in STORAGE_KEYS if key in base]
    if clash:
        raise InstanceConfigError(
            f"{PROJECT_DAGSTER_YAML} already configures {', '.join(clash)}: remove it, "
            "storage is chosen by RECSYS_DAGSTER_PG_URL / DAGSTER_PG_*"
        )
    source = PG_URL_ENV if "postgres_url" in storage["postgres"] else "the DAGSTER_PG_* variables"
    block = yaml.safe_dump({"storage": storage}, sort_keys=False)
    header = (
        f"# Added by recsys_assets.instance because {source} is set: values are read from\n"
        "# the environment of each Dagster process; none is stored in this file.\n"
    )
    return f"{template.rstrip()}\n\n{header}{block}"


def ensure_dagster_home(settings: Settings) -> Path:
    """Point ``DAGSTER_HOME`` at the project instance and install its ``dagster.yaml``.

    Also exports ``RECSYS_DAGSTER_PG_URL`` when the URL came from a ``Settings`` object
    rather than the environment, so this process and the ones it starts (``dagster
    dev``) resolve the storage block's reference.
    """
    explicit = os.environ.get("DAGSTER_HOME")
    home = Path(explicit).resolve() if explicit else settings.dagster_home
    text = render_instance_config(settings)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() or target.read_text() != text:
        _write_atomically(target, text)
    if settings.platform.dagster_pg_url:
        os.environ[PG_URL_ENV] = settings.platform.dagster_pg_url
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance(settings: Settings) -> dg.DagsterInstance:
    ensure_dagster_home(settings)
    return dg.DagsterInstance.get()


def storage_summary(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """Where runs are stored, for humans: never shows a password."""
    environ = os.environ if environ is None else environ
    storage = postgres_storage(settings, environ)
    if storage is None:
        home = environ.get("DAGSTER_HOME") or str(settings.dagster_home)
        return f"SQLite under {home}"
    if settings.platform.dagster_pg_url:
        from sqlalchemy.engine import make_url

        shown = make_url(settings.platform.dagster_pg_url).render_as_string(hide_password=True)
        return f"PostgreSQL {shown}"
    host, db = environ[PG_PART_ENVS["hostname"]], environ[PG_PART_ENVS["db_name"]]
    port = environ.get(PG_PART_ENVS["port"], "5432")
    return f"PostgreSQL {environ[PG_PART_ENVS['username']]}@{host}:{port}/{db}"


def _write_atomically(target: Path, text: str) -> None:
    # The webserver, the daemon and a CLI command may install the file at the same time:
    # a reader must see the old file or the new one, never half of it.
    with atomic_file(target) as handle:
        handle.write(text.encode())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recsys_assets.instance [COMMAND ...]``: install, then exec COMMAND.

    Without a command it prints where the instance is and where it stores runs.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    settings = Settings()
    try:
        home = ensure_dagster_home(settings)
        summary = storage_summary(settings)
    except InstanceConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args:
        print(f"Dagster instance: {home} ({summary})")
        return 0
    # The command inherits DAGSTER_HOME and the exported storage variables.
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        print(f"error: cannot run {args[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover  (execvp does not return)


if __name__ == "__main__":
    raise SystemExit(main())
