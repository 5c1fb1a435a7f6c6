"""``recsys keys create|revoke|list``: API keys for the service (hashed in RECSYS_HOME)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import console, fail, out

keys_app = typer.Typer(
    help="API keys: create (shown once), revoke, list. Stored hashed in $RECSYS_HOME/keys.json.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _key_file():
    from recsys_serving.keys import KeyFile
    from recsys_serving.settings import Settings

    return KeyFile.in_home(Settings().resolved_home)


@keys_app.command("create")
def create(
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: recommend, events, admin.")
    ] = "recommend",
    rps: Annotated[
        float | None, typer.Option(help="Requests/second (default RECSYS_RATE_LIMIT_RPS).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(help="Bucket size (default RECSYS_RATE_LIMIT_BURST).")
    ] = None,
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
) -> None:
    """Create a key and print it once on stdout (only its hash is stored)."""
    from recsys_serving.keys import KeyStoreError

    key_file = _key_file()
    try:
        key, secret = key_file.create(scopes.split(","), rps=rps, burst=burst, name=name)
    except (KeyStoreError, OSError) as exc:
        fail(str(exc))
    console.print(
        f"created key [bold]{key.key_id}[/] scopes={','.join(sorted(key.scopes))} "
        f"rps={key.rps if key.rps is not None else 'default'} "
        f"burst={key.burst if key.burst is not None else 'default'} in {key_file.path}; "
        "it is shown once, store it now:"
    )
    out.print(secret, highlight=False)


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key id (k_...), not the key.")]) -> None:
    """Revoke a key; running servers stop accepting it within a second."""
    from recsys_serving.keys import KeyStoreError

    try:
        key = _key_file().revoke(key_id)
    except (KeyStoreError, OSError) as exc:
        fail(str(exc))
    out.print(f"revoked {key.key_id} at {key.revoked_at}", highlight=False)


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Key ids, scopes, limits and state (never the keys themselves)."""
    from recsys_serving.keys import KeyStoreError

    try:
        keys = _key_file().list()
    except (KeyStoreError, OSError) as exc:
        fail(str(exc))
    if as_json:
        out.print(json.dumps([k.as_dict() for k in keys], indent=2), highlight=False)
        return
    if not keys:
        out.print("no keys; create one with `recsys keys create --scopes recommend`")
        return
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        out.print(
            f"{k.key_id}  {','.join(sorted(k.scopes)):<24} "
            f"rps={k.rps if k.rps is not None else 'default':<8} "
            f"burst={k.burst if k.burst is not None else 'default':<8} "
            f"{state:<28} {k.name}",
            highlight=False,
        )
