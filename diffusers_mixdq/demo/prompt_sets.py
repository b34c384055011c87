"""Held-out prompt sets of the bundled models: calibration, validation, test.

Each model's data module partitions its captions into three disjoint pools from a documented seed
(``caption_pools()``; shapes: :func:`diffusers_mixdq.demo.data.caption_pools`). The builder calibrates on the
calibration set and may choose among candidate plans on the validation set; ``mixdq eval`` and ``mixdq demo``
measure on the test set, which the builder never sees. A set of ``n`` prompts is the pool in a seeded, balanced
order (:func:`balanced_order`), repeated when ``n`` exceeds the pool: a caption then comes back with another image
seed (prompt ``i`` is generated with seed ``seed + i``), never from another pool.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np

from ..errors import MixDQError
from .models import get_model

SPLITS = ("calibration", "validation", "test")


def balanced_order(pool: Sequence[str], seed: int, parse: Callable[[str], Dict[str, str]]) -> List[str]:
    """Every caption of ``pool`` once, in an order whose every prefix is balanced: the pool is shuffled with
    ``seed``, then the next caption is always the first one (in that order) whose attribute values (``parse``) have
    been used least so far. Deterministic in ``(pool, seed)``."""
    rng = np.random.default_rng(seed)
    remaining = [pool[i] for i in rng.permutation(len(pool))]
    attrs = {c: sorted(parse(c).items()) for c in remaining}
    used: Dict[tuple, int] = {}
    out: List[str] = []
    while remaining:
        best = min(range(len(remaining)), key=lambda i: sum(used.get(kv, 0) for kv in attrs[remaining[i]]))
        caption = remaining.pop(best)
        for kv in attrs[caption]:
            used[kv] = used.get(kv, 0) + 1
        out.append(caption)
    return out


def prompt_set(model: str = "shapes", split: str = "test", n: int = 64, seed: int = 0) -> List[str]:
    """``n`` prompts of the ``split`` set (:data:`SPLITS`) of the bundled ``model``: its pool of captions in the
    balanced order of ``seed``, repeated when ``n`` is larger than the pool (``pool_size`` says how large)."""
    if split not in SPLITS:
        raise MixDQError(f"Unknown prompt set {split!r}; one of {', '.join(SPLITS)}.")
    if n < 0:
        raise MixDQError(f"The number of prompts must be >= 0, got {n}.")
    data = get_model(model).data()
    pool = data.caption_pools()[SPLITS.index(split)]
    order = balanced_order(pool, seed, data.parse_caption)
    return [order[i % len(order)] for i in range(n)]


def pool_size(model: str = "shapes", split: str = "test") -> int:
    """How many distinct captions the ``split`` set of ``model`` holds."""
    if split not in SPLITS:
        raise MixDQError(f"Unknown prompt set {split!r}; one of {', '.join(SPLITS)}.")
    return len(get_model(model).data().caption_pools()[SPLITS.index(split)])


def is_caption(model: str, prompt: str) -> bool:
    """Whether ``prompt`` is in the caption grammar of the bundled ``model`` (its scorer can read it)."""
    parse = get_model(model).data().parse_caption
    try:
        parse(prompt)
    except ValueError:
        return False
    return True
