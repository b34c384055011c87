"""Which plan a command-line argument names: a file, a directory holding ``plan.json``, a plan directory in the
Hub layout (``unet/plan.json``, ``transformer/plan.json``: what ``mixdq build --out`` writes), or a Hub repo id.

``--subfolder`` picks the component folder; without it, a directory with no ``plan.json`` of its own but exactly
one component plan uses that one, and one with several names them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MixDQError

PLAN_FILENAME = "plan.json"


def component_plans(directory: Path) -> list[str]:
    """The folders directly under ``directory`` that hold a ``plan.json``, sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / PLAN_FILENAME).is_file())


def local_plan_path(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """The plan file or directory ``path`` (a local path) names, and the component folder auto-detected (if any)."""
    if subfolder:
        target = path / subfolder.strip("/")
        if not (target / PLAN_FILENAME).is_file() and not target.is_file():
            found = component_plans(path) if path.is_dir() else []
            raise MixDQError(
                f"'{path}' has no {subfolder}/{PLAN_FILENAME}"
                + (f"; it has plans in: {', '.join(found)}." if found else ".")
            )
        return target, None
    if not path.is_dir() or (path / PLAN_FILENAME).is_file():
        return path, None
    found = component_plans(path)
    if len(found) == 1:
        return path / found[0], found[0]
    if found:
        raise MixDQError(
            f"'{path}' holds plans for several components ({', '.join(found)}): pick one with --subfolder, "
            f"e.g. --subfolder {found[0]}."
        )
    return path, None


def load_plan_argument(source: str, subfolder: str | None = None):
    """The :class:`~diffusers_mixdq.BitPlan` a command-line plan argument names, and the component folder that was
    auto-detected (``None`` when none was). Strings that are not local paths go to the registered plan sources (the
    Hub), with ``subfolder``."""
    from ..plan import resolve_plan_source

    path = Path(source)
    if path.exists():
        target, detected = local_plan_path(path, subfolder)
        return resolve_plan_source(str(target)), detected
    return resolve_plan_source(source, subfolder=subfolder), None
