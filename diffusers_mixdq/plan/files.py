"""A plan on disk: ``plan.json`` (JSON text) and its tensor sidecar, a safetensors file beside it (never pickle).

This module reads and writes; it does not validate (that is :mod:`.validation`, run once by ``BitPlan``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import PlanFormatError, PlanSourceError
from .limits import check_size, decode
from .spec import PLAN_FILENAME

#: the sidecar's name beside a plan that is serialised without a path (``to_dict``)
SIDECAR_FILENAME = Path(PLAN_FILENAME).with_suffix(".safetensors").name


def parse_json(text: str, source: str = "<string>") -> Any:
    """JSON text -> data; a :class:`PlanFormatError` naming the position of a syntax error (or saying the text
    is too large, too deeply nested, or holds a number too long to read)."""
    check_size(len(text), source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanFormatError(
            f"The plan {source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the file (a plan is a JSON object as described in docs/plan-format.md)."
        ) from None
    except RecursionError:
        raise PlanFormatError(f"The plan {source} is nested too deeply to read; a plan is a shallow JSON object "
                              "(see docs/plan-format.md).") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise PlanFormatError(f"The plan {source} cannot be read: {e}. Fix the file.") from None


def plan_file(source: str | os.PathLike) -> Path:
    """The plan file named by ``source``: a ``.json`` file, or a directory holding ``plan.json``."""
    path = Path(source)
    if path.is_dir():
        path = path / PLAN_FILENAME
    if not path.is_file():
        raise PlanSourceError(
            f"No plan file at '{source}'. Pass a plan .json file, a directory containing {PLAN_FILENAME}, "
            "a dict or a BitPlan."
        )
    return path


def read_plan_file(path: Path) -> Any:
    """The (unvalidated) data of the plan file at ``path``."""
    source = f"'{path}'"
    try:
        check_size(path.stat().st_size, source)
        raw = path.read_bytes()
    except OSError as e:
        raise PlanSourceError(f"Cannot read the plan file {source}: {e.strerror or e}.") from None
    return parse_json(decode(raw, source), source=source)


def read_sidecar(path: Path, data: Any) -> dict[str, torch.Tensor]:
    """The tensors of the sidecar that the plan data read from ``path`` names (none: empty)."""
    name = data.get("tensors") if isinstance(data, Mapping) else None
    return load_tensors(path.parent / name) if name else {}


def write_plan_file(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write plan data to ``path`` (a ``.json`` file, or a directory that receives ``plan.json``), and
    ``tensors`` to the sidecar beside it (named after the JSON file). Returns the JSON file's path."""
    path = Path(path)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / PLAN_FILENAME
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data)
    if tensors:
        data["tensors"] = path.with_suffix(".safetensors").name
        save_tensors(dict(tensors), path.parent / data["tensors"])
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PlanFormatError(
            f"The plan names a tensor sidecar '{path.name}', but there is no such file beside it ({path}). "
            "Copy the .safetensors file together with plan.json."
        )
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise PlanFormatError(f"The plan's tensor sidecar {path} is not a valid safetensors file: {e}") from None
