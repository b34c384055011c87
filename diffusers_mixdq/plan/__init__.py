"""The plan: *what* precision each layer gets (data only; no quantization code here)."""

from .format import (
    ACTIVATION_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAN_FILENAME,
    WEIGHT_DTYPES,
    BitPlan,
    LayerSpec,
    PlanSummary,
    schema,
)
from .layers import LayerInfo, fingerprint, layer_table
from .sources import register_source, resolve_plan_source

__all__ = [
    "ACTIVATION_DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PLAN_FILENAME",
    "WEIGHT_DTYPES",
    "BitPlan",
    "LayerInfo",
    "LayerSpec",
    "PlanSummary",
    "fingerprint",
    "layer_table",
    "register_source",
    "resolve_plan_source",
    "schema",
]
