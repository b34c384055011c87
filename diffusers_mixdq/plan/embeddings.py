"""Embedding tables stored at int8 (plan key ``embeddings``): which tables a plan covers and what they cost.

``"embeddings": {"weights": "int8"}`` stores every ``nn.Embedding`` table of the model (token and position
tables) as int8 rows with one scale per row (symmetric), unless another module shares the table (a tied table,
e.g. T5's ``shared`` / ``encoder.embed_tokens``: it stays floating point, as without the key). The tables are not
layers of the plan (no manifest entry, no fingerprint): the key applies to whatever tables the model has. Sizes
count ``8`` bits per element plus :data:`ROW_SCALE_BITS` per row. Applied by :mod:`diffusers_mixdq.apply.embeddings`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from torch import nn

#: bits of each row's scale in the size estimates
ROW_SCALE_BITS = 16


def int8_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The ``nn.Embedding`` modules of ``model`` that a plan with int8 embeddings stores at int8: those no other
    module shares (neither the module under a second name nor its weight, nor a weight the model ties to it
    after loading)."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Embedding))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = _tied_keys(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and names[id(m)] == 1 and owners[id(m.weight)] == 1
            and f"{name}.weight" not in tied}


def _tied_keys(model: nn.Module) -> set[str]:
    """Both sides of the weights transformers ties (``all_tied_weights_keys`` / ``_tied_weights_keys``: a
    ``{target: source}`` dict in transformers 5, a list of targets before)."""
    keys: set[str] = set()
    for declared in (getattr(model, "all_tied_weights_keys", None), getattr(model, "_tied_weights_keys", None)):
        if isinstance(declared, Mapping):
            keys |= {str(k) for k in declared} | {str(v) for v in declared.values()}
        elif declared:
            keys |= {str(k) for k in declared}
    return keys


def wants_int8(embeddings: Mapping[str, Any] | None) -> bool:
    return bool(embeddings) and embeddings.get("weights") == "int8"


def embedding_storage(model: nn.Module, embeddings: Mapping[str, Any] | None) -> tuple[int, float]:
    """``(parameters, stored bits)`` of the tables ``embeddings`` (a plan's key) stores at int8 in ``model``."""
    if not wants_int8(embeddings):
        return 0, 0.0
    tables = int8_tables(model).values()
    params = sum(m.weight.numel() for m in tables)
    return params, 8.0 * params + ROW_SCALE_BITS * sum(m.num_embeddings for m in tables)
