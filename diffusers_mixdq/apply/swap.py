"""What both quantizers (diffusers' ``quantizer.py``, transformers' ``transformers_quantizer.py``) do alike: pick a
component plan, swap planned layers for MixDQ modules before loading, install saved quantized weights, and check
the loaded model."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import MixDQError, PlanMismatchError
from ..plan import BOS_STATE_KEY
from ..plan.components import folder_of
from . import saved_weights
from .backends import backend_for, backend_named
from .bos_rows import compute_bos_row_, finish_bos_, set_bos_state
from .corrections import attach_corrections, prepare_weight_
from .outliers import compute_outlier_rows_, has_outliers
from .qmodule import is_mixdq_module


#: the dtypes a MixDQ model loads in (the plan decides each layer's stored precision)
LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device_map(device_map) -> None:
    """MixDQ models load onto one device."""
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
        raise MixDQError(
            "MixDQ models load onto one device: device_map spreads this model over several "
            f"({sorted(set(map(str, device_map.values())))}). Load without device_map and move the model "
            "with .to(device)."
        )


class OneDeviceLoad:
    """Mixed into both quantizers: what they declare to their library (the packages: the library's own
    ``library_packages`` and those of the weight backend the config names), the backend, and the checks before
    loading (the backend's packages are installed, one device)."""

    requires_calibration = False
    #: packages the quantizer itself needs, whatever the weight backend
    library_packages: tuple[str, ...] = ()
    required_packages: list[str] = []

    def _pick_backend(self, quantization_config) -> None:
        self._backend_name = getattr(quantization_config, "weight_backend", None)
        self._use(backend_named(self._backend_name))

    def _fit_backend(self, resolved) -> None:
        """The backend that stores every weight dtype of the resolved plan (:func:`~.backends.backend_for`), its
        packages checked again when it is not the one the config named."""
        backend = backend_for(self._backend_name, resolved.layer_specs().values())
        if backend is not self.backend:
            check_backend_installed(backend)
            self._use(backend)

    def _use(self, backend) -> None:
        self.backend = backend
        self.required_packages = [*backend.required_packages, *self.library_packages]

    def validate_environment(self, *args, **kwargs):
        check_backend_installed(self.backend)
        check_device_map(kwargs.get("device_map"))


def check_backend_installed(backend) -> None:
    """A :class:`MixDQError` naming what to install (or which backend to pick) when ``backend``'s packages are
    missing."""
    missing = backend.missing_packages()
    if not missing:
        return
    from ..registry import WEIGHT_BACKENDS

    usable = [n for n, b in WEIGHT_BACKENDS.items() if n != backend.name and not b.missing_packages()]
    hint = ""
    if usable:
        hint = (f', or use another weight backend: MixDQConfig(..., weight_backend="{usable[0]}"), or for a saved '
                f'model `with diffusers_mixdq.use_weight_backend("{usable[0]}"): ...from_pretrained(path)`')
    raise MixDQError(f"The weight backend '{backend.name}' needs {', '.join(missing)}, which is not installed. "
                     f"Install it (pip install {' '.join(missing)}){hint}.")


def load_dtype(dtype, argument: str) -> torch.dtype:
    """``dtype`` (``None``: float32) if MixDQ supports loading in it, else a :class:`MixDQError`."""
    dtype = dtype or torch.float32
    if dtype not in LOAD_DTYPES:
        raise MixDQError(
            f"{argument}={dtype} is not supported by MixDQ; use torch.float32, torch.float16 or "
            "torch.bfloat16 (the plan decides the stored precision of each layer)."
        )
    return dtype


def refuse_quantized(model) -> None:
    for name, module in model.named_modules():
        if is_mixdq_module(module):
            raise MixDQError(
                f"'{name}' is already quantized; a quantized module is never quantized again. Load the "
                "original full-precision model instead."
            )


def config_for(config, model, checkpoint_files: Sequence[str] | None):
    """``config``, or the config of the component ``model`` is, for a config holding several component plans."""
    return config.for_component(folder_of(checkpoint_files), type(model).__name__)


def make_modules(backend, model, resolved, scale_dtype: torch.dtype, fill_bos: bool) -> dict[str, torch.nn.Module]:
    """A MixDQ module for every layer the plan quantizes (BOS-aware ones given the plan's BOS state when
    ``fill_bos``, i.e. when they are made from full-precision weights)."""
    backend.prepare()
    bos_state = resolved.tensors.get(BOS_STATE_KEY)
    replacements = {}
    for name, spec in resolved.layer_specs().items():
        if not spec.is_quantized:
            continue
        qmodule = backend.make_module(model.get_submodule(name), spec, scale_dtype=scale_dtype)
        attach_corrections(qmodule, name, spec, resolved.tensors)
        if qmodule.bos_aware and fill_bos:
            if bos_state is None:
                raise MixDQError(
                    f"Layer '{name}' is BOS-aware, but the plan carries no BOS hidden state to compute its "
                    "BOS row from. Attach it with diffusers_mixdq.bos.attach_bos(plan, "
                    "bos_hidden_state(pipe)), or set flags {\"bos_aware\": false} for these layers."
                )
            set_bos_state(qmodule, bos_state)
        replacements[name] = qmodule
    return replacements


def quantize_placed_weight_(backend, module) -> None:
    """A planned layer's full-precision weight was just placed: its BOS row, its corrections (balancing /
    low-rank: the weight that is quantized), its outlier rows (from the corrected weight), then the backend
    quantizes it. The same steps, in this order, for every library that loads the model."""
    if module.bos_aware:
        compute_bos_row_(module)
    prepare_weight_(module)
    if has_outliers(module):
        compute_outlier_rows_(module)
    backend.quantize_weight_(module)


def finish_full_precision_load(modules, dtype: torch.dtype) -> None:
    """After a full-precision checkpoint is loaded: BOS rows get their bias and dtype, layers whose weight the
    plan keeps in floating point are balanced / corrected once."""
    for module in modules.values():
        if module.bos_aware:
            finish_bos_(module, dtype)
        if not module.stores_quantized_weight:
            prepare_weight_(module)


def install_saved_weight(backend, module, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                         device) -> None:
    """Install the saved pieces of a quantized weight (``weight._data``, ``weight._scale``, ...) into ``module``."""
    tensors = saved_weights.cast_floating_pieces(tensors, dtype)
    bad = saved_weights.non_finite(tensors)
    if bad:
        raise MixDQError(f"The quantized weight of '{name}' in this checkpoint has NaN or infinite "
                         f"{', '.join(bad)}: the checkpoint is corrupted. Re-download or re-save the model.")
    try:
        backend.load_quantized_weight(module, tensors, device)
    except (KeyError, RuntimeError, ValueError) as e:
        raise MixDQError(
            f"The quantized weight of '{name}' in this checkpoint does not match its plan ({e}). The "
            "checkpoint's config.json and weights disagree; re-save the model."
        ) from None


def check_loaded(model) -> None:
    """No tensor of the loaded model is left on the meta device."""
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if on_meta:
        raise PlanMismatchError(
            "After loading, these tensors still have no values (the checkpoint does not hold them, or holds them "
            f"under other names): {', '.join(on_meta[:8])}{' ...' if len(on_meta) > 8 else ''}. The checkpoint does "
            "not match its config.json / plan; restore the files saved together, or re-save the model."
        )


def check_unloaded(backend, modules) -> None:
    """Every quantized layer got its weight from the checkpoint."""
    unloaded = [n for n, m in modules.items() if backend.has_meta_tensors(m)]
    if unloaded:
        raise PlanMismatchError(
            "The checkpoint has no weights for these quantized layers: "
            + ", ".join(unloaded[:8])
            + (" ..." if len(unloaded) > 8 else "")
            + ". The checkpoint does not match the model class."
        )


def settle_modules(modules: "dict[str, torch.nn.Module]", pre_quantized: bool, torch_dtype) -> None:
    """After loading: each module's scales on its weight's device, a pre-quantized checkpoint's small buffers cast
    to the model's dtype and checked."""
    for module in modules.values():
        module.move_scales_to_weight_device()
        if pre_quantized:
            module.cast_buffers_(torch_dtype)
    if pre_quantized:
        saved_weights.check_small_buffers(modules)
