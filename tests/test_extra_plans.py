"""The demo model's extra plans (packaged in diffusers_mixdq/demo/plans/shapes-extra/, used by benchmarks/peers.py)
fit it and keep their budgets."""

from __future__ import annotations

import pytest

from diffusers_mixdq import BitPlan, demo

#: plan -> (largest average weight bits, weight dtypes it may use)
BUDGETS = {
    "w5a8-mixed": (5.0, {"int2", "int4", "int8"}),
    "w4a8-uniform": (4.0, {"int4"}),
    "w3a8-mixed": (3.0, {"int2", "int4", "int8"}),
}


def test_extra_plans_are_the_budgeted_ones():
    assert set(demo.plans_in(demo.plans_dir("shapes-extra"))) == set(BUDGETS)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_extra_plan_fits_the_demo_model(name):
    from diffusers_mixdq.cli import load_model_skeleton

    plan = BitPlan.load(demo.plan_path(name, "shapes-extra"))
    unet = load_model_skeleton(demo.pipeline_path())
    assert plan.is_resolved and "bos.hidden_state" in plan.tensors
    assert plan.resolve(unet).layer_specs() == plan.layer_specs()
    specs = plan.layer_specs().values()
    budget, dtypes = BUDGETS[name]
    assert {s.weights for s in specs} <= dtypes
    assert {s.activations for s in specs} == {"int8"}
    assert plan.summary().avg_weight_bits <= budget + 1e-6


def test_below_four_bits_uses_two_bit_quality_layers():
    from diffusers_mixdq.families import family_of

    unet = family_of("UNet2DConditionModel")
    plan = BitPlan.load(demo.plan_path("w3a8-mixed", "shapes-extra"))
    quality = {s.weights for n, s in plan.layer_specs().items() if not unet.role(n, "content")}
    assert "int2" in quality


def test_every_bundled_a8_plan_is_built_with_the_builder_defaults():
    """Every bundled plan of both demo models (denoiser plans and the denoiser of each plan set) quantizes its
    inputs the way the builder does by default, and its mixed plans picked k by the default objective: a change of
    the defaults without a rebuild (examples/rebuild_bundled_plans.sh) fails here."""
    from diffusers_mixdq.builder.options import DEFAULT_ACTIVATION_MODE, DEFAULT_PICK_OBJECTIVE

    paths = [p for d in ("shapes", "shapes-extra", "scenes") for p in demo.plans_in(demo.plans_dir(d)).values()]
    paths += [p / c for d in ("shapes", "scenes") for p in demo.plan_sets_in(demo.plans_dir(d)).values()
              for c in ("unet", "transformer") if (p / c / "plan.json").is_file()]
    assert len(paths) == 2 + 3 + 5 + 2
    for path in paths:
        plan = BitPlan.load(path)
        ranges = {s.act_range for s in plan.layer_specs().values() if s.activations != "none"}
        assert ranges == {DEFAULT_ACTIVATION_MODE}, path
        allocation = plan.provenance.get("allocation")
        if allocation is not None:
            assert allocation["pick_objective"] == DEFAULT_PICK_OBJECTIVE, path
    assert sum("allocation" in BitPlan.load(p).provenance for p in paths) == 5  # the mixed ones
