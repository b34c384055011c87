"""The model card (``README.md``) of a plan repository, built with huggingface_hub's ``ModelCard``.

YAML metadata: ``base_model`` (from the plans' ``target.base_model`` when it is a Hub repo id, never a local
path, with ``base_model_relation: quantized``), ``library_name: diffusers`` and the tags ``mixdq``, ``quantization``,
``diffusers``, ``mixed-precision``. Body: the plans in the repo, a summary per plan (a table of weight widths,
average bits, estimated size vs FP16 for resolved plans; defaults, rules and ignore list for rule-based ones, whose
summary depends on the model), how each was built (budget, metrics, allocation, cost: :mod:`.provenance`; the raw
record folded away), the file layout and a usage snippet. The card has no timestamps: the same plans give the same
card.
"""

from __future__ import annotations

import json
from typing import Mapping

from .._version import __version__
from ..families import DENOISER_COMPONENTS, FAMILIES
from ..plan import BitPlan
from .layout import SIDECAR_FILENAME, component_for_class, plan_path
from .provenance import is_hub_id, provenance_rows

TAGS = ["mixdq", "quantization", "diffusers", "mixed-precision"]


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _base_models(plans: Mapping[str, BitPlan]) -> list[str]:
    """The Hub repo ids the plans were built for (a local base model directory is no metadata: see
    :func:`.provenance.is_hub_id`)."""
    seen: list[str] = []
    for plan in plans.values():
        base = plan.target.get("base_model")
        if is_hub_id(base, plan.provenance) and base not in seen:
            seen.append(base)
    return seen


def _component(folder: str, plan: BitPlan) -> str | None:
    return folder or component_for_class(plan.target.get("class_name"))


def _summary_section(plan: BitPlan) -> list[str]:
    if plan.is_resolved:
        rows = plan.summary().rows()
        out = _widths_table(plan) + ["", "| | |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
        out += [
            "",
            "Sizes count the quantizable (Linear / Conv2d) layers only, scales included; the model's other "
            "parameters stay in its floating-point dtype.",
        ]
        return out
    out = [
        "This plan is rule-based: which layer gets which width depends on the model it is applied to, so its "
        "summary needs the model (`mixdq inspect PLAN --model PATH`). Its rules, applied in this order (later ones "
        "override earlier ones, key by key):",
        "",
    ]
    if plan.defaults is not None:
        d = plan.defaults
        out.append(
            f"- **defaults**: weights `{d.get('weights', 'none')}`, activations `{d.get('activations', 'none')}`"
            + (f", range `{d['act_range']}`" if d.get("act_range") is not None else "")
        )
    if plan.rules:
        out += ["", "| targets | weights | activations | range | note |", "|---|---|---|---|---|"]
        for rule in plan.rules:
            targets = ", ".join(f"`{t}`" for t in rule["targets"])
            out.append(
                f"| {_cell(targets)} | {_cell(rule.get('weights', ''))} | {_cell(rule.get('activations', ''))} | "
                f"{_cell(rule.get('act_range', ''))} | {_cell(rule.get('note', ''))} |"
            )
        out.append("")
    if plan.ignore:
        out.append("- **kept in floating point**: " + ", ".join(f"`{p}`" for p in plan.ignore))
    if plan.layers:
        out.append(f"- **explicit per-layer entries**: {len(plan.layers)}")
    return out


def _example_class(component: str) -> str:
    """A denoiser class of the first registered model family whose classes fit ``component`` (for the snippet)."""
    family = FAMILIES.find(lambda f: any(component_for_class(c) == component for c in f.classes))
    return family.classes[0] if family else "UNet2DConditionModel"


def _widths_table(plan: BitPlan) -> list[str]:
    """Layers and parameters per weight width, widest share first."""
    manifest = plan.manifest() or {}
    layers: dict[str, int] = {}
    params: dict[str, int] = {}
    for name, spec in plan.layer_specs().items():
        layers[spec.weights] = layers.get(spec.weights, 0) + 1
        params[spec.weights] = params.get(spec.weights, 0) + (manifest[name].numel if name in manifest else 0)
    total = sum(params.values()) or 1
    out = ["| weights | layers | parameters | share of parameters |", "|---|---|---|---|"]
    for dtype in sorted(layers, key=lambda d: -params[d]):
        shown = "floating point (not quantized)" if dtype == "none" else dtype
        out.append(f"| {shown} | {layers[dtype]} | {params[dtype]:,} | {100 * params[dtype] / total:.1f}% |")
    return out


def _provenance_section(plan: BitPlan) -> list[str]:
    if not plan.provenance:
        return ["No provenance recorded (the plan was written by hand, or by a tool that records none)."]
    out = ["| | |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in provenance_rows(plan.provenance, plan.target, public=True)]
    return out + [
        "",
        "<details><summary>The full record (<code>provenance</code> in plan.json)</summary>",
        "",
        "```json",
        json.dumps(plan.provenance, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "</details>",
    ]


def _usage(repo_id: str, plans: Mapping[str, BitPlan], bases: list[str]) -> list[str]:
    base = bases[0] if len(bases) == 1 else "path/or/repo-of-the-base-model"
    folder, plan = next(iter(plans.items()))
    component = _component(folder, plan) or DENOISER_COMPONENTS[0]
    cls = plan.target.get("class_name") or _example_class(component)
    sub = f', subfolder="{folder}"' if folder else ""
    model_sub = f'"{component}"'
    root_arg = ""
    if "" in plans and _component("", plans[""]) is None:
        root_arg = f', root_component="{DENOISER_COMPONENTS[0]}"'
    return [
        "```python",
        "import torch",
        "import diffusers_mixdq  # registers the 'mixdq' quantization backend with diffusers",
        "from diffusers import DiffusionPipeline",
        "from diffusers_mixdq.hub import pipeline_quantization_config",
        "",
        "# the whole pipeline: every component this repo has a plan for is quantized while loading",
        "pipe = DiffusionPipeline.from_pretrained(",
        f'    "{base}", dtype=torch.float16,',
        f'    quantization_config=pipeline_quantization_config("{repo_id}"{root_arg}),',
        ")",
        "```",
        "",
        "One model:",
        "",
        "```python",
        "import torch",
        "import diffusers_mixdq",
        f"from diffusers import {cls}",
        "",
        f"model = {cls}.from_pretrained(",
        f'    "{base}", subfolder={model_sub}, dtype=torch.float16,',
        f'    quantization_config=diffusers_mixdq.MixDQConfig(plan="{repo_id}"{sub}),',
        ")",
        "```",
        "",
        'Pass `revision="<commit sha>"` to pin the plan; the loaded model records the commit it used in '
        '`model.config.quantization_config.plan.provenance["source"]`. A model saved with `save_pretrained` after '
        "loading is pre-quantized and reloads with only `import diffusers_mixdq`.",
    ]


def _plans_table(plans: Mapping[str, BitPlan]) -> list[str]:
    lines = ["| component | file | model class | kind |", "|---|---|---|---|"]
    for folder, plan in plans.items():
        files = f"`{plan_path(folder)}`"
        if plan.tensors:
            files += f" + `{folder + '/' if folder else ''}{SIDECAR_FILENAME}`"
        kind = f"resolved, {len(plan.layers)} layers" if plan.is_resolved else "rule-based"
        component = _component(folder, plan) or "(the pipeline's denoiser)"
        lines.append(f"| {component} | {files} | {plan.target.get('class_name') or '-'} | {kind} |")
    return lines


def plan_card(plans: Mapping[str, BitPlan], repo_id: str):
    """The :class:`huggingface_hub.ModelCard` for a plan repository holding ``plans`` (``{folder: plan}``,
    ``""`` for the root)."""
    from huggingface_hub import ModelCard, ModelCardData

    bases = _base_models(plans)
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        base_model_relation="quantized" if bases else None,
        library_name="diffusers",
        tags=list(TAGS),
    )
    lines = [f"# MixDQ quantization plan: {repo_id}", ""]
    lines.append(
        "Mixed-precision post-training quantization plan"
        + (" for " + ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) if bases else "")
        + " made with diffusers-mixdq (the `mixdq` quantization backend for 🧨 diffusers): every Linear / "
        "Conv2d layer (of the denoiser, and of the text encoders where the repository has their plans) gets its own "
        "weight precision (int2 to int8, float8 or floating point) and activation precision. It is applied inside "
        "`from_pretrained`, storing weights in optimum-quanto's layout (int3 / int5 / int6 widths and outlier rows "
        "load into diffusers-mixdq's native weight backend, picked automatically)."
    )
    lines += ["", "## Plans in this repository", ""] + _plans_table(plans)
    for folder, plan in plans.items():
        title = _component(folder, plan) or "plan"
        lines += ["", f"## {title}: summary", ""] + _summary_section(plan)
        lines += ["", f"### {title}: how it was built", ""] + _provenance_section(plan)
    lines += ["", "## Usage", ""] + _usage(repo_id, plans, bases)
    lines += [
        "",
        "## Layout",
        "",
        "`plan.json` (plan format v1, see diffusers-mixdq's `docs/plan-format.md`) and, when the plan carries "
        f"tensors, its safetensors sidecar `{SIDECAR_FILENAME}`, at the repository root or in one folder per "
        "pipeline component (`unet/`, `transformer/`, ...). This card is generated by `mixdq push` "
        f"(diffusers-mixdq {__version__}).",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)
