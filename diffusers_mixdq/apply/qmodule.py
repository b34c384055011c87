"""What every MixDQ module does whatever library stores its weight: input quantization and BOS rows.

A weight backend builds its quantized Linear / Conv2d classes as ``class MyLinear(MixDQModuleMixin, LibraryLinear)``
and provides ``_qforward`` (the weight-quantized op on an already quantized input) and ``weight_is_quantized``.
The mixin picks the layer's activation scheme from its :class:`~diffusers_mixdq.LayerSpec`
(:mod:`diffusers_mixdq.apply.activations`) and serves the BOS-aware row 0 (:mod:`diffusers_mixdq.bos`).
"""

from __future__ import annotations

import torch

from ..plan import BOS_MATCH_TOLERANCE, LayerSpec
from .activations import scheme_for
from .corrections import CORRECTION_BUFFERS, corrected_forward
from .outliers import OUTLIER_BUFFERS, configure_outliers, has_outliers, outlier_forward
from .timestep_groups import GROUP_BUFFERS, configure_groups, group_scale, has_groups


class MixDQModuleMixin:
    """Input quantization + BOS rows + weight-quantized forward (mixed into a backend's module classes)."""

    act_dtype: str = "none"
    act_dynamic: bool = False
    #: BOS-aware: output row 0 comes from ``bos_output`` (computed in full precision) when input row 0 is the
    #: recorded BOS state ``bos_input``; rows 1..n go through the quantized path
    bos_aware: bool = False
    #: name of the weight backend that made the module (``WEIGHT_BACKENDS``)
    mixdq_backend: str = ""
    #: channel balancing and/or a low-rank branch (:mod:`diffusers_mixdq.apply.corrections`)
    mixdq_corrected: bool = False

    def _configure(self, spec: LayerSpec, scale_dtype: torch.dtype, backend: str) -> None:
        self.mixdq_spec = spec
        self.mixdq_backend = backend
        self.act_dtype = spec.activations
        self.act_dynamic = spec.dynamic
        self.mixdq_flags = dict(spec.flags)
        self._act_scheme = scheme_for(spec)
        scale = 1.0 if self._act_scheme is None else self._act_scheme.initial_scale(spec)
        self._act_scheme = None if self._act_scheme is None else self._act_scheme.bind(self)
        # small buffers are created for real (not on meta) so they exist even when the checkpoint lacks them
        self.input_scale = torch.tensor(scale, dtype=scale_dtype)
        self.output_scale = torch.ones((), dtype=scale_dtype)
        self.bos_aware = bool(spec.flags.get("bos_aware"))
        if self.bos_aware:
            # on meta until filled (from the plan and the full-precision weight, or from a saved checkpoint)
            self.register_buffer("bos_input", torch.empty(self.in_features, dtype=scale_dtype, device="meta"))
            self.register_buffer("bos_output", torch.empty(self.out_features, dtype=scale_dtype, device="meta"))
        configure_groups(self, spec, scale_dtype)  # timestep groups (act_groups), from the plan
        configure_outliers(self, spec, scale_dtype)  # outlier rows (outliers), on meta until filled

    @property
    def stores_quantized_weight(self) -> bool:
        """Whether the plan gives this layer a quantized weight (else the weight stays floating point)."""
        return self.mixdq_spec.weights != "none"

    def weight_is_quantized(self) -> bool:  # pragma: no cover - provided by the backend's classes
        raise NotImplementedError

    def _needs_grad_mode(self) -> bool:
        """True when the backend's kernel cannot run under ``torch.inference_mode()`` (it then runs under
        ``no_grad`` instead)."""
        return False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the library's module writes only its own tensors; add ours (BOS rows)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        names = ("bos_input", "bos_output") if self.bos_aware else ()
        names += GROUP_BUFFERS if has_groups(self) else ()
        names += OUTLIER_BUFFERS if has_outliers(self) else ()
        for name in names:
            buf = getattr(self, name)
            destination[prefix + name] = buf if keep_vars else buf.detach()

    def static_input_scale(self) -> torch.Tensor:
        """The calibrated input scale for this call (the current timestep group's, if the layer has groups)."""
        return group_scale(self) if has_groups(self) else self.input_scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._act_scheme is None:
            return x
        return self._act_scheme.quantize(x, self.act_dtype, self.static_input_scale())

    def input_quant_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale :meth:`quantize_input` would quantize ``x`` with (``None``: no separable scale), for a
        backend's real low-precision GEMM."""
        return self._act_scheme.scale(x, self.act_dtype, self.static_input_scale())

    def move_scales_to_weight_device(self) -> None:
        device = self.weight.device
        for name in ("input_scale", "output_scale", *GROUP_BUFFERS, *OUTLIER_BUFFERS, *CORRECTION_BUFFERS):
            buf = getattr(self, name, None)
            if isinstance(buf, torch.Tensor) and buf.device.type != "meta" and buf.device != device:
                setattr(self, name, buf.to(device))

    def cast_buffers_(self, dtype: torch.dtype) -> None:
        """Activation scales and BOS rows in ``dtype`` (a checkpoint saved in another dtype holds them in that one)."""
        for name in ("input_scale", "output_scale", "bos_input", "bos_output", "act_group_scales", "outlier_scale"):
            buf = getattr(self, name, None)
            if isinstance(buf, torch.Tensor) and buf.is_floating_point() and buf.dtype != dtype:
                setattr(self, name, buf.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the backend's answer first, and nothing of this under torch.compile: no graph break for the check
        if self._needs_grad_mode() and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_aware and x.dim() == 3 and x.shape[1] >= 2:
            return self._bos_forward(x)
        return self._quantized_path(x)

    def _quantized_path(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixdq_corrected:
            return corrected_forward(self, x)
        return self._quantized_op(self.quantize_input(x))

    def _quantized_op(self, xq: torch.Tensor) -> torch.Tensor:
        """The backend's weight-quantized op on a quantized input, outlier channels from their int8 rows."""
        y = self._qforward(xq)
        return outlier_forward(self, xq, y) if has_outliers(self) else y

    def _bos_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows 1..n quantized; row 0 the stored full-precision row wherever input row 0 is the BOS state
        (per sample, without a host sync: e.g. zeroed negative prompts keep the quantized path)."""
        rest = self._quantized_path(x[:, 1:])
        first = self._quantized_path(x[:, :1])
        h = self.bos_input.float()
        is_bos = (x[:, 0].float() - h).norm(dim=-1) <= BOS_MATCH_TOLERANCE * h.norm()
        stored = self.bos_output.to(first.dtype).expand_as(first)
        return torch.cat([torch.where(is_bos[:, None, None], stored, first), rest], dim=1)


def is_mixdq_module(module) -> bool:
    """Whether ``module`` is a MixDQ module (of any weight backend)."""
    return isinstance(module, MixDQModuleMixin)
