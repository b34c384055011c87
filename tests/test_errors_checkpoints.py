"""Regression tests of issue #17 for pre-quantized checkpoints: every dtype round trip works, and every disagreement
between a checkpoint and its plan is one MixDQError before anything is loaded (never a weight left on meta)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SMALLEST_UNET, dir_snapshot, make_unet, unet_inputs
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.bos import attach_bos

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PLANS = {
    "int8": BitPlan.uniform("int8"),
    "int4-dynamic": BitPlan.uniform("int4", activations="int8", act_range="dynamic"),
    "int2-static": BitPlan.uniform("int2", activations="int8", act_range=3.0),
    "float8-static": BitPlan.uniform("float8", activations="float8", act_range=6.0),
    "bos-aware": attach_bos(BitPlan.uniform("int8", activations="int8"), torch.randn(32, generator=torch.Generator().manual_seed(0))),
}
#: output difference allowed between a reload in another dtype and the saved model run in its own dtype (the
#: quantized data are the same; only the float arithmetic differs, most with float8 activations)
CROSS_DTYPE_TOL = 0.1


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp")
    make_unet(**SMALLEST_UNET).save_pretrained(path)
    return path


def run(model, dtype) -> torch.Tensor:
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x.to(dtype), t, e.to(dtype)).sample.float()


def quantized_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".weight." in k or k.endswith(("_scale", "bos_input"))}


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("saved", list(DTYPES))
def test_dtype_round_trip(plan_name, saved, fp_dir, tmp_path):
    """fp32 / fp16 / bf16 save -> reload without a dtype, with the same one and into each other one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = UNet2DConditionModel.from_pretrained(fp_dir, quantization_config=MixDQConfig(plan=PLANS[plan_name]),
                                                   torch_dtype=DTYPES[saved])
        ref.save_pretrained(tmp_path)
        expected = run(ref, DTYPES[saved])
        ref_state = quantized_state(ref)
        for load in [None, *DTYPES]:
            dtype = DTYPES[load] if load else torch.float32
            model = UNet2DConditionModel.from_pretrained(tmp_path, **({"torch_dtype": dtype} if load else {}))
            assert quantized_layers(model) == quantized_layers(ref)
            assert {p.dtype for p in model.parameters() if p.dtype.is_floating_point} == {dtype}
            for key, value in quantized_state(model).items():
                want = ref_state[key]
                if key.endswith("_data"):
                    assert torch.equal(value, want), key  # the stored data never change
                else:
                    assert value.dtype == dtype and torch.equal(value, want.to(dtype)), key  # cast, nothing else
            out = run(model, dtype)
            assert torch.isfinite(out).all()
            if dtype == DTYPES[saved]:
                assert torch.equal(out, expected), (load, saved)
            else:
                err = float((out - expected).norm() / expected.norm())
                assert err < CROSS_DTYPE_TOL, (load, saved, err)


# ---------------------------------------------------------------------------------------------- disagreements
@pytest.fixture(scope="module")
def saved(fp_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q")
    plan = BitPlan(defaults={"weights": "int8"}, rules=[{"targets": ["*.ff.*"], "weights": "int4"}],
                   layers={"conv_out": {"weights": "none", "activations": "int8", "act_range": 2.0}})
    UNet2DConditionModel.from_pretrained(fp_dir, quantization_config=MixDQConfig(plan=plan)).save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_plan(folder: Path, edit) -> None:
    """Edit mixdq_plan.json and record its new hash in config.json (a consistent hand edit)."""
    plan_path = folder / "mixdq_plan.json"
    data = json.loads(plan_path.read_text())
    edit(data)
    text = json.dumps(data, indent=2) + "\n"
    plan_path.write_text(text)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["plan"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("case, edit_plan, edit_weights, message", [
    ("weights none", lambda d: d["layers"][Q].update(weights="none"), None,
     rf"'{Q}': the plan says a floating-point weight, but the checkpoint lacks weight and has weight._data"),
    ("other dtype", lambda d: d["layers"][FF].update(weights="int8"), None,
     rf"'{FF}': the plan says int8 weights, but the checkpoint lacks weight._data and has weight._data._data"),
    ("bos flag", lambda d: d["layers"][Q].update(flags={"bos_aware": True}), None, "."),
    ("data shape", None, lambda t: t.update({f"{Q}.weight._data": t[f"{Q}.weight._data"][:, :16].contiguous()}),
     rf"'{Q}.weight._data' is \[32, 16\] int8; int8 weights need \[32, 32\] int8"),
    ("data dtype", None, lambda t: t.update({f"{Q}.weight._data": t[f"{Q}.weight._data"].to(torch.int16)}),
     rf"'{Q}.weight._data' is \[32, 32\] int16"),
    ("scale shape", None, lambda t: t.update({f"{FF}.weight._scale": torch.ones(3, 1)}),
     rf"'{FF}.weight._scale' is \[3, 1\] float32"),
    ("missing piece", None, lambda t: t.pop(f"{FF}.weight._shift"), rf"'{FF}': .* lacks weight._shift"),
    ("float weight replaced", None, lambda t: t.pop("conv_out.weight"), "'conv_out': .* lacks weight"),
    ("bias shape", None, lambda t: t.update({f"{Q}.bias": torch.zeros(7)}) if f"{Q}.bias" in t else
     t.update({"conv_out.bias": torch.zeros(7)}), r"\.bias' is \[7\] in the checkpoint, but \[\d+\] in the model"),
    ("norm shape", None, lambda t: t.update({"conv_norm_out.weight": torch.zeros(5)}),
     r"'conv_norm_out.weight' is \[5\] in the checkpoint, but \[32\] in the model"),
])
def test_checkpoint_and_plan_disagree(case, edit_plan, edit_weights, message, saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    if edit_plan:
        _edit_plan(folder, edit_plan)
    if edit_weights:
        _edit_weights(folder, edit_weights)
    before = dir_snapshot(folder)
    with pytest.raises(MixDQError, match=message):
        UNet2DConditionModel.from_pretrained(folder)
    assert dir_snapshot(folder) == before  # files untouched


def test_non_finite_scales_are_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    _edit_weights(folder, lambda t: t[f"{Q}.weight._scale"].fill_(float("inf")))
    with pytest.raises(MixDQError, match=rf"'{Q}' in this checkpoint has NaN or infinite weight._scale"):
        UNet2DConditionModel.from_pretrained(folder)


def test_non_finite_activation_scale_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    _edit_weights(folder, lambda t: t["conv_out.input_scale"].fill_(float("nan")))
    with pytest.raises(MixDQError, match=r"NaN or infinite values in conv_out.input_scale"):
        UNet2DConditionModel.from_pretrained(folder)


def test_reload_of_unedited_checkpoint_works(saved):
    model = UNet2DConditionModel.from_pretrained(saved)
    assert torch.isfinite(run(model, torch.float32)).all()
    assert not any(t.device.type == "meta" for t in model.state_dict().values())


def test_config_json_holding_an_edited_plan_dict(saved, tmp_path):
    """config.json's reference replaced by the plan itself, edited to ``weights: none`` for a quantized layer."""
    folder = _copy(saved, tmp_path / "m")
    plan = json.loads((folder / "mixdq_plan.json").read_text())
    plan["layers"][Q]["weights"] = "none"
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["plan"] = plan
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MixDQError, match=rf"'{Q}': the plan says a floating-point weight"):
        UNet2DConditionModel.from_pretrained(folder)
