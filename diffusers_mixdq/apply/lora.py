"""LoRA on a quantized denoiser: loading, switching and unloading adapters work (peft wraps each MixDQ module, a
``torch.nn.Linear`` subclass, and keeps the LoRA matrices in floating point beside the quantized weight); fusing
does not: peft would add the LoRA delta to ``weight.data``, which for a quantized weight is lost without an error.
So the quantizer makes ``fuse_lora`` of every model it quantizes raise :class:`~diffusers_mixdq.MixDQError` before
anything is changed (``pipe.fuse_lora()`` calls it for the denoiser)."""

from __future__ import annotations

import types

from ..errors import MixDQError


def refuse_lora_fusing(model) -> None:
    """Bind a ``fuse_lora`` that raises on the (quantized) ``model`` instance, if its class has one."""
    if not hasattr(type(model), "fuse_lora"):
        return

    def fuse_lora(self, *args, **kwargs):
        raise MixDQError(
            f"fuse_lora is not supported on this MixDQ-quantized {type(self).__name__}: the LoRA would have to be "
            "added to quantized weights. Keep the LoRA unfused (load_lora_weights / set_adapters work: it runs in "
            "floating point beside the quantized layers), or fuse it into the full-precision model, save that, and "
            "quantize the result."
        )

    model.fuse_lora = types.MethodType(fuse_lora, model)
