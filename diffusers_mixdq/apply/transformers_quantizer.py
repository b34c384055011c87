"""The transformers quantizer for ``quant_method="mixdq"``: applies a plan to a text encoder (``CLIPTextModel``,
``CLIPTextModelWithProjection``, ``T5EncoderModel``, ...) while transformers loads it.

Flow inside ``PreTrainedModel.from_pretrained`` (transformers 5 loads through weight "conversions"):

1. ``_process_model_before_weight_loading`` (model on meta): for a saved quantized model read the plan file
   beside its weights; pick the component's plan (:mod:`diffusers_mixdq.plan.components`); resolve it, check a
   pre-quantized checkpoint's tensors against it, and swap each planned Linear for a MixDQ module made by the weight
   backend (the same modules, backend and checks as the diffusers quantizer: :mod:`.swap`).
2. Full-precision checkpoint: each planned ``weight`` is routed to :class:`_Quantize` (``param_needs_quantization``
   / ``get_quantize_ops``), which places and quantizes it at once. Pre-quantized checkpoint: a converter
   (``get_weight_conversions``) gathers the pieces of each saved quantized weight (``weight._data``,
   ``weight._scale``, ...) into :class:`_Deserialize`, which installs them.
3. ``_process_model_after_weight_loading``: re-raise any error transformers turned into a log line, put back the
   activation scales transformers re-created as "missing", check nothing is left on meta, and drop our converter
   from the model's list (transformers would try to reverse it on save; the quantized modules save themselves).

``save_pretrained`` writes the plan file beside the weights (the same wrapper as for diffusers models) and a
``quantization_config`` that refers to it; ``from_pretrained`` of that folder needs no plan.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer

from ..errors import MixDQError
from . import checkpoint, saved_weights
from .embeddings import swap_tables
from .swap import (OneDeviceLoad, check_loaded, check_unloaded, config_for, finish_full_precision_load,
                   install_saved_weight, load_dtype, make_modules, quantize_placed_weight_, refuse_quantized,
                   settle_modules)


class _MixDQOp(ConversionOps):
    """A conversion op that hands one planned layer's tensors to the quantizer (never raising inside transformers'
    loop, which would turn the error into a log line: the quantizer keeps it and raises after loading)."""

    def __init__(self, quantizer: MixDQTransformersQuantizer):
        self.hf_quantizer = quantizer

    def __deepcopy__(self, memo):  # transformers copies its converter per layer: keep one quantizer, not copies
        return self

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs) -> dict[str, Any]:
        name = full_layer_name[: -len(".weight")]
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        module = self.hf_quantizer.target(name)
        before = dict(module._buffers)
        try:
            self.apply(name, tensors)
        except (MixDQError, RuntimeError, KeyError, ValueError) as e:
            self.hf_quantizer.errors.append(e if isinstance(e, MixDQError) else MixDQError(f"'{name}': {e}"))
            return {}
        module._is_hf_initialized = True  # transformers must not re-initialise the (quantized) weight
        made = {k: v for k, v in module._buffers.items() if v is not None and v is not before.get(k)}
        self.hf_quantizer.keep(name, made)
        if missing_keys is not None:  # made here (or read by the converter): not "missing" for transformers
            for key in ("weight", *self.hf_quantizer.kept[name]):
                missing_keys.discard(f"{name}.{key}")
        return {}

    def apply(self, name: str, tensors: dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _Quantize(_MixDQOp):
    """A full-precision weight: placed, then quantized at once."""

    def apply(self, name, tensors):
        quantizer = self.hf_quantizer
        module = quantizer.target(name)
        (value,) = tensors.values()
        module.weight = torch.nn.Parameter(value.to(quantizer.torch_dtype), requires_grad=False)
        if name in quantizer.tables:
            module.quantize_()
        else:
            quantize_placed_weight_(quantizer.backend, module)


class _Deserialize(_MixDQOp):
    """The saved pieces of a quantized weight, gathered by the converter, installed together."""

    def apply(self, name, tensors):
        quantizer = self.hf_quantizer
        device = next(iter(tensors.values())).device
        install_saved_weight(quantizer.backend, quantizer.modules[name], name, tensors, quantizer.torch_dtype,
                             device)


class MixDQTransformersQuantizer(OneDeviceLoad, HfQuantizer):
    """Applies a :class:`~diffusers_mixdq.BitPlan` through transformers' loading machinery."""


    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype = torch.float32
        self.modules: dict[str, torch.nn.Module] = {}
        self.tables: dict[str, torch.nn.Module] = {}  # int8 embedding tables (plan key "embeddings")
        self.errors: list[MixDQError] = []
        #: per planned layer, the buffers made here (from the plan, or from the weight as it was loaded): put
        #: back after loading, where transformers replaced them (its "missing" keys and non-persistent buffers)
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        self._pick_backend(quantization_config)


    def update_dtype(self, dtype):
        self.torch_dtype = load_dtype(dtype, "dtype")
        return self.torch_dtype

    # ------------------------------------------------------------------ before loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if config.awaits_plan_file:  # a saved quantized model: its plan file lies beside the weights
            config.attach_plan_file(checkpoint.read_plan_file(config.plan_file, checkpoint_files or []))
        config = config_for(config, model, checkpoint_files)
        refuse_quantized(model)
        keep = _kept_in_fp32(model, self.torch_dtype)
        extra_ignore = list(config.modules_to_not_convert or []) + [f"*{m}*" for m in keep]
        resolved = config.plan_object().resolve(model, strict=config.strict, extra_ignore=extra_ignore)
        self._fit_backend(resolved)
        with torch.device("cpu"):  # transformers builds the model under a meta-device context
            self.modules = make_modules(self.backend, model, resolved, self.torch_dtype,
                                        fill_bos=not self.pre_quantized)
        self.tables = swap_tables(model, resolved.embeddings, self.torch_dtype, not self.pre_quantized)
        if self.pre_quantized:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            saved_weights.check_checkpoint(saved_weights.read_headers(checkpoint_files or []),
                                           resolved.layer_specs(), resolved.manifest(),
                                           lambda name, spec, info: self.backend.expected_pieces(self.modules[name]),
                                           shapes)
        for name, qmodule in self.modules.items():
            model.set_submodule(name, qmodule)
            # a pre-quantized checkpoint holds the persistent ones itself; the others (e.g. the native backend's
            # kept_rows) exist only as made here, and transformers re-creates non-persistent buffers
            made = qmodule._non_persistent_buffers_set if self.pre_quantized else qmodule._buffers
            self.keep(name, {k: v for k, v in qmodule._buffers.items()
                             if k in made and v is not None and v.device.type != "meta"})
        self.quantization_config = config.with_resolved_plan(resolved)
        checkpoint.bind_save_pretrained(model)
        return model

    def target(self, name: str) -> torch.nn.Module:
        """The planned layer or int8 embedding table ``name``."""
        return self.modules[name] if name in self.modules else self.tables[name]

    def keep(self, name: str, buffers: dict[str, torch.Tensor]) -> None:
        self.kept.setdefault(name, {}).update(buffers)

    # ------------------------------------------------------------------ per tensor
    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or not param_name.endswith(".weight"):
            return False
        if param_name[: -len(".weight")] in self.tables:
            return True
        module = self.modules.get(param_name[: -len(".weight")])
        return module is not None and module.stores_quantized_weight

    def get_quantize_ops(self):
        return _Quantize(self)

    def get_weight_conversions(self):
        """For a pre-quantized checkpoint: one converter gathering the saved pieces of each quantized weight."""
        if not self.pre_quantized:
            return []
        pieces = set()
        for module in self.modules.values():
            if module.stores_quantized_weight:
                pieces |= set(self.backend.quantized_weight_keys(module))
        if not pieces:
            return []
        return [WeightConverter(sorted(pieces, key=len, reverse=True), "weight", [_Deserialize(self)])]

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.errors:
            raise self.errors[0]
        for name, buffers in self.kept.items():
            module = self.target(name)
            for key, value in buffers.items():
                if module._buffers.get(key) is not value:
                    module._buffers[key] = value
        check_unloaded(self.backend, self.modules)
        if not self.pre_quantized:
            finish_full_precision_load(self.modules, self.torch_dtype)
        settle_modules(self.modules, self.pre_quantized, self.torch_dtype)
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if not _is_ours(c)]
        check_loaded(model)
        return model

    # ------------------------------------------------------------------ capabilities
    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _kept_in_fp32(model, dtype: torch.dtype) -> list[str]:
    """The modules transformers keeps in float32 at this load dtype (``_keep_in_fp32_modules`` for fp16 loads,
    ``_keep_in_fp32_modules_strict`` for fp16 / bf16 loads): the plan leaves them in floating point."""
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype != torch.float32 else []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return keep


def _is_ours(conversion) -> bool:
    return any(isinstance(op, _MixDQOp) for op in getattr(conversion, "operations", ()))
