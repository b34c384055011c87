"""Dynamic per-token activation quantization (``act_range: "dynamic-token"``, ViDiT-Q): the scheme, plans that
select it, the builder option and a pre-quantized round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet, rel_err, unet_inputs
from diffusers import UNet2DConditionModel

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanFormatError
from diffusers_mixdq.apply.activations import ACTIVATION_SCHEMES, scheme_for
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.plan import LayerSpec


def _error(x: torch.Tensor, scheme: str, dtype: str, module=None) -> float:
    s = ACTIVATION_SCHEMES.get(scheme)
    s = s.bind(module) if module is not None else s
    return (s.quantize(x, dtype, torch.tensor(1.0)) - x).norm().item()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_per_token_beats_per_tensor_with_an_outlier_token(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g)
    x[0, 3] *= 80  # one outlier token
    token, tensor = _error(x, "dynamic-token", dtype), _error(x, "dynamic", dtype)
    assert token <= tensor
    # the tokens other than the outlier: per tensor they fall on a grid 80x too coarse
    rest = torch.ones(2, 9, dtype=torch.bool)
    rest[0, 3] = False
    errs = {s: (ACTIVATION_SCHEMES.get(s).quantize(x, dtype, torch.tensor(1.0)) - x)[rest].norm() for s in
            ("dynamic-token", "dynamic")}
    assert errs["dynamic-token"] < 0.2 * errs["dynamic"]
    # every other token keeps its own fine grid: their error is that of quantizing them alone
    alone = _error(x[1], "dynamic", dtype)
    assert (ACTIVATION_SCHEMES.get("dynamic-token").quantize(x, dtype, torch.tensor(1.0))[1] - x[1]).norm() <= alone


def test_conv_inputs_get_one_scale_per_spatial_position():
    x = torch.randn(1, 8, 4, 4)
    x[0, :, 1, 2] *= 100  # one outlier position, all channels
    conv = torch.nn.Conv2d(8, 8, 3)
    scheme = ACTIVATION_SCHEMES.get("dynamic-token").bind(conv)
    assert scheme.channel_dim == 1
    q = scheme.quantize(x, "int4", torch.tensor(1.0))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :, 1, 2] = False
    # the other positions are untouched by the outlier: each is quantized with its own channel max
    ref = torch.stack([ACTIVATION_SCHEMES.get("dynamic").quantize(x[0, :, i, j], "int4", torch.tensor(1.0))
                       for i in range(4) for j in range(4)], dim=-1).view(8, 4, 4)
    assert torch.allclose(q[0], ref)
    assert _error(x, "dynamic-token", "int4", conv) <= _error(x, "dynamic", "int4")


def test_spec_selects_the_scheme():
    assert scheme_for(LayerSpec("int8", "int8", "dynamic-token")).name == "dynamic-token"
    assert scheme_for(LayerSpec("int8", "int8", "dynamic")).name == "dynamic"
    assert scheme_for(LayerSpec("int8", "int8", 3.0)).name == "static"
    assert LayerSpec("int8", "int8", "dynamic-token").dynamic


def test_plan_validation():
    BitPlan.uniform("int8", activations="int4", act_range="dynamic-token")  # valid
    with pytest.raises(PlanFormatError, match="dynamic-token"):
        BitPlan.uniform("int8", activations="int4", act_range="dynamic-tokens")


def test_loaded_unet_uses_per_token_and_round_trips(unet_dir, tmp_path):
    plan = BitPlan.uniform("int8", activations="int4", act_range="dynamic-token")
    model = UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=plan))
    conv = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv._act_scheme.name == "dynamic-token" and conv._act_scheme.channel_dim == 1
    x, t, e = unet_inputs()
    with torch.no_grad():
        out = model(x, t, e).sample
        ref = make_unet()(x, t, e).sample
    per_tensor = UNet2DConditionModel.from_pretrained(
        unet_dir, quantization_config=MixDQConfig(plan=BitPlan.uniform("int8", activations="int4")))
    with torch.no_grad():
        assert rel_err(out, ref) < rel_err(per_tensor(x, t, e).sample, ref)
    model.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, e).sample, out)


def test_builder_option():
    BuildSettings(prompts=["a"], activations="dynamic-token").validate()
    with pytest.raises(MixDQError, match="activations"):
        BuildSettings(prompts=["a"], activations="per-token").validate()


def test_builder_defaults_per_token_and_psnr_pick_static_when_named_or_grouped():
    """Per token and the PSNR pick unless told (issue #14); ``int8`` named stays static; timestep groups are static
    ranges, so without a mode they build ``int8``; a dynamic mode with groups is still refused."""
    from diffusers_mixdq.builder.recipe import load_recipe

    default = BuildSettings(prompts=["a"])
    assert (default.activations, default.pick_objective) == ("dynamic-token", "psnr")
    assert BuildSettings(prompts=["a"], act_timestep_groups=4).activations == "int8"
    assert BuildSettings(prompts=["a"], activations="int8").activations == "int8"
    BuildSettings(prompts=["a"], act_timestep_groups=4).validate()
    recipe = {"pipeline": "x", "weights": {"budget_bits": 4}}
    built = load_recipe(recipe).settings()
    assert (built.activations, built.pick_objective) == ("dynamic-token", "psnr")
    assert load_recipe({**recipe, "activations": "int8"}).settings().activations == "int8"
    assert load_recipe({**recipe, "pick_objective": "mse"}).settings().pick_objective == "mse"
    grouped = load_recipe({**recipe, "activations": {"timestep_groups": 4}}).settings()
    assert (grouped.activations, grouped.act_timestep_groups) == ("int8", 4)
    with pytest.raises(MixDQError, match="timestep_groups"):
        load_recipe({**recipe, "activations": {"mode": "dynamic-token", "timestep_groups": 4}})

