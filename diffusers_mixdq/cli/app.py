"""The typer app every command group registers on, its console, and how a command reports a user error.

Command modules import only this module at import time (never each other); torch, diffusers and the rest of the
package are imported inside the commands, so ``mixdq --help`` stays quick.
"""

from __future__ import annotations

import logging
import os
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



#: ``--threads`` of the commands that run a model (``mixdq build``, ``mixdq eval``)
THREADS_HELP = (
    "CPU threads for torch in this process. Default: $OMP_NUM_THREADS when set, else the CPU cores this process may "
    "use divided by the processes on this machine (accelerate / torchrun's LOCAL_WORLD_SIZE). Two runs at once on "
    "one machine: give each --threads CORES/2, or they slow each other down many times over."
)


def default_threads() -> tuple[int, str]:
    """The thread count a run should use here and why: ``$OMP_NUM_THREADS`` when set, else the usable cores
    divided by the local processes of a distributed launch (at least 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    why = f"{cores} usable cores" + (f" / {processes} local processes" if processes > 1 else "")
    return max(1, cores // processes), why


def configure_threads(threads: int | None) -> int:
    """Set torch's CPU threads for this run (``threads``, else :func:`default_threads`), and ``OMP_NUM_THREADS`` for
    the processes it starts when it is not set; says what it chose. Returns the count."""
    import torch

    count, why = (threads, "--threads") if threads is not None else default_threads()
    torch.set_num_threads(count)
    os.environ.setdefault("OMP_NUM_THREADS", str(count))
    console.print(f"[dim]torch CPU threads: {count} ({why}; change with --threads)[/dim]")
    return count


#: log messages of other libraries a ``mixdq`` user cannot act on: transformers announcing, when diffusers looks up a
#: pipeline's image-processor class, that it falls back to the PIL backend without torchvision (the commands never
#: use an image processor)
UNACTIONABLE = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",)}


class _Unactionable(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_unactionable_warnings() -> None:
    """Filter the :data:`UNACTIONABLE` messages out for this process (the command line only: a library does not
    silence other libraries for its callers). Idempotent."""
    for name, fragments in UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Unactionable) for f in logger.filters):
            logger.addFilter(_Unactionable(fragments))


def prepare_run(threads: int | None) -> int:
    """What a command that runs a model does first: thread count (:func:`configure_threads`) and no warnings the
    user cannot act on (:func:`quiet_unactionable_warnings`). Returns the thread count."""
    quiet_unactionable_warnings()
    return configure_threads(threads)
