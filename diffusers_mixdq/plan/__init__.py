"""The plan: *what* precision each layer gets (data only; no quantization code here).

Modules, in data-flow order: ``spec`` (vocabulary: dtypes, constants, :class:`LayerSpec`), ``layers`` (what a model
offers: :class:`LayerInfo`, fingerprints), ``limits`` (bounds on input, checked first), ``validation`` (the JSON
Schema and the one validation), ``tensors`` (sidecar tensors against the hashes the plan records), ``files``
(``plan.json`` and its safetensors sidecar), ``resolve`` (rules against a model), ``summary`` (:class:`PlanSummary`),
``bitplan`` (:class:`BitPlan`, which ties them together) and ``sources`` (where plans come from).

Other parts of the package import plan names from here, never from the modules inside, so the modules can move.
"""

from .bitplan import BitPlan
from .files import load_tensors, save_tensors
from .layers import LayerInfo, fingerprint, layer_table
from .sources import register_source, resolve_plan_source
from .spec import (
    ACTIVATION_DTYPES,
    BOS_DEFAULT_PATTERNS,
    BOS_MATCH_TOLERANCE,
    BOS_STATE_KEY,
    DYNAMIC,
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAN_FILENAME,
    WEIGHT_DTYPES,
    LayerSpec,
)
from .summary import PlanSummary, storage_bits_per_weight
from .tensors import check_tensors, state_sha256
from .validation import schema

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
    "check_tensors",
    "schema",
    "state_sha256",
    "storage_bits_per_weight",
]
