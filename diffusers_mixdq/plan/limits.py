"""Bounds on plan input, checked before anything else reads it: file size, nesting depth, JSON value types, and the
number of layer-name patterns and layers. Each broken bound is one :class:`PlanFormatError` that names where.

Plans are small (a resolved plan of a 2,000-layer model is about 0.5 MB), so the bounds are far above any real plan
and far below what would make loading slow: every accepted plan validates and resolves in well under a second.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import PlanFormatError

#: largest plan.json read (bytes)
MAX_PLAN_BYTES = 16 * 2**20
#: deepest nesting of JSON objects / arrays in a plan
MAX_DEPTH = 32
#: most layer-name patterns (rule targets and ignore entries together) in one plan
MAX_PATTERNS = 10_000
#: most entries in ``layers`` (and in ``target.layers``): real denoisers have a few thousand quantizable layers
MAX_LAYERS = 20_000
#: largest static ``act_range`` (absolute max of a layer input; real ones are below 1e4)
MAX_ACT_RANGE = 1e6


def check_size(size: int, source: str) -> None:
    if size > MAX_PLAN_BYTES:
        raise PlanFormatError(
            f"The plan {source} is {size / 2**20:.1f} MiB; plan files are limited to {MAX_PLAN_BYTES // 2**20} MiB "
            "(a resolved plan of a large model is under 1 MiB). Is this the right file?"
        )


def decode(raw: bytes, source: str) -> str:
    """The UTF-8 text of a plan file's bytes (size-checked); a clear error for other encodings."""
    check_size(len(raw), source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanFormatError(
            f"The plan {source} is not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}). Plans are JSON "
            "files in UTF-8; re-save it as UTF-8 (or check that it is a plan file at all)."
        ) from None


def plain_json(value: Any, where: str = "the plan") -> Any:
    """A copy of ``value`` made only of JSON values (dicts with string keys, lists, strings, finite numbers,
    booleans, None; tuples become lists), at most :data:`MAX_DEPTH` deep. Raises :class:`PlanFormatError` naming
    the first offending path. Iterative, so no input can exhaust the stack."""
    root: list[Any] = [None]
    stack: list[tuple[Any, list | dict, Any, str, int]] = [(value, root, 0, where, 0)]
    while stack:
        item, parent, key, path, depth = stack.pop()
        if isinstance(item, Mapping):
            _check_depth(depth, path)
            bad = next((k for k in item if not isinstance(k, str)), None)
            if bad is not None:
                raise PlanFormatError(f"{path} has the key {bad!r} of type {type(bad).__name__}; JSON object keys "
                                      "are strings.")
            copy: Any = dict.fromkeys(item)  # keys in their order now; the values are filled in as they are popped
            stack.extend((v, copy, k, f"{path}/{k}", depth + 1) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            _check_depth(depth, path)
            copy = [None] * len(item)
            stack.extend((v, copy, i, f"{path}/{i}", depth + 1) for i, v in enumerate(item))
        else:
            copy = _scalar(item, path)
        parent[key] = copy
    return root[0]


def _check_depth(depth: int, path: str) -> None:
    if depth >= MAX_DEPTH:
        raise PlanFormatError(f"{path} is nested more than {MAX_DEPTH} levels deep; a plan is a shallow JSON "
                              "object (see docs/plan-format.md).")


def _scalar(item: Any, path: str) -> Any:
    if item is None or isinstance(item, (str, bool)):
        return item
    if isinstance(item, int):
        return int(item)
    if isinstance(item, float):
        if not math.isfinite(item):
            raise PlanFormatError(f"{path} is {item!r}; plan numbers must be finite (JSON has no NaN or Infinity).")
        return float(item)
    raise PlanFormatError(
        f"{path} is a {type(item).__name__}, which JSON cannot hold; plans hold only objects, lists, strings, "
        "numbers, true/false and null (tensors go in the plan's safetensors sidecar, e.g. via attach_bos)."
    )


def check_counts(data: Mapping[str, Any]) -> None:
    """At most :data:`MAX_PATTERNS` patterns and :data:`MAX_LAYERS` layer entries (before the schema runs, so
    validation time stays bounded)."""
    rules = data.get("rules")
    patterns = len(data.get("ignore") or ()) if isinstance(data.get("ignore"), list) else 0
    if isinstance(rules, list):
        patterns += sum(len(r.get("targets") or ()) for r in rules if isinstance(r, Mapping)
                        and isinstance(r.get("targets"), list))
    if patterns > MAX_PATTERNS:
        raise PlanFormatError(
            f"The plan has {patterns} layer-name patterns (rule targets and ignore entries); the limit is "
            f"{MAX_PATTERNS}. Name layers explicitly in 'layers', or merge patterns (a glob like '*.attn2.*' or a "
            "'re:' regex covers many layers)."
        )
    target = data.get("target")
    manifest = target.get("layers") if isinstance(target, Mapping) else None
    for field, entries in (("layers", data.get("layers")), ("target.layers", manifest)):
        if isinstance(entries, Mapping) and len(entries) > MAX_LAYERS:
            raise PlanFormatError(f"The plan's '{field}' has {len(entries)} entries; the limit is {MAX_LAYERS} "
                                  "(no denoiser has that many quantizable layers). Is this the right plan?")
