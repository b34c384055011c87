"""The optimum-quanto seam: the only module of diffusers-mixdq that imports optimum-quanto.

Everything the rest of the package needs from a quantization library goes through the functions below
(``make_module``, ``quantize_weight_``, ``load_quantized_weight``, ``describe``), so replacing optimum-quanto
(in maintenance mode upstream) means rewriting this file only.

Design:

* Weights are stored as quanto tensors (``WeightQBytesTensor`` for int8/float8, ``WeightQBitsTensor`` for
  int4/int2), so serialization, packing and quanto's optimized GPU kernels come for free.
* Activations are quantized by our own modules, not by quanto's hooks: quanto's ``QConv2d`` never quantizes its
  input, and quanto's int8 x int8 CPU path (``torch._int_mm``) is ~75x slower than fp32 on CPUs without VNNI.
  We quantize the input in the model's float dtype (round-to-nearest, clamp, rescale: numerically the same
  values an int8 kernel sees) and run the weight-only path. Static scales live in quanto's ``input_scale``
  buffer, so they are saved with the weights.
* quanto's C++ extension (int4/int2 unpacking on CPU) is built into a user cache directory, never into
  site-packages.
* quanto's int4/int2 linear fails under ``torch.inference_mode()`` (upstream issue #304); our modules step out of
  inference mode (keeping ``no_grad``) for that call, so users never see it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import BOS_MATCH_TOLERANCE, LayerSpec


def cache_dir() -> Path:
    """Where compiled artefacts go: ``$DIFFUSERS_MIXDQ_CACHE``, else ``$XDG_CACHE_HOME/diffusers_mixdq``,
    else ``~/.cache/diffusers_mixdq``."""
    env = os.environ.get("DIFFUSERS_MIXDQ_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusers_mixdq"


def _redirect_extension_build() -> None:
    from optimum.quanto.library.extensions import cpp

    build = cache_dir() / "quanto-ext" / f"torch-{torch.__version__}"
    cpp.ext.build_directory = str(build)


_redirect_extension_build()

from optimum.quanto import QConv2d, QLinear, QTensor, qfloat8, qint2, qint4, qint8  # noqa: E402
from optimum.quanto.tensor.weights import WeightQBitsTensor  # noqa: E402

_WEIGHT_QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}
_QTYPE_NAMES = {q.name: name for name, q in _WEIGHT_QTYPES.items()}
_FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_ACT_QMAX = {"int8": 127.0, "int4": 7.0, "float8": _FLOAT8_MAX}


def activation_scale(dtype: str, absmax: float) -> float:
    """The per-tensor scale that maps ``absmax`` to the largest code of activation ``dtype``."""
    return max(float(absmax), 1e-12) / _ACT_QMAX[dtype]


def fake_quantize_activation(x: torch.Tensor, dtype: str, scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize ``x`` per tensor to ``dtype`` and back (``scale=None``: dynamic, from ``x``'s absmax)."""
    if scale is None:
        scale = x.detach().abs().amax().float().clamp_min(1e-12) / _ACT_QMAX[dtype]
    scale = scale.to(x.dtype)
    if dtype in ("int8", "int4"):
        qmax = _ACT_QMAX[dtype]
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    if dtype == "float8":
        q = torch.clamp(x / scale, -_FLOAT8_MAX, _FLOAT8_MAX).to(torch.float8_e4m3fn)
        return q.to(x.dtype) * scale
    raise ValueError(f"unknown activation dtype {dtype!r}")


class _ActivationMixin:
    """Input quantization + weight-quantized forward shared by MixDQLinear and MixDQConv2d."""

    act_dtype: str = "none"
    act_dynamic: bool = False
    #: BOS-aware: output row 0 comes from ``bos_output`` (computed in full precision) when input row 0 is the
    #: recorded BOS state ``bos_input``; rows 1..n go through the quantized path
    bos_aware: bool = False

    def _configure(self, spec: LayerSpec, scale_dtype: torch.dtype) -> None:
        self.act_dtype = spec.activations
        self.act_dynamic = spec.dynamic
        self.mixdq_flags = dict(spec.flags)
        scale = 1.0
        if spec.activations != "none" and not spec.dynamic:
            scale = activation_scale(spec.activations, float(spec.act_range))
        # small buffers are created for real (not on meta) so they exist even when the checkpoint lacks them
        self.input_scale = torch.tensor(scale, dtype=scale_dtype)
        self.output_scale = torch.ones((), dtype=scale_dtype)
        self.bos_aware = bool(spec.flags.get("bos_aware"))
        if self.bos_aware:
            # on meta until filled (from the plan and the full-precision weight, or from a saved checkpoint)
            self.register_buffer("bos_input", torch.empty(self.in_features, dtype=scale_dtype, device="meta"))
            self.register_buffer("bos_output", torch.empty(self.out_features, dtype=scale_dtype, device="meta"))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # quanto's QModuleMixin writes only its own tensors; add ours (BOS rows)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bos_aware:
            for name in ("bos_input", "bos_output"):
                buf = getattr(self, name)
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (overrides quanto's hook)
        if self.act_dtype == "none":
            return x
        return fake_quantize_activation(x, self.act_dtype, None if self.act_dynamic else self.input_scale)

    def _weight(self):
        return self.weight if self.weight_qtype is None else self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled() and isinstance(self.weight, WeightQBitsTensor):
            with torch.inference_mode(False), torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_aware and x.dim() == 3 and x.shape[1] >= 2:
            return self._bos_forward(x)
        return self._qforward(self.quantize_input(x))

    def _bos_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows 1..n quantized; row 0 the stored full-precision row wherever input row 0 is the BOS state
        (per sample, without a host sync: e.g. zeroed negative prompts keep the quantized path)."""
        rest = self._qforward(self.quantize_input(x[:, 1:]))
        first = self._qforward(self.quantize_input(x[:, :1]))
        h = self.bos_input.float()
        is_bos = (x[:, 0].float() - h).norm(dim=-1) <= BOS_MATCH_TOLERANCE * h.norm()
        stored = self.bos_output.to(first.dtype).expand_as(first)
        return torch.cat([torch.where(is_bos[:, None, None], stored, first), rest], dim=1)


class MixDQLinear(_ActivationMixin, QLinear):
    """A quanto ``QLinear`` whose input is quantized per the plan (static or dynamic per-tensor)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(), self.bias)


class MixDQConv2d(_ActivationMixin, QConv2d):
    """A quanto ``QConv2d`` whose input is quantized per the plan (quanto's own never quantizes its input)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._weight(), self.bias)


QUANTIZED_MODULE_TYPES = (MixDQLinear, MixDQConv2d)


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_MODULE_TYPES)


def make_module(module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype) -> nn.Module:
    """A MixDQ module shaped like ``module`` (weights left on the meta device, not yet quantized).

    ``module`` must be a Linear or Conv2d and not already quantized (re-quantizing a quantized module would
    compound the error; callers check, this asserts).
    """
    if isinstance(module, (QLinear, QConv2d)):
        raise TypeError(f"{type(module).__name__} is already quantized")
    qtype = _WEIGHT_QTYPES.get(spec.weights)
    cls = MixDQLinear if isinstance(module, nn.Linear) else MixDQConv2d
    qmodule = cls.qcreate(module, weights=qtype, activations=None, optimizer=None, device="meta")
    qmodule._configure(spec, scale_dtype)
    qmodule.requires_grad_(False)
    return qmodule


def quantize_module(module: nn.Module, spec: LayerSpec, bos_state: torch.Tensor | None = None) -> nn.Module:
    """A quantized copy of an in-memory Linear / Conv2d (the original is left untouched).

    The counterpart of what ``from_pretrained`` does while streaming a checkpoint, for modules that already live
    in memory (calibration and sensitivity sweeps, benchmarks).
    """
    device, dtype = module.weight.device, module.weight.dtype
    qmodule = make_module(module, spec, scale_dtype=dtype)
    qmodule.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    if module.bias is not None:
        qmodule.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    qmodule.input_scale = qmodule.input_scale.to(device)
    qmodule.output_scale = qmodule.output_scale.to(device)
    if qmodule.bos_aware:
        if bos_state is None:
            raise ValueError("a BOS-aware layer needs the BOS hidden state")
        set_bos_state(qmodule, bos_state)
        compute_bos_row_(qmodule)
        finish_bos_(qmodule, dtype)
    quantize_weight_(qmodule)
    return qmodule


def set_bos_state(module: nn.Module, state: torch.Tensor) -> None:
    """Give a BOS-aware module the BOS hidden state (its output row is computed by :func:`compute_bos_row_`)."""
    module.bos_input = state.detach().to(torch.float32).reshape(-1).clone()
    module.bos_output = torch.zeros(module.out_features, dtype=torch.float32)
    module._bos_pending = True


def compute_bos_row_(module: nn.Module) -> None:
    """``bos_output = W @ bos_input`` from the module's weight while it is still full precision (no bias yet:
    the bias may be read later; :func:`finish_bos_` adds it)."""
    weight = module.weight
    if isinstance(weight, QTensor):
        raise RuntimeError("BOS rows must be computed from the full-precision weight, before quantization")
    module.bos_output = F.linear(module.bos_input.to(weight.device), weight.detach().float())
    module._bos_pending = "bias"


def finish_bos_(module: nn.Module, dtype: torch.dtype) -> None:
    """Add the bias to the BOS row and cast both BOS buffers to the model dtype and device."""
    if getattr(module, "_bos_pending", False) is True:
        compute_bos_row_(module)  # weight kept in floating point: it was loaded without being quantized
    device = module.weight.device
    row = module.bos_output.to(device)
    if module.bias is not None:
        row = row + module.bias.detach().float()
    module.bos_output = row.to(dtype)
    module.bos_input = module.bos_input.to(device=device, dtype=dtype)
    module._bos_pending = False


def quantize_weight_(module: nn.Module) -> None:
    """Quantize the module's (just loaded, full-precision) weight in place."""
    if module.weight_qtype is not None and not module.frozen:
        module.freeze()
    module.weight.requires_grad_(False)


_KEYS_CACHE: dict[str, frozenset[str]] = {}


def quantized_weight_keys(module: nn.Module) -> frozenset[str]:
    """State-dict keys (relative to the module) under which a quantized weight of this module's qtype is saved
    (``weight._data``, ``weight._scale``, ...), read off a tiny frozen quanto module of the same qtype."""
    name = module.weight_qtype.name
    if name not in _KEYS_CACHE:
        probe = QLinear(128, 2, bias=False, weights=module.weight_qtype)
        probe.freeze()
        _KEYS_CACHE[name] = frozenset(k for k in probe.state_dict() if k.startswith("weight."))
    return _KEYS_CACHE[name]


def load_quantized_weight(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Install a saved quantized weight (``tensors`` keyed ``weight._data``, ``weight._scale``, ...).

    Uses quanto's deserialisation; the kernel-specific re-layout (``optimize``) runs on accelerators only: on the
    CPU it unpacks and re-packs int4 / int2 weights into the same layout, which costs time and memory for nothing.
    """
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    tensors = {k: v.to(device) for k, v in tensors.items()}
    missing: list[str] = []
    size, stride = module.weight.size(), module.weight.stride()
    if module.weight_qtype.bits == 8:
        weight = WeightQBytesTensor.load_from_state_dict(
            tensors, "weight.", qtype=module.weight_qtype, axis=0, size=size, stride=stride,
            activation_qtype=None, missing_keys=missing,
        )
    else:
        weight = WeightQBitsTensor.load_from_state_dict(
            tensors, "weight.", qtype=module.weight_qtype, axis=0, group_size=module.weight_group_size,
            size=size, stride=stride, missing_keys=missing,
        )
    if weight is None or tensors:
        raise KeyError(f"missing {missing}, unexpected {sorted(tensors)}")
    if torch.device(device).type != "cpu":
        weight = weight.optimize()
    module.weight = nn.Parameter(weight, requires_grad=False)


def describe(module: nn.Module) -> tuple[str, str]:
    """(weight dtype, activation dtype) of a module, in plan vocabulary; ``("none", "none")`` if not quantized."""
    if not is_quantized_module(module):
        return "none", "none"
    w = "none" if module.weight_qtype is None else _QTYPE_NAMES[module.weight_qtype.name]
    if isinstance(module.weight, QTensor) and module.weight_qtype is not None:
        w = _QTYPE_NAMES[module.weight.qtype.name]
    return w, module.act_dtype


def has_meta_tensors(module: nn.Module) -> bool:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.device.type == "meta":
            return True
        if isinstance(t, QTensor):
            inner = getattr(t, "_data", None)
            if inner is not None and inner.device.type == "meta":
                return True
    return False
