"""Registers the ``mixdq`` quantization method with diffusers (idempotent).

diffusers has no public registration API; like other out-of-tree backends we add our entries to its two lookup
tables in place. Running this twice (or re-importing the package) leaves one entry pointing at our classes.
"""

from __future__ import annotations


def register() -> None:
    from diffusers.quantizers import auto

    from .apply.quantizer import MixDQQuantizer
    from .config import MixDQConfig, MixDQMethod

    key = MixDQMethod.MIXDQ.value
    auto.AUTO_QUANTIZER_MAPPING[key] = MixDQQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = MixDQConfig


def is_registered() -> bool:
    from diffusers.quantizers import auto

    from .apply.quantizer import MixDQQuantizer
    from .config import MixDQConfig

    return (
        auto.AUTO_QUANTIZER_MAPPING.get("mixdq") is MixDQQuantizer
        and auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("mixdq") is MixDQConfig
    )
