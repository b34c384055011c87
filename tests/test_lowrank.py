"""The low-rank correction branch (SVDQuant-style): reduces a layer's error, counted in the plan's size and in the
builder's budget, travels in the sidecar, round-trips pre-quantized; and the correct stage's options."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pixart, make_unet, pixart_inputs
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from test_balance import corrected_plan, load, run
from torch import nn

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanFormatError
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.correct import correct, overhead_bits
from diffusers_mixdq.builder.fit_corrections import fit_layer
from diffusers_mixdq.builder.layer_inputs import LayerInputs
from diffusers_mixdq.builder.recording import Calibration, record_run
from diffusers_mixdq.plan import LayerSpec, layer_table
from diffusers_mixdq.plan.layer_tensors import lowrank_keys


@pytest.mark.parametrize("layer", [nn.Linear(96, 48), nn.Conv2d(16, 24, 3, padding=1)])
def test_lowrank_branch_reduces_the_layer_error(layer):
    torch.manual_seed(0)
    w = layer.weight
    with torch.no_grad():  # a dominant low-rank part, as trained layers have
        w += 0.5 * (torch.randn(w.shape[0], 2) @ torch.randn(2, w[0].numel())).view_as(w)
    x = torch.randn(256, 96) if isinstance(layer, nn.Linear) else torch.randn(4, 16, 6, 6)
    absmax = x.abs().amax(dim=0) if x.dim() == 2 else x.abs().amax(dim=(0, 2, 3))
    fit = fit_layer("l", layer, LayerSpec("int2", "none"), LayerInputs(absmax, x), (), rank=4)
    down, up = (fit.tensors[k] for k in lowrank_keys("l"))
    assert down.dtype == up.dtype == torch.float16 and fit.spec.flags["lowrank"]["rank"] == 4
    assert down.shape == (4, w[0].numel()) and up.shape == (w.shape[0], 4)
    assert fit.error < 0.5 * fit.baseline_error


def test_lowrank_factors_are_counted_in_the_size():
    model = make_unet()
    plain = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0},
                    ignore=["conv_in", "conv_out"]).resolve(model)
    plan = corrected_plan(model, lowrank_rank=4)
    table = layer_table(model)
    extra = sum(16 * 4 * (table[n].in_features + table[n].shape[0]) for n, e in plan.layers.items()
                if "lowrank" in e.get("flags", {}))
    assert extra > 0
    params = sum(info.numel for info in table.values())
    a, b = plain.summary(), plan.summary()
    assert b.avg_weight_bits == pytest.approx(a.avg_weight_bits + extra / params)
    assert b.size_bytes == pytest.approx(a.size_bytes + extra / 8)
    # the builder's budget pays for them: what every candidate layer would add, per parameter
    s = BuildSettings(prompts=["x"], lowrank_rank=4)
    candidates = [n for n in table if n not in ("conv_in", "conv_out")]
    assert overhead_bits(s, table, candidates) == pytest.approx(extra / params)


def with_lowrank_structure(model):
    """``model`` with a dominant rank-2 part added to every weight (random weights have a flat spectrum; trained
    ones do not, and that is what a low-rank branch absorbs)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                w += w.std() * (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).view_as(w)
    return model


def test_lowrank_plan_loads_improves_and_round_trips_pre_quantized(tmp_path):
    model = with_lowrank_structure(make_unet())
    model.save_pretrained(tmp_path / "fp")
    ref = run(model)
    plain = BitPlan(defaults={"weights": "int4", "activations": "none"}, ignore=["conv_in", "conv_out"])
    plan = correct(model, _calibration(model), plain.resolve(model), BuildSettings(prompts=["x"], lowrank_rank=4))
    plan.save(tmp_path / "plan")
    loaded = load(tmp_path / "fp", tmp_path / "plan")
    err = lambda m: float((run(m) - ref).pow(2).mean())  # noqa: E731
    assert err(loaded) < 0.6 * err(load(tmp_path / "fp", plain))
    loaded.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "mixdq_plan.safetensors").is_file()
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    assert torch.equal(run(reloaded), run(loaded))
    # the saved plan's sidecar is checked on reload like any plan's
    sidecar = tmp_path / "q" / "mixdq_plan.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(sidecar)
    key = next(k for k in tensors if k.endswith("lowrank.up"))
    save_file({**tensors, key: tensors[key] * 2}, sidecar)
    with pytest.raises(PlanFormatError, match="sha256"):
        UNet2DConditionModel.from_pretrained(tmp_path / "q")


def _calibration(model) -> Calibration:
    from test_balance import unet_calibration

    return unet_calibration(model)


def test_dit_with_balance_and_lowrank(tmp_path):
    model = make_pixart()
    model.save_pretrained(tmp_path / "fp")
    inputs = pixart_inputs()

    def run_dit(m):
        with torch.no_grad():
            return m(**inputs).sample

    calib = Calibration(record_run(None, model, lambda: run_dit(model)), {}, None, [])
    plan = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": "dynamic"}).resolve(model)
    plan = correct(model, calib, plan, BuildSettings(prompts=["x"], balance=True, lowrank_rank=2))
    assert any("lowrank" in e.get("flags", {}) for e in plan.layers.values())
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=plan))
    loaded.save_pretrained(tmp_path / "q")
    assert torch.equal(run_dit(PixArtTransformer2DModel.from_pretrained(tmp_path / "q")), run_dit(loaded))


@pytest.mark.parametrize("bad", [{"lowrank_rank": -1}, {"balance_alphas": [1.5]}, {"balance_alphas": []},
                                 {"balance": "yes"}])
def test_bad_correct_options_are_one_error(bad):
    with pytest.raises(MixDQError, match="|".join(bad)):
        BuildSettings(prompts=["x"], **bad).validate()


def test_recipe_keys_reach_the_settings():
    from diffusers_mixdq.builder.recipe import load_recipe

    recipe = load_recipe({"pipeline": "some/dir", "weights": {"budget_bits": 4.0}, "balance": True,
                          "balance_alphas": [0.25, 0.5], "lowrank_rank": 8, "lowrank_layers": ["*attn2.*"]})
    s = recipe.settings()
    assert (s.balance, list(s.balance_alphas), s.lowrank_rank, list(s.lowrank_layers)) == (True, [0.25, 0.5], 8,
                                                                                           ["*attn2.*"])
    with pytest.raises(MixDQError, match="lowrank_rank"):
        load_recipe({"pipeline": "some/dir", "weights": {"budget_bits": 4.0}, "lowrank_rank": "eight"})
