"""The plan: *what* precision each layer gets (data only; no quantization code here).

Other parts of the package import plan names from here, never from the modules inside, so the modules can move.
"""

from .format import (
    ACTIVATION_DTYPES,
    BOS_DEFAULT_PATTERNS,
    BOS_MATCH_TOLERANCE,
    BOS_STATE_KEY,
    DYNAMIC,
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAN_FILENAME,
    WEIGHT_DTYPES,
    BitPlan,
    LayerSpec,
    PlanSummary,
    schema,
    storage_bits_per_weight,
)
from .layers import LayerInfo, fingerprint, layer_table
from .sources import register_source, resolve_plan_source
from .tensors import load_tensors, save_tensors

__all__ = [
    "ACTIVATION_DTYPES",
    "BOS_DEFAULT_PATTERNS",
    "BOS_MATCH_TOLERANCE",
    "BOS_STATE_KEY",
    "DYNAMIC",
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
    "load_tensors",
    "register_source",
    "resolve_plan_source",
    "save_tensors",
    "schema",
    "storage_bits_per_weight",
]
