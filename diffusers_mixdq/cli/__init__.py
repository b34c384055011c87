"""The ``mixdq`` command line: one typer app (:mod:`.app`), one module per command group.

* :mod:`.plans`: ``mixdq inspect``
* :mod:`.evaluation`: ``mixdq eval`` and ``mixdq demo``
* :mod:`.building`: ``mixdq build``
* :mod:`.sharing`: ``mixdq push``
* :mod:`.interop`: ``mixdq import mixdq`` and ``mixdq export mixdq``
* :mod:`.bos_state`: ``mixdq attach-bos``

A new command group is a module that decorates its commands with ``@app.command()`` (importing only
:mod:`.app` at import time, the rest inside the commands) and is imported below.
"""

from __future__ import annotations

from . import plans, evaluation, building, sharing, interop, bos_state  # noqa: F401,I001  (register the commands, in --help order)
from .app import app, console, fail
from .skeleton import load_model_skeleton


def main() -> None:
    """Entry point of the ``mixdq`` console script."""
    app()


__all__ = ["app", "console", "fail", "load_model_skeleton", "main"]
