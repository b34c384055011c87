"""Build the plans of issue #14's ablation table (each stage on / off at a W4A8 average) on a bundled demo model:

    python examples/build_ablation_plans.py --model shapes --out _work/ablation/shapes
    python examples/build_ablation_plans.py --model scenes --out _work/ablation/scenes --only mixed mixed-token

The baseline ``mixed`` is the bundled ``w4a8-mixed`` build (examples/build_demo_plans.py,
examples/build_scenes_plans.py): calibrated on the first 16 prompts of the model's **calibration** set, static
int8 activation ranges, average weight bits at most 4.0, content widths {2, 4, 8}, quality {4, 8}, ``k`` picked
on 48 prompts of its **validation** set; on ``scenes`` the family's first / last layers stay in floating point
(``protect_first_last``); activations ``int8`` (static) said explicitly, whatever the builder's default. No
prompt of the **test** set that ``mixdq eval`` uses is seen.
Each ``mixed-<stage>`` variant switches one stage on (``STAGES``: its builder settings); every budget pays for what
its stage stores (outlier rows, low-rank / distilled factors), so every mixed plan stays at <= 4.0 bits.
``mixed-token-bal``: per-token activations with channel balancing (the two stages that paid in the earlier
ablations); ``mixed-token-psnr``: per-token with ``k`` picked by mean per-image PSNR. ``mixed-acts-token``
(``DERIVED``, needs ``mixed`` built first): the built ``mixed`` plan with per-token activations and its own
weight widths. References: ``uniform`` (int4 everywhere, the bundled ``w4a8-uniform``) and ``uniform-token``; the
bundled ``w8a8`` and ``w8a8-token`` (the per-token question at W8A8).

The mixed builds share ``--cache-dir`` (calibration and sensitivities; default ``<out>/cache``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from build_w3a4_plans import model_arguments, setup
from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan

#: the layers that carry low-rank / distilled factors (on every layer rank 4 costs 0.78 bits on shapes)
CONTENT = ("*attn2.*", "*.ff.*")
TOKEN = {"activations": "dynamic-token"}
#: one stage on: variant -> builder settings on top of the baseline's
STAGES = {
    "mixed": {},
    "mixed-token": TOKEN,
    "mixed-tg4": {"act_timestep_groups": 4},
    "mixed-bal": {"balance": True},
    "mixed-lr4": {"lowrank_rank": 4, "lowrank_layers": CONTENT},
    "mixed-omq5": {"outlier_fraction": 0.05},
    "mixed-distill": {"distill_seconds": 60.0, "lowrank_layers": CONTENT},
    "mixed-tail": {"pick_objective": "tail"},
    "mixed-psnr": {"pick_objective": "psnr"},
    "mixed-ctxu": {"context": "uniform"},
    "mixed-pu": {"pick_uniform": True},
    "mixed-pfl": {"protect_first_last": True},  # shapes only: scenes' baseline already protects them
    "mixed-token-bal": {**TOKEN, "balance": True},
    "mixed-token-psnr": {**TOKEN, "pick_objective": "psnr"},  # per token, k picked by mean per-image PSNR
}
#: uniform references: variant -> (weight dtype, activation range; None: calibrated static); w8a8: the bundled one
UNIFORM = {"uniform": ("int4", None), "uniform-token": ("int4", "dynamic-token"), "w8a8": ("int8", None),
           "w8a8-token": ("int8", "dynamic-token")}
#: derived from the built baseline, not built: ``mixed`` with every quantized input switched to a range per token
#: (the baseline's weight widths: what per-token does without the new pick of ``k`` a ``mixed-token`` build makes)
DERIVED = ("mixed-acts-token",)
PLANS = (*UNIFORM, *STAGES, *DERIVED)


def uniform(pipe, weights: str, act_range, common: dict, keep: list[str], base: str) -> BitPlan:
    """The calibrated uniform plan of int8 activations."""
    defaults = {"weights": weights, "activations": "int8", **({"act_range": act_range} if act_range else {})}
    plan = BitPlan(defaults=defaults, ignore=keep or None, target={"base_model": base})
    return calibrated_plan(pipe, plan, BuildSettings(**common), progress=False)


def mixed(pipe, model_name: str, stage: dict, common: dict, keep: list[str], cache: Path):
    """The baseline mixed W4A8 build with ``stage`` switched on: (plan, build report)."""
    settings = {**common, "weight_bits": 4.0, "activations": "int8", "pick_objective": "mse",  # the baseline of 14
                "refine_evaluations": 0,  # refine (a default since issue #14) pinned off: the same plans as before
                "protect_first_last": bool(keep),
                "cache_dir": str(cache),
                "pick_prompts": demo.prompt_set(model_name, "validation", 48), **stage}
    return build_plan(pipe, BuildSettings(**settings), progress=False)


def acts_per_token(plan: BitPlan) -> BitPlan:
    """``plan`` (resolved) with a run-time range per token on every quantized input (no timestep groups)."""
    data = plan.to_dict()
    for spec in data["layers"].values():
        if spec.get("activations", "none") != "none":
            spec.pop("act_groups", None)
            spec["act_range"] = "dynamic-token"
    data["provenance"] = {**(data.get("provenance") or {}), "derived": "act_range dynamic-token everywhere"}
    fields = ("target", "defaults", "rules", "ignore", "layers", "provenance")
    return BitPlan(**{k: data.get(k) for k in fields}, tensors=plan.tensors)


def main() -> None:
    args = model_arguments(__doc__, PLANS)

    torch.manual_seed(0)
    pipe, common, keep, base = setup(args.model)
    log = args.out / "builds.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (n for n in PLANS if n in args.only):
        t0 = time.perf_counter()
        record = {"variant": name}
        if name in UNIFORM:
            plan = uniform(pipe, *UNIFORM[name], common, keep, base)
        elif name in DERIVED:
            plan = acts_per_token(BitPlan.load(args.out / "mixed"))
        else:
            plan, report = mixed(pipe, args.model, STAGES[name], common, keep, args.cache_dir or args.out / "cache")
            plan.target["base_model"] = base
            record.update(chosen_k=report.chosen_k, denoiser_evaluations=report.denoiser_evaluations)
        plan.save(args.out / name)
        record.update(seconds=round(time.perf_counter() - t0, 1), avg_weight_bits=plan.summary().avg_weight_bits)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
