"""``recsys models``: inspect the model registry and move its aliases by hand.

Manual moves go through the same registry calls as the closed loop, so they land in the
same audit trail (reason ``manual: ...``) and send the same kind of alert: an operator's
promotion or rollback is never invisible to the people on duty.
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from recsys_assets.cli import app
from recsys_assets.cli.common import (
    CONTROL_CHARS,
    console,
    fail,
    out,
    printable,
    progress,
    summary,
)

if TYPE_CHECKING:
    from recsys_serving.registry import ModelRegistry
    from recsys_serving.settings import Settings

models_app = typer.Typer(
    name="models",
    help="List, inspect, register, promote and roll back models in the registry.",
    no_args_is_help=True,
)
app.add_typer(models_app)


class AliasChoice(StrEnum):
    candidate = "candidate"
    production = "production"


def _settings() -> Settings:
    from recsys_serving.settings import Settings

    return Settings()


def _registry(settings: Settings) -> ModelRegistry:
    from recsys_serving.lake import open_lake
    from recsys_serving.registry import ModelRegistry

    try:
        lake = open_lake(
            settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
        )
    except ValueError as exc:
        fail(f"RECSYS_LAKE_URI: {exc}")
    return ModelRegistry(lake)


def _refusals() -> tuple[type[BaseException], ...]:
    """Errors that are the operator's or the registry's state, reported in one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    from recsys_serving.model.bundle import BundleError
    from recsys_serving.registry import RegistryError

    return (RegistryError, BundleError, OSError, BotoCoreError, ClientError)


def _manual(reason: str | None, default: str) -> str:
    if reason is not None and CONTROL_CHARS.search(reason):
        # The history is read in terminals: refuse what could rewrite them.
        raise typer.BadParameter(
            f"control characters are not allowed ({printable(reason)[:80]})", param_hint="--reason"
        )
    text = (reason or default).strip()
    return text if text.startswith("manual:") else f"manual: {text}"


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return {"by": user, "host": socket.gethostname(), "via": "recsys models"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _submit_move(settings: Settings, move: dict[str, Any]) -> dict[str, Any]:
    """Run ``model_alias_job`` for ``move`` in the project's instance and follow it.

    The move, its alert and its record are that run's work (a run in the Dagster UI
    with its logs, like the closed loop's own steps); returns the ``production_model``
    metadata the run recorded. A refused move fails the run: its one line is printed.
    """
    from recsys_assets.instance import get_instance
    from recsys_assets.runs import CLI_RUN_CONFIG, execute_run

    instance = get_instance(settings)
    tags = {"recsys/trigger": "cli", "recsys/move": str(move["action"])}
    if move.get("version"):
        tags["recsys/model_version"] = str(move["version"])
    with console.status(f"running model_alias_job ({move['action']})"):
        outcome = execute_run(
            "model_alias_job",
            instance,
            tags=tags,
            run_config={**CLI_RUN_CONFIG, "ops": {"move_model_alias": {"config": move}}},
        )
    if not outcome.success:
        fail(outcome.error or outcome.failure or f"run {outcome.run_id[:8]} failed")
    recorded = outcome.materialized["production_model"]
    if recorded.get("undelivered"):
        console.print(
            f"[yellow]warning:[/] alert not delivered ({escape(recorded['undelivered'])})"
        )
    return recorded


@dataclass(frozen=True)
class Moved:
    """The alias move a ``model_alias_job`` run made, as its materialization records it."""

    alias: str
    action: str  # "set" or "clear"
    version: str | None
    previous: str | None
    share: float | None

    @classmethod
    def from_metadata(cls, recorded: dict[str, Any]) -> Moved:
        return cls(
            alias=str(recorded["alias"]),
            action=str(recorded["alias_action"]),
            version=recorded.get("model_version") or None,
            previous=recorded.get("previous") or None,
            share=recorded.get("share"),
        )


def _aliases_by_version(reg: ModelRegistry) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, state in reg.aliases().items():
        label = name if state.share >= 1.0 else f"{name} {state.share:.0%}"
        found.setdefault(state.version, []).append(label)
    return found


@models_app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Registered versions, oldest first, with the primary metric and their aliases."""
    settings = _settings()
    reg = _registry(settings)
    metric = settings.promotion.metric
    try:
        versions = reg.versions()
        aliases = _aliases_by_version(reg)
    except _refusals() as exc:
        fail(str(exc))
    rows = [
        {
            "version": mv.version,
            "created_at": mv.created_at.isoformat() if mv.created_at else None,
            metric: mv.metrics.get(metric),
            "aliases": aliases.get(mv.version, []),
            "tags": mv.tags,
        }
        for mv in versions
    ]
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"models in {reg.lake.uri}", title_justify="left", box=box.SIMPLE)
    table.add_column("version", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column(metric, justify="right", no_wrap=True)
    table.add_column("aliases", no_wrap=True)
    table.add_column("tags")
    for mv, row in zip(versions, rows, strict=True):
        created = mv.created_at.strftime("%Y-%m-%d %H:%M") if mv.created_at else "-"
        table.add_row(
            mv.version,
            created,
            _fmt(row[metric]),
            escape(", ".join(row["aliases"])) or "-",
            escape(", ".join(f"{k}={v}" for k, v in mv.tags.items())) or "-",
        )
    out.print(table)
    summary(f"{len(rows)} model version(s); production: {_alias_text(reg, 'production')}")


def _alias_text(reg: ModelRegistry, name: str) -> str:
    state = reg.alias(name)
    return state.version if state else "none"


@models_app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="A version, or an alias (production, ...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """A version's manifest summary, metrics and files."""
    from recsys_serving.model.bundle import is_version

    settings = _settings()
    reg = _registry(settings)
    try:
        if not is_version(version) and (state := reg.alias(version)) is not None:
            version = state.version
        mv = reg.get(version)
        aliases = _aliases_by_version(reg).get(version, [])
    except _refusals() as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(mv.manifest, default=str))
        return
    m = mv.manifest
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for label, value in [
        ("version", mv.version),
        ("aliases", ", ".join(aliases) or "-"),
        ("created", m.get("created_at")),
        ("registered", mv.registered_at.isoformat() if mv.registered_at else None),
        ("code", m.get("code_sha")),
        ("format", m.get("format")),
        ("seed", m.get("seed")),
        ("index", m.get("index_version")),
        ("features", len(m.get("feature_names") or []) or None),
        ("data", m.get("data")),
        ("params", m.get("params")),
        ("tags", ", ".join(f"{k}={v}" for k, v in mv.tags.items()) or None),
        ("location", reg.uri(mv.version)),
    ]:
        head.add_row(label, escape(_fmt(value)))
    out.print(head)
    _print_evaluation(reg, mv.version, mv.tags)
    if mv.metrics:
        metrics = Table(title="metrics", title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for name, value in sorted(mv.metrics.items()):
            metrics.add_row(escape(name), escape(_fmt(value)))
        out.print(metrics)
    files = Table(title="files", title_justify="left")
    files.add_column("path")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, entry in sorted(mv.files.items()):
        files.add_row(escape(name), _size(int(entry["size"])), entry["sha256"][:16])
    out.print(files)
    summary(f"{mv.version}: {len(mv.files)} file(s), {_size(mv.size)}")


def _print_evaluation(reg: ModelRegistry, version: str, tags: dict[str, str]) -> None:
    """What model_evaluation said about this version (its registration tags) and, when it
    is production, whether it serves its own answers or popularity (the first-model rule)."""
    from recsys_serving.layout import PRODUCTION
    from recsys_serving.registry import serves_popularity

    table = Table(title="evaluation at registration (NDCG@10)", title_justify="left")
    table.add_column("holdout")
    table.add_column("this model", justify="right")
    table.add_column("popularity", justify="right")
    rows = 0
    for holdout, label in (("holdout", "time holdout"), ("per_user", "per-user holdout")):
        ours = tags.get(f"{holdout}_challenger_ndcg@10")
        base = tags.get(f"{holdout}_popularity_ndcg@10")
        if ours is not None or base is not None:
            table.add_row(label, ours or "-", base or "-")
            rows += 1
    if rows:
        out.print(table)
    production = reg.alias(PRODUCTION)
    if production is None or production.version != version:
        return
    rule = production.evidence.get("first_model_rule") or {}
    if serves_popularity(production):
        note = rule.get("warning") or rule.get("reason") or production.reason
        out.print(
            "[bold yellow]answers: popularity[/] (first-model rule: this model did not beat "
            f"popularity; {escape(str(note))})"
        )
    else:
        out.print(f"answers: this model ({escape(str(rule.get('reason') or production.reason))})")


@models_app.command("register")
def register(
    bundle: Annotated[
        Path, typer.Argument(help="A bundle directory (manifest.json inside).", exists=True)
    ],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable.")] = None,
) -> None:
    """Verify a bundle built elsewhere and upload it to the registry (no alias moves)."""
    from recsys_serving.model.bundle import read_manifest

    tags: dict[str, str] = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--tag {item!r}: expected key=value")
        tags[key.strip()] = value.strip()
    settings = _settings()
    reg = _registry(settings)
    try:
        manifest = read_manifest(bundle)
        total = sum(int(f["size"]) for f in manifest["files"].values())
        with progress(bytes_mode=True) as bar:
            task = bar.add_task(f"uploading {manifest['version']}", total=total)
            mv = reg.register(
                bundle, tags=tags, on_file=lambda _name, size: bar.advance(task, size)
            )
    except _refusals() as exc:
        fail(str(exc))
    _mirror(settings, reg)
    summary(
        f"registered {mv.version}: {len(mv.files)} file(s), {_size(mv.size)} "
        f"in {reg.uri(mv.version)}"
    )


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="The version to promote.")],
    candidate: Annotated[
        bool, typer.Option("--candidate", help="Phase it in as the candidate instead.")
    ] = False,
    share: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Share of users for --candidate (default: first ramp step)."
        ),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why; recorded as 'manual: ...'.")] = None,
) -> None:
    """Make VERSION the production model (or, with --candidate, phase it in).

    The move is a ``model_alias_job`` run in the project's Dagster instance."""
    from recsys_serving.layout import PRODUCTION

    if share is not None and not candidate:
        fail("--share only applies with --candidate (production always serves everyone)")
    settings = _settings()
    reg = _registry(settings)
    if candidate:
        share = share if share is not None else settings.closed_loop.canary.ramp[0]
        why = _manual(reason, f"phase in {version} to {share:.0%} of users")
        move = {"action": "candidate", "version": version, "share": share}
    else:
        why = _manual(reason, f"promote {version} to production")
        move = {"action": "promote", "version": version}
    recorded = _submit_move(settings, {**move, "reason": why, "evidence": _who()})
    event = Moved.from_metadata(recorded)
    _mirror(settings, reg)
    _publish_hint(settings, event)
    share_text = f" at {event.share:.0%}" if event.alias != PRODUCTION else ""
    summary(f"{event.alias}: {event.previous or 'none'} -> {event.version}{share_text} ({why})")


@models_app.command("rollback")
def rollback(
    alias: Annotated[
        AliasChoice | None,
        typer.Option(help="What to roll back; default: the candidate if one is set."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why; recorded as 'manual: ...'.")] = None,
) -> None:
    """Stop a candidate's phase-in, or move production back to its previous version
    (a ``model_alias_job`` run in the project's Dagster instance)."""
    settings = _settings()
    reg = _registry(settings)
    why = _manual(reason, "rolled back with recsys models rollback")
    move = {"action": "rollback", "alias": alias.value if alias else "", "reason": why}
    event = Moved.from_metadata(_submit_move(settings, {**move, "evidence": _who()}))
    if event.action == "clear":
        text = f"candidate: {event.previous} -> none ({why})"
    else:
        text = f"production: {event.previous} -> {event.version} ({why})"
    _mirror(settings, reg)
    _publish_hint(settings, event)
    summary(text)


def _mirror(settings: Settings, reg: ModelRegistry) -> None:
    """Mirror the move into MLflow; a failure is a warning, never an undone move."""
    from recsys_assets.tracking.mirror import mirror_for, mirror_registry

    mirror = mirror_for(settings)
    if mirror is None:
        return
    with console.status("mirroring the registry into MLflow"):
        outcome = mirror_registry(mirror, reg)
    if outcome["mlflow"] == "ok":
        console.print(f"MLflow: {outcome['report'].summary()}")
    else:
        console.print(
            f"[yellow]warning:[/] MLflow not updated ({escape(outcome['error'])}); the move "
            "stands, `recsys models sync-mlflow` or the next move catches it up"
        )


@models_app.command("sync-mlflow")
def sync_mlflow(
    moves: Annotated[
        int, typer.Option(min=1, help="Most alias moves per alias to catch up.")
    ] = 1000,
) -> None:
    """Mirror the registry into MLflow: a model version (and a run) per registered version,
    the aliases where the lake says, every alias move as a tag. Idempotent: run it after
    MLflow was unreachable, or to fill a new tracking server."""
    from recsys_assets.tracking.mirror import (
        browse_hint,
        mirror_for,
        mirror_registry,
        mirror_status,
    )

    settings = _settings()
    reg = _registry(settings)
    mirror = mirror_for(settings)
    if mirror is None:
        fail("RECSYS_MLFLOW_TRACKING_URI=off: there is no MLflow to sync")
    behind = mirror_status(reg.lake)
    if behind is not None:
        console.print(f"last mirror failure ({behind['at']}, {behind['what']}): {behind['error']}")
    with console.status(f"syncing the registry into {mirror.tracking_uri}"):
        outcome = mirror_registry(mirror, reg, moves=moves, max_versions=None)
    if outcome["mlflow"] != "ok":
        fail(f"MLflow sync failed: {outcome['error']}")
    report = outcome["report"]
    summary(
        f"MLflow in sync: {len(report.mlflow_versions)} version(s); {report.summary()}; "
        f"browse: {browse_hint(mirror.tracking_uri)}"
    )


def _publish_hint(settings: Settings, event: Moved) -> None:
    """Say what follows a move of production, so nobody launches publish_job twice."""
    from recsys_serving.layout import PRODUCTION

    if event.alias != PRODUCTION or event.version is None:
        return
    if settings.packaging.publish_on_promotion:
        console.print(
            f"promotion_sensor publishes {event.version} as an OCI artifact (publish_job) at "
            "its next tick; the Dagster daemon must be running"
        )
    else:
        console.print(
            "RECSYS_PUBLISH_ON_PROMOTION=false: launch publish_job to publish it as an OCI artifact"
        )


@models_app.command("history")
def history(
    limit: Annotated[int, typer.Option(min=1, help="Most recent moves to show.")] = 20,
    alias: Annotated[AliasChoice | None, typer.Option(help="Only this alias.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Alias moves, newest first, with their reasons (the audit trail)."""
    settings = _settings()
    reg = _registry(settings)
    try:
        events = reg.history(limit=limit, alias=alias.value if alias else None)
    except _refusals() as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps([e.as_dict() for e in events], default=str))
        return
    # Two lines per move instead of a table: reasons are long and must stay readable
    # in an 80-column terminal.
    for e in events:
        at = e.at.strftime("%Y-%m-%d %H:%M:%S")
        # Everything stored is shown through printable(): an escape sequence in a reason
        # (any API key with the admin scope could write one) must not reach the terminal.
        alias_name, version = escape(printable(e.alias)), escape(printable(e.version))
        previous = escape(printable(e.previous or "none"))
        if e.version is None:
            what = f"[bold]{alias_name}[/] cleared (was {previous})"
        else:
            share = f" ({e.share:.0%})" if e.share is not None and e.share < 1.0 else ""
            what = f"[bold]{alias_name}[/] -> {version}{share}, was {previous}"
        out.print(f"{at}  {what}", highlight=False)
        out.print(f"    {escape(printable(e.reason))}", highlight=False)
    summary(f"{len(events)} alias move(s) shown")
