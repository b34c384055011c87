"""Channel balancing (ViDiT-Q): exact in floating point, helps a planted outlier channel, travels in the plan's
sidecar (checked like the BOS state), loads through from_pretrained and round-trips pre-quantized."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_unet, unet_inputs
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_mixdq import BitPlan, MixDQConfig, PlanFormatError
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.correct import correct
from diffusers_mixdq.builder.fit_corrections import candidate, fit_layer
from diffusers_mixdq.builder.layer_inputs import LayerInputs
from diffusers_mixdq.builder.recording import Calibration, record_run
from diffusers_mixdq.plan import LayerSpec
from diffusers_mixdq.plan.layer_tensors import balance_key


def unet_calibration(model) -> Calibration:
    """A calibration recording of a tiny UNet: three calls on random inputs."""
    def run():
        for seed in (1, 2, 3):
            x, t, e = unet_inputs(seed)
            model(x, t, e)
    return Calibration(record_run(None, model, run), {}, None, [])


def corrected_plan(model, **settings) -> BitPlan:
    plan = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0},
                   ignore=["conv_in", "conv_out"]).resolve(model)
    s = BuildSettings(prompts=["x"], **settings)
    return correct(model, unet_calibration(model), plan, s)


def load(path, plan, **kw):
    return UNet2DConditionModel.from_pretrained(path, quantization_config=MixDQConfig(plan=plan), **kw)


def run(model):
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x, t, e).sample


@pytest.mark.parametrize("layer", [nn.Linear(16, 8), nn.Conv2d(6, 5, 3, padding=1)])
def test_balancing_leaves_the_float_function_unchanged(layer):
    torch.manual_seed(0)
    x = torch.randn(4, 16) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    absmax = x.abs().amax(dim=0) if x.dim() == 2 else x.abs().amax(dim=(0, 2, 3))
    spec = LayerSpec("none", "none")
    cspec, tensors = candidate("l", spec, LayerInputs(absmax * 30, x), layer.weight, 0.5, rank=0)
    s = tensors[balance_key("l")]
    assert not torch.allclose(s, torch.ones_like(s))  # a real rescaling ...
    q = quantize_module(layer, LayerSpec("int8", "none", None, cspec.flags), tensors=tensors, name="l")
    # ... whose stored float weight is W * s; with nothing quantized the function is W x
    plain = quantize_module(layer, cspec, tensors=tensors, name="l")
    with torch.no_grad():
        assert torch.allclose(plain(x), layer(x), rtol=1e-5, atol=1e-6)
        assert torch.allclose(plain.weight, layer.weight * s.view(1, -1, *([1] * (layer.weight.dim() - 2))))
        assert q(x).shape == layer(x).shape


def test_balancing_reduces_the_error_of_a_planted_outlier_channel():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(512, 64)
    x[:, 7] *= 60.0  # an outlier input channel: per-tensor int8 activations lose the others
    spec = LayerSpec("int4", "int8", float(x.abs().max()))
    fit = fit_layer("l", layer, spec, LayerInputs(x.abs().amax(dim=0), x), (0.0, 0.25, 0.5, 0.75), rank=0)
    assert fit.alpha is not None and fit.spec.flags["balance"]["alpha"] == fit.alpha
    assert fit.error < 0.5 * fit.baseline_error
    # the static range follows the balanced input
    assert fit.spec.act_range < spec.act_range


def test_balanced_plan_loads_and_round_trips(tmp_path):
    model = make_unet()
    plan = corrected_plan(model, balance=True)
    balanced = [n for n, e in plan.layers.items() if "balance" in e.get("flags", {})]
    assert balanced and plan.provenance["corrections"]["layers"] > 0
    plan.save(tmp_path / "plan")
    again = BitPlan.load(tmp_path / "plan")
    assert again == plan and all(torch.equal(again.tensors[k], v) for k, v in plan.tensors.items())
    make_unet().save_pretrained(tmp_path / "fp")
    loaded = load(tmp_path / "fp", tmp_path / "plan")
    module = loaded.get_submodule(balanced[0])
    assert torch.equal(module.mixdq_balance, plan.tensors[balance_key(balanced[0])])
    out = run(loaded)
    assert torch.isfinite(out).all()
    loaded.save_pretrained(tmp_path / "q")
    assert not any("mixdq_balance" in k for k in load_file(tmp_path / "q" / "diffusion_pytorch_model.safetensors"))
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    assert torch.equal(run(reloaded), out)


def test_balancing_helps_the_model_output(tmp_path):
    model = make_unet()
    make_unet().save_pretrained(tmp_path / "fp")
    ref = run(model)
    plain = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0},
                    ignore=["conv_in", "conv_out"]).resolve(model)
    err = lambda m: float((run(m) - ref).pow(2).mean())  # noqa: E731
    assert err(load(tmp_path / "fp", corrected_plan(model, balance=True))) < err(load(tmp_path / "fp", plain))


def test_corrupted_or_missing_sidecar_tensor_is_one_plan_format_error(tmp_path):
    model = make_unet()
    plan = corrected_plan(model, balance=True, balance_alphas=[0.5])
    path = plan.save(tmp_path / "plan")
    sidecar = path.with_suffix(".safetensors")
    tensors = load_file(sidecar)
    key = next(k for k in tensors if k.endswith(".balance"))
    changed = dict(tensors)
    changed[key] = tensors[key] * 1.01
    save_file(changed, sidecar)
    with pytest.raises(PlanFormatError, match="sha256"):
        BitPlan.load(path)
    save_file({k: v for k, v in tensors.items() if k != key}, sidecar)
    with pytest.raises(PlanFormatError, match="has no"):
        BitPlan.load(path)
    save_file({**tensors, key: tensors[key][:-1]}, sidecar)
    with pytest.raises(PlanFormatError, match="shape"):
        BitPlan.load(path)
    save_file({**tensors, key: -tensors[key]}, sidecar)
    with pytest.raises(PlanFormatError):
        BitPlan.load(path)
    save_file({**tensors, "layers.nowhere.balance": tensors[key].clone()}, sidecar)
    with pytest.raises(PlanFormatError, match="no layer"):
        BitPlan.load(path)
    save_file(tensors, sidecar)
    data = json.loads(path.read_text())
    data["layers"][key[len("layers."):-len(".balance")]]["flags"]["balance"] = {"sha256": "nothex"}
    with pytest.raises(PlanFormatError, match="flags"):
        BitPlan.from_dict(data)


def test_a_flag_without_its_tensor_fails_before_loading(tmp_path):
    model = make_unet()
    plan = corrected_plan(model, balance=True, balance_alphas=[0.5])
    plan.tensors = {}  # e.g. a plan whose sidecar was not copied, built in Python
    make_unet().save_pretrained(tmp_path / "fp")
    with pytest.raises(PlanFormatError, match="sidecar"):
        load(tmp_path / "fp", plan)
