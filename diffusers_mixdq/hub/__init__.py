"""Sharing plans on the Hugging Face Hub.

Importing this package registers the Hub as a plan source, so ``MixDQConfig(plan="user/repo", revision=...,
subfolder=..., token=...)`` downloads the plan through ``huggingface_hub`` (cache, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` honoured) and records the commit sha it resolved to in ``plan.provenance["source"]``.

- :func:`download_plan`: one plan from a repo;
- :func:`pipeline_quantization_config`: a ``PipelineQuantizationConfig`` for every component a plan repo covers;
- :func:`push_plan` (CLI: ``mixdq push PLAN_DIR user/repo``): publish plans and a generated model card in one
  commit;
- :func:`plan_card`: the model card alone.

The repository layout is documented in ``docs/hub.md``. Inside: ``layout`` (repo paths, collecting plans) ->
``failures`` (Hub errors turned into ours) / ``cache`` (commit, checksum, eviction) -> ``download`` / ``pipeline``
(reading) and ``card`` -> ``push`` (publishing).
"""

from ..plan import register_source
from ..plan.components import register_set_source
from .card import plan_card
from .download import download_plan, hub_plan_source, looks_like_repo_id
from .failures import list_plans
from .layout import collect_plans, component_for_class
from .pipeline import hub_plan_set, pipeline_quantization_config, plan_components
from .push import PlanPushError, push_plan

register_source(hub_plan_source)
register_set_source(hub_plan_set)

__all__ = [
    "PlanPushError",
    "collect_plans",
    "component_for_class",
    "download_plan",
    "hub_plan_source",
    "list_plans",
    "looks_like_repo_id",
    "pipeline_quantization_config",
    "plan_card",
    "plan_components",
    "push_plan",
]
