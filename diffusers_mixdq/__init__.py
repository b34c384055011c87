"""diffusers-mixdq: mixed-precision post-training quantization of diffusion models, as a diffusers backend.

``import diffusers_mixdq`` registers the ``mixdq`` quantization method with diffusers and transformers. Data flow of the package:
``plan`` (what each layer gets) -> ``apply`` (how: a weight backend, optimum-quanto by default) -> ``builder``
(calibrate, measure, allocate, write) -> ``hub`` (share) -> ``cli``. See docs/architecture.md.

Importing the package is cheap (no torch, no diffusers): the public names load on first use (PEP 562), and the
registration with diffusers runs as soon as diffusers' quantizer tables are imported (at once if they already are;
see :mod:`._import_hooks`); the weight backends register with the registry when it is imported, the Hub as a plan
source with the plan package.
So ``mixdq --help`` does not pay for torch, and ``from diffusers import ...`` after ``import diffusers_mixdq`` finds
``quant_method="mixdq"`` registered.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from ._import_hooks import is_initializing, when_imported
from ._registration import register as _register
from ._registration import register_transformers as _register_transformers
from ._version import __version__
from .errors import MixDQError, PlanFormatError, PlanMismatchError, PlanPushError, PlanSourceError

if TYPE_CHECKING:  # pragma: no cover
    from .config import MixDQConfig
    from .plan import BitPlan, LayerSpec, PlanSummary

#: public name -> module that defines it (imported on first access)
_LAZY = {"MixDQConfig": ".config", "BitPlan": ".plan", "LayerSpec": ".plan", "PlanSummary": ".plan",
         "use_weight_backend": ".apply.backends"}


#: registering needs these three imported: the library's tables, our config and our quantizer for that library
_REGISTRATION_NEEDS = ("diffusers.quantizers", f"{__name__}.config", f"{__name__}.apply.quantizer")
_TRANSFORMERS_NEEDS = ("transformers.quantizers.auto", f"{__name__}.config",
                       f"{__name__}.apply.transformers_quantizer")


def _when_ready(needs: tuple[str, ...], module, register) -> None:
    """Register once the library's tables exist, unless one of the modules registering imports is still running
    its code (an import cycle): the last of them to finish calls this again."""
    if needs[0] not in sys.modules:
        return
    busy = [n for n in needs if n != getattr(module, "__name__", None) and is_initializing(n)]
    if not busy:
        register()


def _register_with_diffusers(module) -> None:
    _when_ready(_REGISTRATION_NEEDS, module, _register)


def _register_with_transformers(module) -> None:
    _when_ready(_TRANSFORMERS_NEEDS, module, _register_transformers)


def _register_weight_backends(_module) -> None:
    """The weight backends register themselves when their package is imported (cheap: no library is imported);
    whatever looks into the registry (plan sizes, the quantizer) finds them."""
    importlib.import_module(".apply.backends", __name__)


def _guard_pipelines(module) -> None:
    """Pipeline methods that would change some components before refusing a quantized one check first
    (``apply.guards.PIPELINE_GUARDS``; torch is imported by then)."""
    importlib.import_module(".apply.guards", __name__).guard_library_module(module)


def _register_hub_source(_module) -> None:
    importlib.import_module(".hub", __name__)  # registers the Hugging Face Hub as a plan source


for _name in _REGISTRATION_NEEDS:
    when_imported(_name, _register_with_diffusers)
for _name in _TRANSFORMERS_NEEDS:
    when_imported(_name, _register_with_transformers)
when_imported(f"{__name__}.registry", _register_weight_backends)
when_imported(f"{__name__}.plan", _register_hub_source)
for _name in ("diffusers.loaders.lora_base", "diffusers.pipelines.pipeline_utils"):
    when_imported(_name, _guard_pipelines)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BitPlan",
    "LayerSpec",
    "MixDQConfig",
    "MixDQError",
    "PlanFormatError",
    "PlanMismatchError",
    "PlanPushError",
    "PlanSourceError",
    "PlanSummary",
    "__version__",
    "use_weight_backend",
]
