"""The diffusers quantizer for ``quant_method="mixdq"``: applies a resolved plan while the checkpoint streams in.

Flow inside ``ModelMixin.from_pretrained``:

1. ``_process_model_before_weight_loading`` (model still on meta): resolve the plan against the model, check it,
   and swap each planned Linear / Conv2d for a MixDQ module. For a pre-quantized checkpoint the swapped modules
   are frozen on meta so the model's state-dict keys equal the checkpoint's.
2. ``check_if_quantized_param`` / ``create_quantized_param`` (per tensor, as it is read): a full-precision weight
   is placed and quantized at once, so no full-precision copy of the whole model ever exists; the pieces of a
   saved quantized weight are gathered per module and installed together.
3. ``_process_model_after_weight_loading``: verify nothing is left on meta and record the resolved plan in the
   model's config (what ``save_pretrained`` writes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from ..errors import MixDQError, PlanMismatchError

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin


class MixDQQuantizer(DiffusersQuantizer):
    """Applies a :class:`~diffusers_mixdq.BitPlan` through diffusers' loading machinery."""

    use_keep_in_fp32_modules = True
    requires_calibration = False
    required_packages = ["optimum-quanto", "accelerate"]

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype = torch.float32
        self._modules: dict[str, torch.nn.Module] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._expected: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise MixDQError(
                "MixDQ models load onto one device: device_map spreads this model over several "
                f"({sorted(set(map(str, device_map.values())))}). Load without device_map and move the model "
                "with .to(device)."
            )

    def update_torch_dtype(self, torch_dtype):
        self.torch_dtype = torch_dtype or torch.float32
        if self.torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise MixDQError(
                f"torch_dtype={self.torch_dtype} is not supported by MixDQ; use torch.float32, torch.float16 or "
                "torch.bfloat16 (the plan decides the stored precision of each layer)."
            )
        return self.torch_dtype

    def adjust_target_dtype(self, target_dtype):
        return target_dtype

    # ------------------------------------------------------------------ before loading
    def _process_model_before_weight_loading(self, model: ModelMixin, device_map=None, keep_in_fp32_modules=(), **kw):
        from . import backend

        config = self.quantization_config
        for name, module in model.named_modules():
            if backend.is_quantized_module(module):
                raise MixDQError(
                    f"'{name}' is already quantized; a quantized module is never quantized again. Load the "
                    "original full-precision model instead."
                )
        extra_ignore = list(config.modules_to_not_convert or [])
        extra_ignore += [f"*{m}*" for m in (keep_in_fp32_modules or [])]
        resolved = config.plan_object().resolve(model, strict=config.strict, extra_ignore=extra_ignore)
        specs = resolved.layer_specs()

        replacements = {}
        for name, spec in specs.items():
            if not spec.is_quantized:
                continue
            module = model.get_submodule(name)
            replacements[name] = backend.make_module(module, spec, scale_dtype=self.torch_dtype)
        for name, qmodule in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, qmodule)
            if self.pre_quantized:
                backend.freeze_meta(qmodule)
                self._expected[name] = backend.quantized_weight_keys(qmodule)
        self._modules = replacements
        # the config the loaded model carries (and save_pretrained writes): the resolved per-layer table
        self.quantization_config = config.with_resolved_plan(resolved)
        model.register_to_config(quantization_config=self.quantization_config)

    # ------------------------------------------------------------------ per tensor
    def _owner(self, param_name: str) -> tuple[str, str] | None:
        """(module name, key relative to it) when ``param_name`` belongs to a replaced module's weight."""
        if param_name.endswith(".weight"):
            module_name, key = param_name[: -len(".weight")], "weight"
        else:
            i = param_name.rfind(".weight.")
            if i < 0:
                return None
            module_name, key = param_name[:i], param_name[i + 1 :]
        return (module_name, key) if module_name in self._modules else None

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        owner = self._owner(param_name)
        if owner is None:
            return False
        module = self._modules[owner[0]]
        if module.weight_qtype is None:
            return False
        return owner[1] != "weight" if self.pre_quantized else owner[1] == "weight"

    def check_quantized_param_shape(self, *args, **kwargs):
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        from accelerate.utils import set_module_tensor_to_device

        from . import backend

        module_name, key = self._owner(param_name)
        module = self._modules[module_name]
        if not self.pre_quantized:
            dtype = kwargs.get("dtype") or self.torch_dtype
            set_module_tensor_to_device(model, param_name, target_device, value=param_value, dtype=dtype)
            backend.quantize_weight_(module)
            return
        pending = self._pending.setdefault(module_name, {})
        pending[key] = param_value.to(target_device)
        if set(pending) >= self._expected[module_name]:
            try:
                backend.load_quantized_weight(module, pending)
            except (KeyError, RuntimeError, ValueError) as e:
                raise MixDQError(
                    f"The quantized weight of '{module_name}' in this checkpoint does not match its plan "
                    f"({e}). The checkpoint's config.json and weights disagree; re-save the model."
                ) from None
            del self._pending[module_name]

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        # activation-scale buffers are created from the plan, so a full-precision checkpoint need not have them
        return [k for k in missing_keys if not k.endswith((".input_scale", ".output_scale"))]

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        from . import backend

        if self._pending:
            raise PlanMismatchError(
                "The checkpoint lacks parts of the quantized weights of: "
                + ", ".join(sorted(self._pending)[:8])
                + ". The checkpoint is incomplete or was saved by another tool; re-save it."
            )
        unloaded = [n for n, m in self._modules.items() if backend.has_meta_tensors(m)]
        if unloaded:
            raise PlanMismatchError(
                "The checkpoint has no weights for these quantized layers: "
                + ", ".join(unloaded[:8])
                + (" ..." if len(unloaded) > 8 else "")
                + ". The checkpoint does not match the model class."
            )
        for module in self._modules.values():
            device = module.weight.device
            for name in ("input_scale", "output_scale"):
                buf = getattr(module, name)
                if buf.device != device:
                    setattr(module, name, buf.to(device))
        return model

    # ------------------------------------------------------------------ capabilities
    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True
