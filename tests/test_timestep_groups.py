"""Timestep-aware static activation ranges (``act_groups``): the module picks the group of the current denoiser
call, plans are validated, the builder records ranges per group, pre-quantized checkpoints keep the groups."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanFormatError
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.plan import LayerSpec
from diffusers_mixdq.builder.recording import Recording
from diffusers_mixdq.builder.timestep_ranges import add_timestep_groups, group_bounds, group_ranges

BASE = {"weights": "int8", "activations": "int8", "act_range": 4.0}
GROUPS = [[0, 100, 0.5], [101, 1000, 50.0]]


def plan_with(conv_in: dict) -> BitPlan:
    return BitPlan(defaults=BASE, layers={"conv_in": {**BASE, **conv_in}})


def load(path, plan):
    return UNet2DConditionModel.from_pretrained(path, quantization_config=MixDQConfig(plan=plan))


def inputs(t):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 16, 16, generator=g) * 3, t, torch.randn(2, 7, 32, generator=g)


def out(model, t):
    x, t, e = inputs(t)
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=e).sample


@pytest.fixture(scope="module")
def grouped(unet_dir):
    return load(unet_dir, plan_with({"act_groups": GROUPS}))


@pytest.mark.parametrize("t, static", [(torch.tensor([10, 10]), 0.5), (torch.tensor([600, 600]), 50.0),
                                       (torch.tensor([100.5, 100.5]), 4.0), (700, 50.0), (torch.tensor(5), 0.5)])
def test_module_picks_the_group_of_the_current_timestep(unet_dir, grouped, t, static):
    """Outputs equal those of a plan whose conv_in has the group's range as its one static range (outside every
    group: act_range); planted ranges 100x apart, so a wrong pick changes the output."""
    expected = out(load(unet_dir, plan_with({"act_range": static})), t)
    assert torch.equal(out(grouped, t), expected)


def test_outside_a_denoiser_call_the_layer_uses_act_range(grouped):
    conv = grouped.conv_in
    assert conv.act_group_scales.tolist() == pytest.approx([0.5 / 127, 50.0 / 127])
    out(grouped, torch.tensor([10, 10]))
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(conv.quantize_input(x), conv._act_scheme.quantize(x, "int8", conv.input_scale))


def test_pre_quantized_round_trip(grouped, tmp_path):
    grouped.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.act_group_scales").tolist() == pytest.approx([0.5 / 127, 50.0 / 127])
        assert f.get_tensor("conv_in.act_group_bounds").tolist() == [[0, 100], [101, 1000]]
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    for t in (torch.tensor([10, 10]), torch.tensor([600, 600])):
        assert torch.equal(out(reloaded, t), out(grouped, t))


@pytest.mark.parametrize("groups, message", [
    ([[600, 500, 1.0]], "above t_hi"),
    ([[0, 500, 1.0], [400, 900, 1.0]], "without overlap"),
    ([[0, 500]], "too short"),
    ([[0, 500, -1.0]], "act_groups"),
    ([], "act_groups"),
])
def test_malformed_groups_are_refused(groups, message):
    with pytest.raises(PlanFormatError, match=message):
        plan_with({"act_groups": groups})


def test_groups_need_a_static_range():
    with pytest.raises(PlanFormatError, match="static ranges per timestep group"):
        plan_with({"act_range": "dynamic", "act_groups": GROUPS})
    # without act_range, the widest group's range is the one outside the groups
    spec = LayerSpec.from_dict({"weights": "int8", "activations": "int8", "act_groups": GROUPS})
    assert spec.act_range == 50.0


def test_group_bounds_tile_the_timesteps():
    bounds = group_bounds([999, 749, 499, 249, 999, 749, 499, 249], 2)
    assert [(lo, hi) for lo, hi, _ in bounds] == [(0.0, pytest.approx(624 - 1e-3)), (624.0, 1000.0)]
    assert [c for _, _, c in bounds] == [[249, 499], [749, 999]]
    assert len(group_bounds([1, 2], 5)) == 2  # never more groups than timesteps


def test_builder_records_ranges_per_group():
    """conv_in's input is 10x larger at late timesteps in the recorded calls: its group ranges say so."""
    unet = make_unet()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    rec = Recording(calls=[((x * 10, torch.tensor([900])), {"encoder_hidden_states": e}),
                           ((x, torch.tensor([100])), {"encoder_hidden_states": e})])
    groups = group_ranges(unet, rec, 2, ["conv_in", "time_embedding.linear_1"])
    (lo0, hi0, early), (lo1, hi1, late) = groups
    assert lo0 == 0 and hi0 < 500 <= lo1 and hi1 == 1000
    assert late["conv_in"] == pytest.approx(10 * early["conv_in"])
    resolved = BitPlan(defaults={"weights": "int8", "activations": "int8", "act_range": 1.0}).resolve(unet)
    plan = add_timestep_groups(resolved, groups)
    assert plan.layers["conv_in"]["act_groups"][1][2] == pytest.approx(late["conv_in"])


def test_builder_option_checks():
    BuildSettings(prompts=["a"], act_timestep_groups=4).validate()
    with pytest.raises(MixDQError, match="act_timestep_groups"):
        BuildSettings(prompts=["a"], activations="dynamic", act_timestep_groups=4).validate()
    with pytest.raises(MixDQError, match="act_timestep_groups"):
        BuildSettings(prompts=["a"], act_timestep_groups=-1).validate()



def test_group_pick_is_traced_without_graph_breaks():
    """The scale is picked with tensor ops only: no .item() / host sync, so torch.compile traces it in one graph."""
    from diffusers_mixdq.apply import quantize_module
    from diffusers_mixdq.apply.timestep_groups import CLOCK_ATTR, TimestepClock

    q = quantize_module(torch.nn.Linear(8, 8), LayerSpec.from_dict({**BASE, "act_groups": GROUPS}))
    clock = TimestepClock()
    setattr(q, CLOCK_ATTR, clock)
    x = torch.randn(2, 8) * 3
    clock.t = torch.tensor(10.0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q.quantize_input)(x)
    assert explained.graph_break_count == 0
    assert torch.equal(q.quantize_input(x), q._act_scheme.quantize(x, "int8", torch.tensor(0.5 / 127)))
