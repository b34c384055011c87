"""diffusers-mixdq: mixed-precision post-training quantization of diffusion models, as a diffusers backend.

``import diffusers_mixdq`` registers the ``mixdq`` quantization method with diffusers. Data flow of the package:
``plan`` (what each layer gets) -> ``apply`` (how: a weight backend, optimum-quanto by default) -> ``builder``
(calibrate, measure, allocate, write) -> ``hub`` (share) -> ``cli``. See docs/architecture.md.
"""

from ._registration import register as _register
from ._version import __version__
from .config import MixDQConfig
from .errors import MixDQError, PlanFormatError, PlanMismatchError, PlanPushError, PlanSourceError
from .plan import BitPlan, LayerSpec, PlanSummary

_register()

from . import hub  # noqa: E402,F401  (registers the Hugging Face Hub as a plan source)

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
]
