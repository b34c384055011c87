"""``MixDQConfig``: the ``quantization_config`` a diffusers user passes to ``from_pretrained``."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .errors import MixDQError
from .plan import BitPlan
from .plan import resolve_plan_source


class MixDQMethod(str, Enum):
    MIXDQ = "mixdq"


@dataclass(init=False, repr=False, eq=False)
class MixDQConfig(QuantizationConfigMixin):
    """Quantize a diffusers denoiser with a per-layer MixDQ bit-width plan.

    Args:
        plan: a :class:`~diffusers_mixdq.BitPlan`, a plan dict, JSON text, a local plan ``.json`` file or a
            directory holding ``plan.json``. The plan is read and validated here, so mistakes surface before any
            weight is loaded.
        strict: refuse plans that leave some quantizable layer unmentioned or have rules that match nothing
            (``False``: warn and keep such layers in floating point).
        revision, subfolder, token: where to find the plan inside a repository (used by non-local plan sources).
        modules_to_not_convert: extra layer-name patterns to keep in floating point.

    Example::

        import diffusers_mixdq
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(
            "path/to/model", subfolder="unet",
            quantization_config=diffusers_mixdq.MixDQConfig(plan="plans/w8a8/plan.json"),
        )
    """

    def __init__(
        self,
        plan: Any = None,
        strict: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = MixDQMethod.MIXDQ
        if not isinstance(strict, bool):
            raise MixDQError(f"strict must be True or False, got {strict!r}.")
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise MixDQError("modules_to_not_convert must be a list of layer-name patterns (strings).")
        self.strict = strict
        self.revision = revision
        self.subfolder = subfolder
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.plan_source = os.fspath(plan) if isinstance(plan, (str, os.PathLike)) and not _is_json(plan) else None
        self._token = token
        self._plan = resolve_plan_source(plan, revision=revision, subfolder=subfolder, token=token)
        unknown = set(kwargs) - {"quant_method", "plan_source"}
        if unknown:
            raise MixDQError(
                f"MixDQConfig got unknown argument(s) {sorted(unknown)}; it takes plan, strict, revision, "
                "subfolder, token and modules_to_not_convert."
            )
        if kwargs.get("plan_source"):
            self.plan_source = kwargs["plan_source"]

    # ------------------------------------------------------------------ the plan
    def plan_object(self) -> BitPlan:
        """The plan as given (not yet resolved against a model)."""
        return self._plan

    @property
    def plan(self) -> BitPlan:
        return self._plan

    def with_resolved_plan(self, resolved: BitPlan) -> MixDQConfig:
        """A copy of this config holding ``resolved`` (what a loaded model carries and saves)."""
        new = copy.copy(self)
        new._plan = resolved
        new.modules_to_not_convert = []
        return new

    # ------------------------------------------------------------------ serialisation (never the token)
    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": self.quant_method.value,
            # tensors (e.g. the BOS state) live in the model's weights or the plan's sidecar, never in config.json
            "plan": {k: v for k, v in self._plan.to_dict().items() if k != "tensors"},
            "strict": self.strict,
        }
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        for key in ("plan_source", "revision", "subfolder"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        summary = repr(self._plan)
        return f"MixDQConfig(plan={summary}, strict={self.strict}, source={self.plan_source!r})"

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _is_json(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("{")
