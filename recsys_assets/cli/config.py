"""``recsys config``: the effective configuration, and the reference page generated from it.

Every process reads the same ``RECSYS_*`` environment, so "what is this process
configured with?" is the first question when something behaves unexpectedly; the
answer must never print a secret. The reference page (``docs/configuration.md``) is
generated from the settings' declarations (``setting_fields``: the ``Settings`` groups
and the typed policies they nest), so it cannot drift from the code.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import summary

config_app = typer.Typer(
    help="The effective configuration (secrets hidden) and the reference of every setting.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")

# Values that must never be printed. Beyond these, any field whose name says it is a
# secret is hidden, and credentials are cut out of every URL-valued setting (a new
# setting must not leak because nobody added it to a list).
SECRET_FIELDS = frozenset({"smtp_password", "oci_password", "es_api_key", "api_keys"})
SECRET_NAME = re.compile(r"(password|passwd|secret|token|credential|api_key|_key$)")
# Webhook URLs carry their token in the path (Slack: /services/T../B../<secret>).
HOST_ONLY_FIELDS = frozenset({"alert_webhook_url"})
# scheme://anything: credentials (user:password@) and query strings are cut from these.
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


REFERENCE_HEADER = """\
# Configuration reference

Generated from `recsys_serving/settings.py` by `recsys config reference`; do not edit by
hand (a test keeps it in sync). Every process (collector, server, Dagster code location,
CLI) reads the same environment: each setting is the variable `RECSYS_<NAME>`. Values that
are lists or objects are JSON (`RECSYS_CANARY_RAMP='[0.1, 0.5, 1.0]'`). `recsys config
show` prints the values a process would use, with secrets hidden. The meaning ends with
where the value lives in code (`settings.<path>`); each default is declared once, there.

| variable | default | meaning |
| --- | --- | --- |
"""


def shown_value(name: str, value: Any) -> Any:
    """A value safe to print: secrets replaced, credentials cut out of every URL."""
    from recsys_serving.stores.docstore import redact_uri

    if value is None:
        return None
    if name in SECRET_FIELDS or SECRET_NAME.search(name):
        return "***"
    if name in HOST_ONLY_FIELDS and isinstance(value, str):
        scheme, _, rest = redact_uri(value).partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}/***"
    return _without_credentials(value)


def _without_credentials(value: Any) -> Any:
    """Every URL in a value (nested in lists and objects too) without user, password, query."""
    from recsys_serving.stores.docstore import redact_uri

    if isinstance(value, str):
        return redact_uri(value) if URL.match(value.strip()) else value
    if isinstance(value, list | tuple):
        return [_without_credentials(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_credentials(v) for k, v in value.items()}
    return value


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict | list | tuple):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def reference_markdown() -> str:
    """The configuration reference page, one row per ``RECSYS_*`` variable."""
    from recsys_serving.settings import setting_fields

    rows = []
    for field in setting_fields():
        meaning = field.description.replace("|", "\\|")
        where = ".".join(field.path)
        rows.append(f"| `{field.env}` | {_default(field.default)} | {meaning} (`{where}`) |")
    return REFERENCE_HEADER + "\n".join(rows) + "\n"


@config_app.command("show")
def show(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print every setting as this process resolves it (secrets hidden)."""
    from recsys_assets.cli.common import out
    from recsys_serving.settings import Settings, setting_fields

    settings = Settings()
    values = {
        field.env: shown_value(field.name, field.value(settings)) for field in setting_fields()
    }
    if as_json:
        out.print_json(json.dumps(values, default=str))
        return
    from rich.table import Table

    table = Table("variable", "value", box=None, pad_edge=False)
    for key, value in values.items():
        table.add_row(key, "unset" if value is None else str(value))
    out.print(table)
    summary(
        f"{len(values)} settings; home {settings.resolved_home}, "
        f"lake {_without_credentials(settings.resolved_lake_uri)}"
    )


@config_app.command("reference")
def reference() -> None:
    """Print the configuration reference (Markdown) that docs/configuration.md holds."""
    typer.echo(reference_markdown(), nl=False)
