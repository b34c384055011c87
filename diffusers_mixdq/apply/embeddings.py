"""Embedding tables stored at int8, one scale per row (plan key ``embeddings``; which tables:
:mod:`diffusers_mixdq.plan.embeddings`). Backend-independent: plain torch, the same for every weight backend.

Both quantizers swap each covered ``nn.Embedding`` for an :class:`Int8Embedding` before loading. From a
full-precision checkpoint the table arrives as ``<name>.weight`` and is quantized at once (:meth:`quantize_`,
dropping the floating-point table); a pre-quantized checkpoint holds ``<name>.int8_weight`` (``(rows, dim)``
int8) and ``<name>.weight_scale`` (``(rows,)``, the model's float dtype), which are all the module saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanMismatchError
from ..plan.embeddings import int8_tables, wants_int8
from .outliers import int8_rows

#: the state-dict keys of a quantized table, relative to its module
TABLE_BUFFERS = ("int8_weight", "weight_scale")


class Int8Table:
    """Stands for an :class:`Int8Embedding`'s table (shape, dtype, device, ``dequantize()``; not a tensor)."""

    #: transformers' weight initialisers skip what carries this flag: a loaded table is never re-initialised
    _is_hf_initialized = True

    def __init__(self, module: Int8Embedding):
        self._module = module

    shape = property(lambda self: self._module.int8_weight.shape)
    dtype = property(lambda self: self._module.weight_scale.dtype)
    device = property(lambda self: self._module.int8_weight.device)

    def dequantize(self) -> torch.Tensor:
        m = self._module
        return m.int8_weight.to(m.weight_scale.dtype) * m.weight_scale[:, None]


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored int8 with one symmetric scale per row."""

    def __init__(self, source: nn.Embedding, name: str, scale_dtype: torch.dtype, from_full_precision: bool):
        super().__init__()
        if source.max_norm is not None:
            raise PlanMismatchError(f"The embedding table '{name}' renormalises its rows (max_norm), which an int8 "
                                    "table cannot; remove 'embeddings' from the plan for this model.")
        self.num_embeddings, self.embedding_dim, self.padding_idx = (source.num_embeddings, source.embedding_dim,
                                                                      source.padding_idx)
        rows, dim = source.weight.shape
        self.register_buffer("int8_weight", torch.empty(rows, dim, dtype=torch.int8, device="meta"))
        self.register_buffer("weight_scale", torch.empty(rows, dtype=scale_dtype, device="meta"))
        if from_full_precision:  # where the checkpoint's table lands, until quantize_
            self._parameters["weight"] = nn.Parameter(torch.empty(rows, dim, device="meta"), requires_grad=False)

    @property
    def weight(self):
        param = self._parameters.get("weight")
        return param if param is not None else Int8Table(self)

    def quantize_(self) -> None:
        """Quantize the just-placed floating-point table and drop it."""
        table = self._parameters.pop("weight")
        values, scale = int8_rows(table.detach())
        self.int8_weight = values
        self.weight_scale = scale.to(self.weight_scale.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.int8_weight).to(self.weight_scale.dtype)
        return rows * F.embedding(ids, self.weight_scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def swap_tables(model: nn.Module, embeddings, scale_dtype: torch.dtype,
                from_full_precision: bool) -> dict[str, Int8Embedding]:
    """Replace the tables a plan's ``embeddings`` key stores at int8 (none unless it says int8)."""
    if not wants_int8(embeddings):
        return {}
    swapped = {}
    for name, table in int8_tables(model).items():
        swapped[name] = Int8Embedding(table, name, scale_dtype, from_full_precision)
        model.set_submodule(name, swapped[name])
    return swapped
