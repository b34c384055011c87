"""Registers the ``mixdq`` quantization method with diffusers and with transformers (idempotent).

diffusers has no public registration API; like other out-of-tree backends we add our entries to its two lookup
tables in place. transformers has ``register_quantization_config`` / ``register_quantizer`` (which refuse a name
registered twice): they are used the first time, and an entry already there is pointed at our classes. Running
this twice (or re-importing the package) leaves one entry per table pointing at our classes. One config class,
:class:`~diffusers_mixdq.MixDQConfig`, serves both libraries, which ``PipelineQuantizationConfig(quant_backend=
"mixdq")`` requires (it builds each component's config from the library that owns the component).
"""

from __future__ import annotations

KEY = "mixdq"


def register() -> None:
    """With diffusers."""
    from diffusers.quantizers import auto

    from .apply.quantizer import MixDQQuantizer
    from .config import MixDQConfig

    auto.AUTO_QUANTIZER_MAPPING[KEY] = MixDQQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[KEY] = MixDQConfig


def register_transformers() -> None:
    """With transformers."""
    from transformers.quantizers import auto

    from .apply.transformers_quantizer import MixDQTransformersQuantizer
    from .config import MixDQConfig

    for table, register_fn, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.register_quantization_config, MixDQConfig),
        (auto.AUTO_QUANTIZER_MAPPING, auto.register_quantizer, MixDQTransformersQuantizer),
    ):
        if KEY in table:
            table[KEY] = cls
        else:
            register_fn(KEY)(cls)


def is_registered() -> bool:
    from diffusers.quantizers import auto

    from .apply.quantizer import MixDQQuantizer
    from .config import MixDQConfig

    return (
        auto.AUTO_QUANTIZER_MAPPING.get(KEY) is MixDQQuantizer
        and auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(KEY) is MixDQConfig
    )


def is_registered_with_transformers() -> bool:
    from transformers.quantizers import auto

    from .apply.transformers_quantizer import MixDQTransformersQuantizer
    from .config import MixDQConfig

    return (
        auto.AUTO_QUANTIZER_MAPPING.get(KEY) is MixDQTransformersQuantizer
        and auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(KEY) is MixDQConfig
    )
