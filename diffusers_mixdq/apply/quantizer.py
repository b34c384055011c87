"""The diffusers quantizer for ``quant_method="mixdq"``: applies a resolved plan while the checkpoint streams in.

Flow inside ``ModelMixin.from_pretrained``:

0. ``maybe_update_loaded_keys``: for a saved quantized model, read the plan file its config.json refers to from
   beside the checkpoint files (``checkpoint.py``).
1. ``_process_model_before_weight_loading`` (model still on meta): resolve the plan against the model, check it,
   and swap each planned Linear / Conv2d for a MixDQ module made by the weight backend (``model.set_submodule``).
   For a pre-quantized checkpoint the swapped modules are frozen on meta so the model's state-dict keys equal the
   checkpoint's. The model's ``save_pretrained`` is bound to also write the plan file.
2. ``check_if_quantized_param`` / ``create_quantized_param`` (per tensor, as it is read): a full-precision weight
   is placed and quantized at once, so no full-precision copy of the whole model ever exists; the pieces of a
   saved quantized weight are gathered per module and installed together.
3. ``_process_model_after_weight_loading``: verify nothing is left on meta.

Everything specific to the library that stores the weights goes through ``self.backend``
(:class:`~diffusers_mixdq.apply.backends.WeightBackend`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from ..errors import PlanMismatchError
from . import checkpoint, memory, saved_weights
from .embeddings import TABLE_BUFFERS, swap_tables
from .guards import guard_model
from .outliers import OUTLIER_BUFFERS
from .swap import (OneDeviceLoad, check_loaded, check_unloaded, config_for, finish_full_precision_load,
                   install_saved_weight, load_dtype, make_modules, quantize_placed_weight_, refuse_quantized,
                   settle_modules)
from .timestep_groups import GROUP_BUFFERS, install_clock

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin


def _single_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        values = set(device_map.values())
        device_map = values.pop() if len(values) == 1 else "cpu"
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map) if device_map not in ("auto", "balanced", "sequential") else torch.device("cpu")


class MixDQQuantizer(OneDeviceLoad, DiffusersQuantizer):
    """Applies a :class:`~diffusers_mixdq.BitPlan` through diffusers' loading machinery."""

    use_keep_in_fp32_modules = True
    library_packages = ("accelerate",)  # create_quantized_param places tensors with accelerate

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype = torch.float32
        self._modules: dict[str, torch.nn.Module] = {}
        self._tables: dict[str, torch.nn.Module] = {}  # int8 embedding tables (plan key "embeddings")
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._expected: dict[str, set[str]] = {}
        self._device = torch.device("cpu")
        self._lock = threading.Lock()
        self._since_trim = 0
        self._header: saved_weights.Header | None = None
        self._checkpoint_files: list[str] | None = None
        self._pick_backend(quantization_config)


    def update_torch_dtype(self, torch_dtype):
        self.torch_dtype = load_dtype(torch_dtype, "torch_dtype")
        return self.torch_dtype

    def adjust_target_dtype(self, target_dtype):
        return target_dtype

    # ------------------------------------------------------------------ before loading
    def _process_model_before_weight_loading(self, model: ModelMixin, device_map=None, keep_in_fp32_modules=(), **kw):
        config = config_for(self.quantization_config, model, self._checkpoint_files)
        refuse_quantized(model)
        extra_ignore = list(config.modules_to_not_convert or [])
        extra_ignore += [f"*{m}*" for m in (keep_in_fp32_modules or [])]
        resolved = config.plan_object().resolve(model, strict=config.strict, extra_ignore=extra_ignore)
        self._fit_backend(resolved)
        self._modules = self._make_modules(model, resolved)
        self._tables = swap_tables(model, resolved.embeddings, self.torch_dtype, not self.pre_quantized)
        if self.pre_quantized:  # the checkpoint's tensors against the plan, before anything is loaded
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            saved_weights.check_checkpoint(self._header, resolved.layer_specs(), resolved.manifest(),
                                           lambda name, spec, info: self.backend.expected_pieces(self._modules[name]),
                                           shapes)
        for name, qmodule in self._modules.items():
            model.set_submodule(name, qmodule)
            if self.pre_quantized and qmodule.stores_quantized_weight:
                self._expected[name] = {f"{name}.{k}" for k in self.backend.quantized_weight_keys(qmodule)}
        self._device = _single_device(device_map)
        # the config the loaded model carries: the resolved plan, saved as its own file beside the weights
        self.quantization_config = config.with_resolved_plan(resolved)
        model.register_to_config(quantization_config=self.quantization_config)
        checkpoint.bind_save_pretrained(model)
        install_clock(model)  # layers with timestep groups read the timestep of each denoiser call
        guard_model(model)

    def _make_modules(self, model, resolved) -> dict[str, torch.nn.Module]:
        return make_modules(self.backend, model, resolved, self.torch_dtype, fill_bos=not self.pre_quantized)

    # ------------------------------------------------------------------ per tensor
    # Full-precision checkpoint: each planned weight is placed, then quantized at once (create_quantized_param).
    # Pre-quantized checkpoint: the pieces of each quantized weight (weight._data, weight._scale, ...) are taken
    # out of every shard's state dict before diffusers sees them (maybe_update_state_dict), gathered per module
    # (they may straddle shards) and installed together; diffusers is told the model's plain "weight" key was
    # loaded (maybe_update_loaded_keys).

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files) -> list[str]:
        config = self.quantization_config
        self._checkpoint_files = list(checkpoint_files or [])
        if config.awaits_plan_file:
            # a saved model: config.json refers to the plan file beside the weights (called before preprocessing)
            config.attach_plan_file(checkpoint.read_plan_file(config.plan_file, checkpoint_files))
        if not self.pre_quantized:
            return loaded_keys
        self._header = saved_weights.read_headers(checkpoint_files)
        # each piece of a saved quantized weight counts as the module's "weight" (dict: unique, in order)
        return list(dict.fromkeys(self.backend.weight_key_of(key) or key for key in loaded_keys))

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.pre_quantized:
            return state_dict
        kept = {}
        complete = []
        with self._lock:
            for key, value in state_dict.items():
                owner = self._owner(key)
                if owner is None or owner[1] == "weight" or owner[0] not in self._expected:
                    kept[key] = value
                    continue
                pending = self._pending.setdefault(owner[0], {})
                pending[owner[1]] = value
                if {f"{owner[0]}.{k}" for k in pending} >= self._expected[owner[0]]:
                    complete.append(owner[0])
            ready = [(name, self._pending.pop(name)) for name in complete]
        for name, tensors in ready:
            install_saved_weight(self.backend, self._modules[name], name, tensors, self.torch_dtype, self._device)
        return kept

    def _owner(self, param_name: str) -> tuple[str, str] | None:
        """(module name, key relative to it) when ``param_name`` belongs to a replaced module's weight."""
        weight_key = param_name if param_name.endswith(".weight") else self.backend.weight_key_of(param_name)
        if weight_key is None:
            return None
        module_name = weight_key[: -len(".weight")]
        return (module_name, param_name[len(module_name) + 1 :]) if module_name in self._modules else None

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        if param_name.endswith(".weight") and param_name[: -len(".weight")] in self._tables:
            return True
        owner = self._owner(param_name)
        return owner is not None and owner[1] == "weight" and self._modules[owner[0]].stores_quantized_weight

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        from accelerate.utils import set_module_tensor_to_device

        dtype = kwargs.get("dtype") or self.torch_dtype
        set_module_tensor_to_device(model, param_name, target_device, value=param_value, dtype=dtype)
        table = self._tables.get(param_name[: -len(".weight")])
        if table is not None:
            table.quantize_()
        else:
            quantize_placed_weight_(self.backend, self._modules[self._owner(param_name)[0]])
        self._since_trim += param_value.numel() * param_value.element_size()
        # every 32 MB read, keep the allocator from hoarding the quantization temporaries
        if self._since_trim > 32 * 2**20:
            memory.release_free_memory()
            self._since_trim = 0

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        # activation scales and BOS rows are made from the plan, so a full-precision checkpoint need not have them
        made_here = (".input_scale", ".output_scale", *(f".{b}" for b in GROUP_BUFFERS))
        if not self.pre_quantized:
            made_here += (".bos_input", ".bos_output", *(f".{b}" for b in OUTLIER_BUFFERS + TABLE_BUFFERS))
        return [k for k in missing_keys if not k.endswith(made_here)]

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._pending:
            raise PlanMismatchError(
                "The checkpoint lacks parts of the quantized weights of: "
                + ", ".join(sorted(self._pending)[:8])
                + ". The checkpoint is incomplete or was saved by another tool; re-save it."
            )
        if not self.pre_quantized:
            finish_full_precision_load(self._modules, self.torch_dtype)
            # quantized weights have their own storage; copy the rest out of the full-precision checkpoint's
            # memory map so the file is unmapped, then hand freed heap pages back
            quantized = {id(m.weight) for m in self._modules.values() if m.stores_quantized_weight}
            memory.detach_from_checkpoint(model, skip=quantized)
        memory.release_free_memory()
        check_unloaded(self.backend, self._modules)
        settle_modules(self._modules, self.pre_quantized, self.torch_dtype)
        check_loaded(model)
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
