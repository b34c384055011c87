"""The native backend's Linear / Conv2d: weights as plain int8 / uint8 buffers in the quanto layout.

A module is made on the meta device with its float ``weight`` parameter (so a checkpoint's ``<layer>.weight``
loads into it); quantizing (or installing a saved quantized weight) replaces that parameter by the buffers
``qdata`` (int8 codes, packed int4 / int2 codes, or float8 values held as their bytes so that ``model.to(dtype)``
never casts them), ``qscale`` and ``qshift``. They are saved under quanto's keys (``weight._data``,
``weight._scale``, ...) and read back from them, so checkpoints move freely between the two backends.
``module.weight`` then is a :class:`QuantizedWeight`: the logical weight's shape, dtype and device (what plan and
layer tables read) and :meth:`QuantizedWeight.dequantize`.

A layer with outlier channels (:mod:`diffusers_mixdq.apply.outliers`) stores its other rows only: ``weight_shape``
is the stored weight's (``out - k`` rows, the kept ones listed in ``kept_rows``), the op runs on those rows and the
outlier channels come from their int8 rows alone, so each row is stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from ...qmodule import MixDQModuleMixin, is_mixdq_module
from .. import layout
from . import kernels, packing, real_gemm

_BUFFERS = ("qdata", "qscale", "qshift", "dequantized_cache", "int4_packed", "int4_scale_zeros")


class QuantizedWeight:
    """Stands for a native module's quantized weight: shape, dtype, device, ``dequantize()`` (not a tensor)."""

    #: transformers' weight initialisers (``transformers.initialization``) skip what carries this flag: a loaded
    #: quantized weight is never re-initialised (CLIP's attention init reaches its projections' weights directly)
    _is_hf_initialized = True

    def __init__(self, module: nn.Module):
        self._module = module

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._module.logical_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._module.qscale.dtype

    @property
    def device(self) -> torch.device:
        return self._module.qdata.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self) -> torch.Tensor:
        """The whole weight (a layer storing its outlier rows apart: those rows from their int8 values)."""
        m = self._module
        w = packing.dequantize(m.stored_data(), m.qscale, m.qshift, m.qbits, tuple(m.weight_shape))
        if m.kept_rows is None:
            return w
        outliers = (m.outlier_weight.to(w.dtype) * m.outlier_scale.to(w.dtype)[:, None]).view(-1, *w.shape[1:])
        full = w.new_empty(m.logical_shape).index_copy_(0, m.kept_rows, w)
        return full.index_copy_(0, m.outlier_channels, outliers)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self._module.mixdq_spec.weights}, shape={list(self.shape)}, dtype={self.dtype})"


class _NativeWeight:
    """The weight side of a native module: storage, state dict, which weight the op uses."""

    qbits: int = 0
    qfloat8: bool = False

    def _init_native(self, spec) -> None:
        self.logical_shape = tuple(self._parameters["weight"].shape)
        dropped = set(spec.outlier_channels) if spec.weights in layout.WEIGHT_BITS else set()
        kept = [i for i in range(self.logical_shape[0]) if i not in dropped]
        self.weight_shape = (len(kept),) + self.logical_shape[1:]  # the stored weight's
        self.register_buffer("kept_rows", torch.tensor(kept) if dropped else None, persistent=False)
        self.qbits = layout.WEIGHT_BITS.get(spec.weights, 0)
        self.qfloat8 = spec.weights == "float8"
        for name in _BUFFERS:
            self.register_buffer(name, None, persistent=False)
        for name in ("input_scale", "output_scale"):
            self.register_buffer(name, torch.ones(()))

    @property
    def weight(self):
        param = self._parameters.get("weight")
        if param is not None:
            return param
        if self._buffers.get("qdata") is not None:
            return QuantizedWeight(self)
        raise AttributeError("weight")

    def weight_is_quantized(self) -> bool:
        return self.qdata is not None

    def rows_forward(self, x: torch.Tensor, op, dim: int) -> torch.Tensor:
        """``op(x, weight, bias)`` on the stored rows, scattered into the full output along ``dim`` (the outlier
        channels left zero: the mixin fills them from their int8 rows)."""
        bias = None if self.bias is None else self.bias.index_select(0, self.kept_rows)
        part = op(x, kernels.weight(self, x), bias)
        shape = list(part.shape)
        shape[dim] = self.logical_shape[0]
        return part.new_zeros(shape).index_copy(dim, self.kept_rows, part)

    def _stored_rows_only(self) -> bool:
        return self.kept_rows is not None and self.qdata is not None and self.dequantized_cache is None

    def stored_data(self) -> torch.Tensor:
        return self.qdata.view(packing.FLOAT8) if self.qfloat8 else self.qdata

    def install(self, data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Make ``(data, scale, shift)`` the module's weight (the float parameter goes)."""
        self._parameters.pop("weight", None)
        self.qdata = data.view(torch.uint8) if data.dtype == packing.FLOAT8 else data
        self.qscale, self.qshift = scale, shift

    def quantized_pieces(self) -> dict[str, torch.Tensor]:
        if self.qbits == 8:
            return {"weight._data": self.stored_data(), "weight._scale": self.qscale}
        return {"weight._data._data": self.qdata, "weight._scale": self.qscale, "weight._shift": self.qshift}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qdata is not None:
            for key, value in self.quantized_pieces().items():
                destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
        if keys:
            pieces = {k[len(prefix):]: state_dict.pop(k) for k in keys}
            try:
                install_pieces(self, pieces, self.input_scale.device)
            except (KeyError, ValueError, RuntimeError) as e:
                error_msgs.append(f"{prefix}weight: {e}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _RealGemm:
    """Where :mod:`.real_gemm` takes a call, its input is quantized by the real GEMM itself (the same scale and codes
    as the simulated path); every other call runs the mixin's simulated op."""

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if real_gemm.accepts(self, x):
            return x  # quantized in _quantized_op, into the codes the real GEMM takes
        return super().quantize_input(x)

    def _quantized_op(self, x: torch.Tensor) -> torch.Tensor:
        """The real GEMM on the balanced, not yet quantized input, else the mixin's simulated op."""
        if not real_gemm.accepts(self, x):
            return super()._quantized_op(x)  # x already quantized by quantize_input
        scale = self.input_quant_scale(x)
        if scale is None:  # a scheme without a separable scale (the distiller's straight-through one)
            return super()._quantized_op(super().quantize_input(x))
        return real_gemm.gemm(self, x, scale)


class NativeLinear(_NativeWeight, _RealGemm, MixDQModuleMixin, nn.Linear):
    """A Linear whose weight is stored quantized and run by :mod:`.kernels` (W8A8 / FP8 by :mod:`.real_gemm`)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stored_rows_only():
            return self.rows_forward(x, torch.nn.functional.linear, -1)
        return kernels.linear(self, x)


class NativeConv2d(_NativeWeight, _RealGemm, MixDQModuleMixin, nn.Conv2d):
    """A Conv2d whose weight is stored quantized (1x1 convolutions may run as a Linear, and W8A8 ones through
    :mod:`.real_gemm`)."""

    is_pointwise: bool = False

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stored_rows_only():
            return self.rows_forward(x, self._conv_forward, 1)
        return kernels.conv2d(self, x)


def make_module(module: nn.Module, spec, scale_dtype: torch.dtype, backend: str) -> nn.Module:
    """A native module shaped like ``module`` (weights on the meta device, not yet quantized)."""
    if is_mixdq_module(module):
        raise TypeError(f"{type(module).__name__} is already quantized")
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        qmodule = NativeLinear(module.in_features, module.out_features, bias=bias, device="meta")
    else:
        qmodule = NativeConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                               module.padding, module.dilation, module.groups, bias, module.padding_mode,
                               device="meta")
        qmodule.is_pointwise = (tuple(qmodule.kernel_size) == (1, 1) and tuple(qmodule.stride) == (1, 1)
                                and qmodule.padding in ((0, 0), "valid") and tuple(qmodule.dilation) == (1, 1)
                                and qmodule.groups == 1 and qmodule.padding_mode == "zeros")
    qmodule._init_native(spec)
    qmodule._configure(spec, scale_dtype, backend)
    qmodule.requires_grad_(False)
    return qmodule


def quantize_weight_(module: nn.Module) -> None:
    """Quantize the module's just-loaded full-precision weight in place (no-op for float weights)."""
    param = module._parameters.get("weight")
    if module.qbits == 0 or param is None:
        return
    w = param.detach()
    if module.kept_rows is not None:  # outlier rows are stored apart, at int8 (apply.outliers)
        w = w.index_select(0, module.kept_rows.to(w.device))
    if module.qbits == 8:
        data, scale = packing.quantize_symmetric(w, module.qfloat8)
        module.install(data, scale, None)
    else:
        module.install(*packing.quantize_affine(w, module.qbits))


def install_pieces(module: nn.Module, tensors: dict[str, torch.Tensor], device) -> None:
    """Install a saved quantized weight (quanto's keys), checked against the module's layout; every tensor is
    copied into aligned memory of its own (a memory-mapped tensor may start at any byte offset, and torch's
    packed CPU kernels crash on unaligned data)."""
    want = layout.expected_pieces(module.qbits, module.qfloat8, module.weight_shape)
    if set(tensors) != set(want):
        raise KeyError(f"missing {sorted(set(want) - set(tensors))}, unexpected {sorted(set(tensors) - set(want))}")
    for key, (shape, dtype) in want.items():
        t = tensors[key]
        bad_dtype = t.dtype != getattr(torch, dtype) if dtype is not None else not t.is_floating_point()
        if tuple(t.shape) != tuple(shape) or bad_dtype:
            old = module.kept_rows is not None and layout.expected_pieces(
                module.qbits, module.qfloat8, module.logical_shape)[key][0] == tuple(t.shape)
            raise ValueError(f"{key} is {list(t.shape)} {t.dtype}, the layer needs {list(shape)} {dtype or 'float'}"
                             + ("; it holds the outlier rows too, as checkpoints saved before outlier rows were "
                                "stored once did: quantize the full-precision model again" if old else ""))
    tensors = {k: v.to(device, copy=True, memory_format=torch.contiguous_format) for k, v in tensors.items()}
    data = tensors.get("weight._data", tensors.get("weight._data._data"))
    module.install(data, tensors["weight._scale"], tensors.get("weight._shift"))
