"""The typer app every command group registers on, its console, and how a command reports a user error.

Command modules import only this module at import time (never each other); torch, diffusers and the rest of the
package are imported inside the commands, so ``mixdq --help`` stays quick.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Iterator, NoReturn, Sequence

import typer
from rich.console import Console
from rich.table import Table

from ..errors import MixDQError

app = typer.Typer(
    help="Mixed-precision (MixDQ) quantization plans for diffusers models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# wide enough for the evaluation tables even when the output is not a terminal
console = Console(width=max(140, shutil.get_terminal_size((140, 24)).columns))


@app.callback()
def _root() -> None:
    """Mixed-precision (MixDQ) quantization plans for diffusers models."""


def fail(error: Exception) -> NoReturn:
    """Report a user-facing error and exit with status 2 (no traceback)."""
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Run a command's body: a :class:`MixDQError` raised in it is reported by :func:`fail`."""
    try:
        yield
    except MixDQError as e:
        fail(e)


def summary_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column table (what, value) without a header, e.g. a plan summary."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    return table

