"""Sensitivities measured elsewhere, given to a build instead of measuring them again.

Two layouts are read (``BuildSettings.sensitivity_files`` / a recipe's ``sensitivity_files:``, each entry
``{path, widths, prefix}``):

* the MixDQ authors' logs: YAML ``{model.<layer>: [score at widths[0], score at widths[1], ...]}`` (SSIM for the
  content layers, SQNR in dB for the others: the same metrics the measure stage uses), ``widths`` by default
  ``[2, 4, 8]``;
* a score cache of an earlier build (``sensitivity-<key>.json``): ``{"<layer>|<width>": score}``.

Their scores fill the build's score cache before the sweep, so the layers and widths they cover are not measured
(whatever they do not cover still is) and the allocation, the ``k`` sweep and the provenance run on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import MixDQError
from .scores import ScoreCache, score_key


def _load(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise MixDQError(f"No sensitivity file at '{path}' (sensitivity_files): check the path.")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise MixDQError(f"The sensitivity file '{path}' cannot be read: {e}") from None


def read_scores(entry: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """``{(layer, width): score}`` of one ``sensitivity_files`` entry (either layout, see the module docstring)."""
    path, widths, prefix = Path(entry["path"]), list(entry.get("widths", (2, 4, 8))), entry.get("prefix", "model.")
    data = _load(path)
    if not isinstance(data, dict):
        raise MixDQError(f"The sensitivity file '{path}' must map layer names to scores.")
    out: dict[tuple[str, int], float] = {}
    for key, value in data.items():
        if isinstance(value, list):
            if len(value) != len(widths) or not all(isinstance(v, (int, float)) for v in value):
                raise MixDQError(f"'{path}': '{key}' has {value!r}; expected one number per width {widths}.")
            name = key[len(prefix):] if prefix and key.startswith(prefix) else key
            out.update({(name, w): float(v) for w, v in zip(widths, value)})
        elif isinstance(value, (int, float)) and isinstance(key, str) and "|" in key and key.split("|")[1].isdigit():
            name, width = key.split("|")
            out[(name, int(width))] = float(value)
        else:
            raise MixDQError(f"'{path}': cannot read the entry '{key}' (a MixDQ log maps a layer to a list of "
                             "scores; a score cache maps 'layer|width' to a number).")
    return out


def seed_cache(cache: ScoreCache, entries: Iterable[Mapping[str, Any]], layers: Iterable[str]) -> int:
    """Put every entry's weight scores into ``cache``; layers the model does not have are an error. Returns how many
    scores were given."""
    known, given = set(layers), 0
    for entry in entries:
        scores = read_scores(entry)
        unknown = sorted({name for name, _ in scores} - known)
        if unknown:
            raise MixDQError(
                f"The sensitivity file '{entry['path']}' names {len(unknown)} layer(s) this model's candidates do not "
                f"have, e.g. {unknown[:3]}: is it for this model (and is 'prefix' right)?"
            )
        for (name, width), score in scores.items():
            cache.scores[score_key(name, width)] = score
        given += len(scores)
    return given


def file_records(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What provenance (and the sweep's cache key) records of the files: name, widths and sha256."""
    return [{"file": Path(e["path"]).name, "widths": list(e.get("widths", (2, 4, 8))),
             "sha256": hashlib.sha256(Path(e["path"]).read_bytes()).hexdigest()} for e in entries]
