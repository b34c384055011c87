"""``MixDQConfig``: the ``quantization_config`` a diffusers user passes to ``from_pretrained``."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersQuantizationConfigMixin

from .apply.checkpoint import is_reference, plan_reference
from .errors import MixDQError
from .families import check_pattern
from .plan import BitPlan, resolve_plan_source
from .plan.components import component_plans, pick_component


class MixDQMethod(str, Enum):
    MIXDQ = "mixdq"


@dataclass(init=False, repr=False, eq=False)
class MixDQConfig(QuantizationConfigMixin, TransformersQuantizationConfigMixin):
    """Quantize a diffusers denoiser or a transformers text encoder with a per-layer MixDQ bit-width plan.

    One class for both libraries (it subclasses both quantization-config mixins and is registered with both), so
    ``PipelineQuantizationConfig(quant_backend="mixdq", quant_kwargs={"plan": ...})`` and ``quant_mapping`` work.

    Args:
        plan: a :class:`~diffusers_mixdq.BitPlan`, a plan dict, JSON text, a local plan ``.json`` file or a
            directory holding ``plan.json``. The plan is read and validated here, so mistakes surface before any
            weight is loaded. A saved model's config.json holds ``{"file": "mixdq_plan.json", "sha256": ...}``
            instead: a reference to the plan file beside its weights, read and hash-checked when it loads
            (:mod:`diffusers_mixdq.apply.checkpoint`).
        strict: refuse plans that leave some quantizable layer unmentioned or have rules that match nothing
            (``False``: warn and keep such layers in floating point).
        revision, subfolder, token: where to find the plan inside a repository (used by non-local plan sources).
        component: the pipeline component whose plan to use from a plan directory / repo with one folder per
            component (``unet/``, ``text_encoder/``, ...; the same as ``subfolder``). Left out for a local
            directory with several component plans, the plan is picked when a model loads: the one of the folder
            the model is read from (``text_encoder`` for a pipeline's text encoder), else the only one made for the
            model's class (:mod:`diffusers_mixdq.plan.components`).
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
        component: str | None = None,
        **kwargs: Any,
    ):
        self.quant_method = MixDQMethod.MIXDQ
        _check_arguments(strict, modules_to_not_convert, {**kwargs, "revision": revision, "subfolder": subfolder,
                                                          "token": token, "component": component})
        self.strict = strict
        self.revision = revision
        self.component = component
        self.subfolder = subfolder if subfolder is not None else component
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.plan_source = os.fspath(plan) if isinstance(plan, (str, os.PathLike)) and not _is_json(plan) else None
        self._token = token
        #: ``{"file", "sha256"}`` of the plan file beside a saved model's weights (set for configs that a loaded
        #: model carries, and for those read from a saved model's config.json; their plan comes from that file)
        self.plan_file: dict[str, str] | None = None
        #: ``{component: plan}`` of a plan directory with several component plans, until one is picked
        self._component_plans: dict[str, BitPlan] = {}
        if is_reference(plan):
            _check_reference(plan)
            self.plan_file, self._plan = {"file": plan["file"], "sha256": plan["sha256"]}, None
        else:
            self._component_plans = component_plans(plan, self.subfolder, revision=revision, token=token)
            self._plan = None if self._component_plans else resolve_plan_source(
                plan, revision=revision, subfolder=self.subfolder, token=token)
        if kwargs.get("plan_source"):
            self.plan_source = kwargs["plan_source"]
        self._local_source = self.plan_source is not None and self._source_exists(self.plan_source)

    def _source_exists(self, source: str) -> bool:
        path = Path(source) / self.subfolder if self.subfolder else Path(source)
        return path.exists() or Path(source).exists()

    # ------------------------------------------------------------------ the plan
    def plan_object(self) -> BitPlan:
        """The plan as given (not yet resolved against a model)."""
        if self._component_plans:
            raise MixDQError(
                f"This MixDQConfig holds plans for several components ({', '.join(sorted(self._component_plans))}); "
                "one is picked when a model loads with it. Pass component= to use one of them directly."
            )
        if self._plan is None:
            raise MixDQError(
                f"This MixDQConfig refers to the plan file {self.plan_file['file']} of a saved model, which has not "
                "been read: load the model with from_pretrained from the directory (or Hub repo) holding it."
            )
        return self._plan

    @property
    def plan(self) -> BitPlan:
        return self.plan_object()

    @property
    def awaits_plan_file(self) -> bool:
        """True for a config read from a saved model's config.json whose plan file has not been read yet."""
        return self._plan is None and self.plan_file is not None

    @property
    def components(self) -> list[str]:
        """The components a config made from a plan directory with several component plans can pick from."""
        return sorted(self._component_plans)

    def for_component(self, folder: str | None, class_name: str) -> MixDQConfig:
        """This config, or for one holding several component plans a copy holding the plan of the component a
        ``class_name`` model read from ``folder`` is (:func:`~diffusers_mixdq.plan.components.pick_component`)."""
        if not self._component_plans:
            return self
        name = pick_component(self._component_plans, folder, class_name)
        new = copy.copy(self)
        new._plan, new._component_plans = self._component_plans[name], {}
        new.component = new.subfolder = name
        return new

    def attach_plan_file(self, plan: BitPlan) -> None:
        """Give a config read from a saved model's config.json the plan read from its (hash-checked) file."""
        self._plan = plan

    def with_resolved_plan(self, resolved: BitPlan) -> MixDQConfig:
        """A copy of this config holding ``resolved`` (what a loaded model carries; it saves a reference to the
        plan file written beside the weights)."""
        new = copy.copy(self)
        new._plan = resolved
        new.plan_file = plan_reference(resolved)
        new.modules_to_not_convert = []
        return new

    # ------------------------------------------------------------------ serialisation (never the token)
    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method.value, "plan": self._plan_entry(), "strict": self.strict}
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.plan_source and not self._local_source and _is_repo_id(self.plan_source):
            out["plan_source"] = self.plan_source  # a Hub repo id; never a machine path
        for key in ("revision", "subfolder"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def _plan_entry(self) -> dict[str, Any]:
        """The plan as config.json holds it: a reference to the plan file (plus where a Hub plan came from) for
        a loaded model's config; the plan itself, without tensors, for a config made by hand."""
        if self._component_plans:
            return {"components": self.components}
        if self.plan_file is None:
            # tensors (e.g. the BOS state) live in the model's weights or the plan's sidecar, never in config.json
            return {k: v for k, v in self._plan.to_dict().items() if k != "tensors"}
        # recomputed from the plan held now (it may have been edited since it was loaded)
        entry: dict[str, Any] = dict(self.plan_file) if self._plan is None else plan_reference(self._plan)
        source = self._plan.provenance.get("source") if self._plan is not None else None
        if isinstance(source, dict) and "repo_id" in source:
            entry["provenance"] = {"source": dict(source)}
        return entry

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        summary = (repr(self._plan) if self._plan is not None else f"components={self.components}"
                   if self._component_plans else f"file={self.plan_file['file']!r}")
        return f"MixDQConfig(plan={summary}, strict={self.strict}, source={self.plan_source!r})"

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _check_arguments(strict: Any, modules_to_not_convert: Any, kwargs: dict[str, Any]) -> None:
    if not isinstance(strict, bool):
        raise MixDQError(f"strict must be True or False, got {strict!r}.")
    if modules_to_not_convert is not None and (
        not isinstance(modules_to_not_convert, (list, tuple))
        or not all(isinstance(m, str) for m in modules_to_not_convert)
    ):
        raise MixDQError("modules_to_not_convert must be a list of layer-name patterns (strings).")
    for pattern in modules_to_not_convert or ():
        try:
            check_pattern(pattern)
        except MixDQError as e:
            raise MixDQError(f"modules_to_not_convert: {e}") from None
    for key in ("revision", "subfolder", "plan_source", "component"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise MixDQError(f"{key} must be a string, got {kwargs[key]!r}.")
    token = kwargs.get("token")
    if token is not None and not isinstance(token, (str, bool)):
        raise MixDQError("token must be a string, True/False or None.")
    method = kwargs.get("quant_method")
    if method is not None and getattr(method, "value", method) != MixDQMethod.MIXDQ.value:
        raise MixDQError(f"quant_method must be 'mixdq' for MixDQConfig, got {method!r}.")
    unknown = set(kwargs) - {"quant_method", "plan_source", "revision", "subfolder", "token", "component"}
    if unknown:
        raise MixDQError(
            f"MixDQConfig got unknown argument(s) {sorted(unknown)}; it takes plan, strict, revision, "
            "subfolder, token, modules_to_not_convert and component."
        )


def _check_reference(plan: dict) -> None:
    """``{"file", "sha256"}`` of a saved model's plan file: a bare ``.json`` file name and a sha256 hex digest."""
    name, digest = plan.get("file"), plan.get("sha256")
    bad_name = (not isinstance(name, str) or not name.endswith(".json") or "/" in name or "\\" in name
                or name.startswith("."))
    if bad_name or not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest):
        raise MixDQError(
            f"config.json's quantization_config.plan must refer to the plan file beside the weights as "
            f'{{"file": "mixdq_plan.json", "sha256": "<64 hex digits>"}}, got {plan!r}. Restore the config.json '
            "saved with these weights, or re-save the model with save_pretrained."
        )


def _is_json(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("{")


def _is_repo_id(value: str) -> bool:
    """``namespace/name`` or ``name`` that huggingface_hub accepts as a repo id (machine paths are not)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.count("/") > 1 or value.lower().endswith(".json") or Path(value).is_absolute():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True
