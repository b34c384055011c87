"""Where plans come from: the one place that turns "something the user passed" into a :class:`BitPlan`.

Today: a BitPlan, a dict, JSON text, a local ``.json`` file or a directory holding ``plan.json``. Other sources
(Hub repo ids) register a resolver here with :func:`register_source`, so ``MixDQConfig`` and the CLI need not change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import PlanSourceError
from .bitplan import BitPlan
from .spec import PLAN_FILENAME

#: resolvers tried in order for string sources that are not local paths: (source, options) -> BitPlan | None
_RESOLVERS: list[Callable[[str, Mapping[str, Any]], BitPlan | None]] = []


def register_source(resolver: Callable[[str, Mapping[str, Any]], BitPlan | None]) -> None:
    """Add a resolver for string plan sources that are not local files (idempotent)."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def resolve_plan_source(source: Any, **options: Any) -> BitPlan:
    """A :class:`BitPlan` from whatever the user passed as ``plan=``.

    ``options`` (e.g. ``revision``, ``subfolder``, ``token``) are passed to non-local resolvers.
    """
    if source is None:
        raise PlanSourceError(
            "No plan given. Pass plan=<BitPlan | dict | path to plan.json | directory> to MixDQConfig."
        )
    if isinstance(source, (BitPlan, Mapping)):
        return BitPlan.load(source)
    if isinstance(source, (str, os.PathLike)):
        return _from_text(os.fspath(source), options)
    raise PlanSourceError(
        f"plan= must be a BitPlan, a dict, a path or a string, got {type(source).__name__}."
    )


def _from_text(text: str, options: Mapping[str, Any]) -> BitPlan:
    """JSON text, a local path (under ``options["subfolder"]``), or whatever a registered resolver recognises."""
    if text.lstrip().startswith("{"):
        return BitPlan.load(text)
    subfolder = options.get("subfolder")
    path = Path(text) / subfolder if subfolder else Path(text)
    if not subfolder and path.is_dir() and not (path / PLAN_FILENAME).is_file():
        path = _only_component(path)
    if path.exists():
        return BitPlan.load(path)
    if looks_local(text):
        raise PlanSourceError(
            f"No plan found at '{path}': there is no such local file or directory"
            + (f" ('{path.parent}' exists; it holds {_listing(path.parent)})" if path.parent.is_dir() else "")
            + ". Check the path (a Hub plan is named 'owner/name', without a leading './' or a '.json' suffix)."
        )
    for resolver in _RESOLVERS:
        plan = resolver(text, options)
        if plan is not None:
            return plan
    raise PlanSourceError(
        f"No plan found at '{text}': there is no such local file or directory"
        + (" and no other plan source recognised it." if _RESOLVERS else ".")
        + " Pass a path to a plan .json file, a directory containing plan.json, a dict or a BitPlan."
    )


def looks_local(text: str) -> bool:
    """Whether ``text`` can only mean a local path: it starts with ``.``, ``/``, ``~`` or a drive, holds a
    backslash or more than one ``/``, ends in ``.json``, or its first component is an existing local directory
    (``plans/w8a8`` in a folder that has ``plans/``). Hub repo ids are ``owner/name`` and never look like that, so
    a missing local path is reported at once instead of being looked up on the Hub."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.lower().endswith(".json"):
        return True
    if len(text) > 1 and text[1] == ":" or Path(text).is_absolute():
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).is_dir()


def _listing(folder: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return "entries that cannot be listed"
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _only_component(directory: Path) -> Path:
    """A plan directory in the Hub layout (``unet/plan.json``, what ``mixdq build --out`` writes) without a root
    plan: its only component folder; several are an error naming them; none leaves ``directory`` to the loader."""
    found = sorted(p.name for p in directory.iterdir() if (p / PLAN_FILENAME).is_file())
    if len(found) > 1:
        raise PlanSourceError(
            f"'{directory}' holds plans for several components ({', '.join(found)}): pass subfolder= one of them."
        )
    return directory / found[0] if found else directory
