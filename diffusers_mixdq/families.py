"""Model families: what the package knows about each kind of denoiser, in one registry.

A :class:`ModelFamily` names, by layer-name glob patterns (``re:`` regexes work too):

* ``text_kv``: Linear layers that read the text encoder's hidden states (cross-attention K/V); they become
  BOS-aware when a plan carries a causal encoder's BOS state;
* ``content``: MixDQ's content / text-alignment group (scored by image similarity; the rest by output SQNR);
* ``first_last``: the layers that take the latent in and give the prediction out (kept in 16 bit by default);
* ``time_embedding``: timestep / conditioning embedding layers.

A denoiser class not listed falls back to :data:`GENERIC`, whose patterns fit diffusers' UNets and DiTs that use
``attn2`` for cross-attention. Add a family with ``FAMILIES.register("name", ModelFamily(...))``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from .registry import Registry

#: pipeline components that hold the denoiser, in the order they are looked for
DENOISER_COMPONENTS = ("unet", "transformer")


@dataclass(frozen=True)
class ModelFamily:
    """Layer roles of one family of denoisers (see the module docstring)."""

    name: str
    classes: tuple[str, ...] = ()
    text_kv: tuple[str, ...] = ("*attn2.to_k", "*attn2.to_v", "*.add_k_proj", "*.add_v_proj")
    content: tuple[str, ...] = ("*attn2.*", "*.ff.*")
    first_last: tuple[str, ...] = ()
    time_embedding: tuple[str, ...] = ()

    def role(self, layer: str, role: str) -> bool:
        """Whether ``layer`` matches any pattern of ``role`` (``"text_kv"``, ``"content"``, ...)."""
        return any(matches(p, layer) for p in getattr(self, role))


def matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` is matched with :func:`re.fullmatch`; anything else is a glob over the full name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


FAMILIES: Registry[ModelFamily] = Registry("model family")

GENERIC = FAMILIES.register("generic", ModelFamily("generic"))
FAMILIES.register("unet", ModelFamily(
    "unet",
    classes=("UNet2DConditionModel",),
    first_last=("conv_in", "conv_out"),
    time_embedding=("time_embedding.*", "add_embedding.*"),
))
FAMILIES.register("pixart", ModelFamily(
    "pixart",
    classes=("PixArtTransformer2DModel",),
    first_last=("pos_embed.proj", "proj_out"),
    time_embedding=("adaln_single.*", "caption_projection.*"),
))
FAMILIES.register("sd3", ModelFamily(
    "sd3",
    classes=("SD3Transformer2DModel",),
    content=("*.attn.add_*", "*.ff_context.*", "*.ff.*"),
    first_last=("pos_embed.proj", "proj_out"),
    time_embedding=("time_text_embed.*", "context_embedder"),
))
FAMILIES.register("flux", ModelFamily(
    "flux",
    classes=("FluxTransformer2DModel",),
    content=("*.attn.add_*", "*.ff_context.*", "*.ff.*"),
    first_last=("x_embedder", "proj_out"),
    time_embedding=("time_text_embed.*", "context_embedder"),
))
FAMILIES.register("wan", ModelFamily(
    "wan",
    classes=("WanTransformer3DModel",),
    first_last=("proj_out",),
    time_embedding=("condition_embedder.*",),
))


def family_of(model_or_class_name) -> ModelFamily:
    """The family of a denoiser (instance, class or class name); :data:`GENERIC` when none is registered."""
    name = model_or_class_name if isinstance(model_or_class_name, str) else _class_name(model_or_class_name)
    return FAMILIES.find(lambda f: name in f.classes) or GENERIC


def _class_name(obj) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def denoiser_of(pipe, component: str | None = None):
    """``(component name, module)`` of a pipeline's denoiser (``component`` picks one explicitly)."""
    from .errors import MixDQError

    names = (component,) if component else DENOISER_COMPONENTS
    for name in names:
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise MixDQError(
        f"{type(pipe).__name__} has no {' or '.join(repr(n) for n in names)} component to quantize; pass the name "
        "of its denoiser component."
    )
