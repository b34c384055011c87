"""Methods of diffusers' models that a quantized model answers with a clear :class:`~diffusers_mixdq.MixDQError`
(bound on each model instance the quantizer loads, before anything is changed).

* ``fuse_lora``: loading, switching and unloading LoRA adapters work on a quantized denoiser (peft wraps each MixDQ
  module, a ``torch.nn.Linear`` subclass, and keeps the LoRA matrices in floating point beside the quantized
  weight), but fusing does not: peft adds the LoRA delta to ``weight.data``, which for a quantized weight is lost
  without an error. A pipeline's ``fuse_lora`` (diffusers' ``LoraBaseMixin.fuse_lora``, which every pipeline's
  ends in) is wrapped once diffusers' LoRA loaders are imported (:func:`guard_library_module`): it refuses when
  any component it would fuse has LoRA layers over MixDQ modules (a quantized text encoder included, which has no
  ``fuse_lora`` of its own), before any component is fused.
* ``enable_group_offload`` onto a device this machine does not have (e.g. CUDA on a CPU-only machine) would fail
  only at the first forward, deep inside a hook; it is refused at once. Group offloading itself works with
  quantized modules (tested CPU -> CPU here, CUDA in ``tests/test_offload.py`` where CUDA exists). A pipeline's
  ``enable_group_offload`` holding MixDQ modules checks the device before hooking any component.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from ..errors import MixDQError


def guard_model(model) -> None:
    """Bind the guarded methods on a quantized diffusers ``model`` (those its class has)."""
    cls = type(model)
    if hasattr(cls, "fuse_lora"):
        model.fuse_lora = types.MethodType(_refuse_fuse_lora, model)
    if hasattr(cls, "enable_group_offload"):
        model.enable_group_offload = types.MethodType(_checked_group_offload(cls.enable_group_offload), model)


def _refuse_fuse_lora(self, *args, **kwargs):
    raise _fuse_refusal(type(self).__name__)


def _fuse_refusal(what: str) -> MixDQError:
    return MixDQError(
        f"fuse_lora is not supported on this MixDQ-quantized {what}: the LoRA would have to be "
        "added to quantized weights. Keep the LoRA unfused (load_lora_weights / set_adapters work: it runs in "
        "floating point beside the quantized layers), or fuse it into the full-precision model, save that, and "
        "quantize the result."
    )


def guard_library_module(module) -> None:
    """Guard the pipeline methods of a just-imported diffusers ``module`` (one named in :data:`PIPELINE_GUARDS`;
    idempotent). Pipelines without MixDQ modules are unaffected."""
    class_name, method, check = PIPELINE_GUARDS[module.__name__]
    cls = getattr(module, class_name)
    original = getattr(cls, method)
    if getattr(original, "_mixdq_guarded", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        check(self, signature.bind(self, *args, **kwargs).arguments)  # raises before the method changes anything
        return original(self, *args, **kwargs)

    guarded._mixdq_guarded = True
    setattr(cls, method, guarded)


def _check_fuse_lora(pipe, arguments) -> None:
    for name in arguments.get("components") or []:
        model = getattr(pipe, name, None)
        if model is not None and _lora_over_quantized(model):
            raise _fuse_refusal(f"{name} ({type(model).__name__})")


def _check_group_offload(pipe, arguments) -> None:
    from .qmodule import is_mixdq_module

    models = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if any(is_mixdq_module(m) for model in models for m in model.modules()):
        check_device_available(arguments["onload_device"], "group offloading (onload_device)")


#: diffusers module -> (class, method, check run before the method): a pipeline's ``fuse_lora`` (every pipeline's
#: ends in ``LoraBaseMixin.fuse_lora``) and ``enable_group_offload``, which would otherwise change some components
#: before reaching the one that refuses
PIPELINE_GUARDS = {
    "diffusers.loaders.lora_base": ("LoraBaseMixin", "fuse_lora", _check_fuse_lora),
    "diffusers.pipelines.pipeline_utils": ("DiffusionPipeline", "enable_group_offload", _check_group_offload),
}


def _lora_over_quantized(model) -> bool:
    """Whether a LoRA layer (peft's, holding its wrapped layer as ``base_layer``) wraps a MixDQ module."""
    from .qmodule import is_mixdq_module

    return any(is_mixdq_module(getattr(m, "base_layer", None)) for m in model.modules())


def _checked_group_offload(original):
    @functools.wraps(original)
    def enable_group_offload(self, onload_device, *args, **kwargs):
        check_device_available(onload_device, "group offloading (onload_device)")
        return original(self, onload_device, *args, **kwargs)

    return enable_group_offload


def check_device_available(device, purpose: str) -> None:
    """Raise :class:`MixDQError` unless ``device`` exists on this machine."""
    device = torch.device(device)
    if device.type == "cpu" or device.type == "meta":
        return
    module = getattr(torch, device.type, None)
    available = module is not None and getattr(module, "is_available", lambda: False)()
    if available and device.index is not None:
        available = device.index < module.device_count()
    if not available:
        raise MixDQError(
            f"{purpose} needs the device '{device}', which this machine does not have. On a CPU-only machine run "
            "the quantized model on the CPU (no offloading is needed: quantized weights already save memory), or "
            "pass a device that exists."
        )
