"""Helpers shared by CLI commands: settings, console, progress bars, fatal errors."""

from __future__ import annotations

import re
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

# Soft wrap: a `file:line: reason` message must stay one line for grep and scripts.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


# C0 and C1 control characters (ESC, CSI, BEL, CR, NL, ...). Printed raw, a stored string
# (an admin's reason, an error naming client data) can move the cursor, rewrite earlier
# lines, retitle the terminal or hide text; rich strips only a few of them.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """Text safe for a terminal: every control character shown as its escape (``\\x1b``)."""
    return CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], str(text))


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(printable(message))}")
    raise typer.Exit(code)


def progress(bytes_mode: bool = False) -> Progress:
    columns = [SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn()]
    columns += [TransferSpeedColumn()] if bytes_mode else [MofNCompleteColumn()]
    columns += [TimeElapsedColumn()]
    return Progress(*columns, console=console, transient=False)


def summary(message: str) -> None:
    """The one-line summary every long command ends with (on stdout, for scripts)."""
    out.print(message, highlight=False, soft_wrap=True)
