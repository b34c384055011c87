"""Outlier-aware intra-layer widths (MPQ-DM's OMQ, plan key ``outliers``): kurtosis picks the planted outlier
channels, their int8 rows lower the error, sizes count them, plans are checked, pre-quantized round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet, rel_err, unet_inputs
from diffusers import UNet2DConditionModel

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanFormatError, PlanMismatchError
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.outlier_channels import kurtosis, outlier_channels, outlier_stage
from diffusers_mixdq.plan import storage_bits_per_weight
from diffusers_mixdq.plan.extras import outlier_bits

LAYER = "down_blocks.0.attentions.0.proj_in"  # Linear 32 -> 32
CONV = "down_blocks.0.resnets.0.conv1"
PLANTED = {LAYER: [3, 17], CONV: [5]}


@pytest.fixture(scope="module")
def outlier_unet_dir(tmp_path_factory):
    """The tiny UNet with a few output channels made outlier-heavy (one weight 40x the others in the row)."""
    unet = make_unet()
    with torch.no_grad():
        for name, rows in PLANTED.items():
            w = unet.get_submodule(name).weight
            for r in rows:
                w[r].view(-1)[7] = 40 * w[r].abs().max()
    path = tmp_path_factory.mktemp("outlier-unet")
    unet.save_pretrained(path)
    return path


def plan_for(unet, fraction: float) -> BitPlan:
    resolved = BitPlan(defaults={"weights": "int4"}).resolve(unet)
    return outlier_stage(resolved, unet, fraction) if fraction else resolved


def load(path, plan):
    return UNet2DConditionModel.from_pretrained(path, quantization_config=MixDQConfig(plan=plan))


def test_kurtosis_finds_the_planted_channels(outlier_unet_dir):
    unet = UNet2DConditionModel.from_pretrained(outlier_unet_dir)
    assert kurtosis(torch.randn(4, 20000)).tolist() == pytest.approx([3.0] * 4, abs=0.2)
    assert outlier_channels(unet.get_submodule(LAYER).weight, 2 / 32) == PLANTED[LAYER]
    assert outlier_channels(unet.get_submodule(CONV).weight, 1 / 32) == PLANTED[CONV]
    plan = plan_for(unet, 0.05)
    assert plan.layers[LAYER]["outliers"]["channels"] == PLANTED[LAYER]


def test_outlier_rows_lower_the_error(outlier_unet_dir):
    fp = UNet2DConditionModel.from_pretrained(outlier_unet_dir).eval()
    plan = plan_for(fp, 0.05)
    x, t, e = unet_inputs()
    with torch.no_grad():
        ref = fp(x, t, e).sample
        layer_in = {}
        fp.get_submodule(LAYER).register_forward_pre_hook(lambda m, a: layer_in.setdefault("x", a[0]))
        fp(x, t, e)
        errs = {}
        for name, p in (("omq", plan), ("plain", plan_for(fp, 0))):
            model = load(outlier_unet_dir, p)
            q = model.get_submodule(LAYER)
            errs[name] = (rel_err(q(layer_in["x"]), fp.get_submodule(LAYER)(layer_in["x"])),
                          rel_err(model(x, t, e).sample, ref))
    assert errs["omq"][0] < 0.5 * errs["plain"][0]  # the layer
    assert errs["omq"][1] < errs["plain"][1]  # the whole UNet


def test_sizes_count_the_outlier_rows():
    unet = make_unet()
    plain, omq = plan_for(unet, 0), plan_for(unet, 0.05)
    specs, manifest = omq.layer_specs(), omq.manifest()
    added = sum(outlier_bits(s, manifest[n].in_features) for n, s in specs.items())
    # each outlier row is stored once: at int8, no longer at the layer's width (rows of in_features elements)
    dropped = sum(len(s.outlier_channels) * manifest[n].numel // manifest[n].shape[0]
                  * storage_bits_per_weight("int4", manifest[n]) for n, s in specs.items())
    assert added > 0
    assert omq.summary().size_bytes == pytest.approx(plain.summary().size_bytes + (added - dropped) / 8)
    assert omq.summary().avg_weight_bits > plain.summary().avg_weight_bits
    k = len(specs[LAYER].outlier_channels)
    assert outlier_bits(specs[LAYER], 32) == k * (8 * 32 + 16 + 32)


def test_pre_quantized_round_trip(outlier_unet_dir, tmp_path):
    fp = UNet2DConditionModel.from_pretrained(outlier_unet_dir)
    model = load(outlier_unet_dir, plan_for(fp, 0.05))
    q = model.get_submodule(LAYER)
    assert q.outlier_weight.dtype == torch.int8 and q.outlier_channels.tolist() == PLANTED[LAYER]
    x, t, e = unet_inputs()
    with torch.no_grad():
        expected = model(x, t, e).sample
    model.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_submodule(LAYER).outlier_weight, q.outlier_weight)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, e).sample, expected)


@pytest.mark.parametrize("entry, error, message", [
    ({"weights": "int8", "outliers": {"weights": "int8", "channels": [1]}}, PlanMismatchError, "only int6/int5/int4/int3/int2"),
    ({"weights": "int4", "outliers": {"weights": "int8", "channels": [32]}}, PlanMismatchError, "32 output"),
    ({"weights": "int4", "outliers": {"weights": "int4", "channels": [1]}}, PlanFormatError, "outliers"),
    ({"weights": "int4", "outliers": {"weights": "int8", "channels": [1, 1]}}, PlanFormatError, "outliers"),
    ({"weights": "int4", "outliers": {"weights": "int8"}}, PlanFormatError, "channels"),
])
def test_malformed_outliers_are_refused(entry, error, message):
    with pytest.raises(error, match=message):
        BitPlan(defaults={"weights": "int4"}, layers={LAYER: entry}).resolve(make_unet())


def test_outliers_only_in_a_layer_entry_and_builder_option():
    with pytest.raises(PlanFormatError, match="belongs in that layer's entry"):
        BitPlan(defaults={"weights": "int4", "outliers": {"weights": "int8", "channels": [1]}})
    BuildSettings(prompts=["a"], outlier_fraction=0.05).validate()
    with pytest.raises(MixDQError, match="outlier_fraction"):
        BuildSettings(prompts=["a"], outlier_fraction=0.9).validate()


def test_recipe_keys_reach_the_settings():
    from diffusers_mixdq.builder.recipe import load_recipe

    r = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4, "outlier_fraction": 0.05},
                     "activations": {"mode": "int8", "timestep_groups": 4}})
    s = r.settings()
    assert (s.outlier_fraction, s.act_timestep_groups) == (0.05, 4)
    assert load_recipe({"pipeline": "x", "weights": {"budget_bits": 4},
                        "activations": "dynamic-token"}).settings().activations == "dynamic-token"
    with pytest.raises(MixDQError, match="weights.outlier_fraction"):
        load_recipe({"pipeline": "x", "weights": {"budget_bits": 4, "outlier_fraction": -1}})
    with pytest.raises(MixDQError, match="timestep_groups"):
        load_recipe({"pipeline": "x", "weights": {"budget_bits": 4},
                     "activations": {"mode": "dynamic-token", "timestep_groups": 4}})


def test_allocator_budget_leaves_room_for_the_rows():
    from diffusers_mixdq.builder.plan_stages import allocator_budget, outlier_overhead

    unet = make_unet()
    s = BuildSettings(prompts=["a"], weight_bits=4.0, outlier_fraction=0.05)
    reduced = allocator_budget(s, unet)
    # a uniform int4 plan with outlier rows on every layer needs exactly the room left
    assert reduced.weight_bits == pytest.approx(4.0 - outlier_overhead(unet, 0.05))
    assert plan_for(unet, 0.05).summary().avg_weight_bits <= 4.0 + outlier_overhead(unet, 0.05) + 1e-9
    assert allocator_budget(BuildSettings(prompts=["a"]), unet).weight_bits == 4.0


def test_kurtosis_is_taken_of_the_balanced_weight():
    """After balancing, the rows heavy-tailed in the weight that is quantized (W diag(s)) get the int8 copies."""
    from diffusers_mixdq.plan.layer_tensors import balance_key, tensors_sha256

    unet = make_unet()
    w = unet.get_submodule(LAYER).weight
    with torch.no_grad():
        w[3, 7] = 40 * w[3].abs().max()  # the heaviest row of W ...
        w[20, 11] = 10 * w[20].abs().max()  # the second
    s = torch.ones(w.shape[1])
    s[7] = 1e-3  # ... but balancing shrinks column 7: in W diag(s) row 20 is the heaviest
    resolved = BitPlan(defaults={"weights": "int4"}).resolve(unet)
    data = resolved.to_dict()
    data["layers"][LAYER]["flags"] = {"balance": {"alpha": 0.5, "sha256": tensors_sha256(s)}}
    balanced = BitPlan.from_dict(data)
    balanced.tensors = {balance_key(LAYER): s}
    assert outlier_stage(resolved, unet, 0.03).layers[LAYER]["outliers"]["channels"] == [3]
    assert outlier_stage(balanced, unet, 0.03).layers[LAYER]["outliers"]["channels"] == [20]
