"""int3 / int5 / int6 weights (the native backend's bit-plane layout), picked automatically for plans that use
them, counted on disk as in the plan summary; and the builder's estimated widths (``measure_widths``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import unet_inputs
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from diffusers_mixdq import BitPlan, LayerSpec, MixDQConfig, MixDQError, use_weight_backend
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.apply.backends import layout
from diffusers_mixdq.apply.backends.native import kernels, packing
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.width_ladder import estimate, fill_estimates, measured_widths

NEW = ["int3", "int5", "int6"]
LADDER = BitPlan(
    defaults={"weights": "int5", "activations": "int8", "act_range": "dynamic"},
    rules=[{"targets": ["*attn1*"], "weights": "int3"}, {"targets": ["*ff*"], "weights": "int6"},
           {"targets": ["*conv*"], "weights": "int4"}],
    ignore=["conv_in", "conv_out"],
)


def run(model):
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x, t, e).sample


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("rows", [8, 13, 40])
def test_pack_unpack_round_trip_in_bits_bytes_per_8_codes(bits, rows):
    codes = torch.randint(0, 2**bits, (rows, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = packing.pack(codes, bits)
    assert packed.shape[0] == layout.packed_rows(bits, rows)
    if rows % 8 == 0:
        assert packed.shape[0] == rows * bits // 8
    assert torch.equal(packing.unpack(packed, bits, rows), codes)


@pytest.mark.parametrize("shape", [(48, 288), (24, 64), (6, 5, 3, 3)])
def test_wider_codes_quantize_closer_and_both_dequantize_paths_agree(shape):
    torch.manual_seed(0)
    module = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(5, 6, 3)
    errors = []
    for dtype in ["int2", "int3", "int4", "int5", "int6", "int8"]:
        q = quantize_module(module, LayerSpec(dtype), backend="native")
        w = q.weight.dequantize()
        x = torch.randn(3, shape[1]) if len(shape) == 2 else torch.randn(1, 5, 7, 7)
        assert torch.equal(kernels.weight(q, x), w)  # workspace path == traced path
        errors.append((w - module.weight).pow(2).mean().item())
    assert all(b < a / 2 for a, b in zip(errors, errors[1:])), errors  # each extra bit at least halves the MSE


@pytest.mark.parametrize("dtype", NEW)
def test_new_widths_pick_the_native_backend_and_quanto_refuses_them(dtype):
    module = torch.nn.Linear(64, 16)
    assert quantize_module(module, LayerSpec(dtype)).mixdq_backend == "native"
    assert quantize_module(module, LayerSpec("int4")).mixdq_backend == "quanto"  # the default is unchanged
    with pytest.raises(MixDQError, match='weight_backend="native"'):
        quantize_module(module, LayerSpec(dtype), backend="quanto")


def _weight_bytes(path):
    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if ".weight._" in key and not key.endswith("._scale") and not key.endswith("._shift"):
                    t = st.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def test_ladder_plan_loads_saves_reloads_and_is_counted_as_stored(unet_dir, tmp_path):
    model = UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=LADDER))
    kinds = {m.mixdq_spec.weights: m.mixdq_backend for m in model.modules() if hasattr(m, "mixdq_spec")}
    assert set(kinds) >= {"int3", "int5", "int6", "int4"} and set(kinds.values()) == {"native"}
    ref = run(model)
    model.save_pretrained(tmp_path / "q")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    assert {m.mixdq_backend for m in again.modules() if hasattr(m, "mixdq_spec")} == {"native"}
    assert torch.equal(run(again), ref)
    # the codes on disk take exactly the bits the plan summary counts (scales / shifts aside)
    fp = UNet2DConditionModel.from_pretrained(unet_dir)
    counted = 0
    for name, spec in LADDER.resolve(fp).layer_specs().items():
        bits = layout.WEIGHT_BITS.get(spec.weights)
        if bits:
            w = fp.get_submodule(name).weight
            rows, _ = layout.grouping(tuple(w.shape), bits) if bits < 8 else (w.shape[0], None)
            per_row = w.numel() // rows
            counted += (layout.packed_rows(bits, rows) if bits < 8 else rows) * per_row
    assert _weight_bytes(tmp_path / "q") == counted
    with use_weight_backend("quanto"), pytest.raises(MixDQError, match="native"):
        UNet2DConditionModel.from_pretrained(tmp_path / "q")


def test_named_quanto_backend_with_a_ladder_plan_is_refused_before_loading(unet_dir):
    with pytest.raises(MixDQError, match="int3 weights, int5 weights, int6 weights"):
        UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=LADDER,
                                                                                      weight_backend="quanto"))


def test_plan_summary_counts_the_new_widths(unet_dir):
    fp = UNet2DConditionModel.from_pretrained(unet_dir)
    averages = [BitPlan.uniform(f"int{b}").summary(fp).avg_weight_bits for b in (2, 3, 4, 5, 6)]
    assert all(b - a == pytest.approx(1.0, abs=1e-6) for a, b in zip(averages, averages[1:])), averages
    assert layout.storage_bits(3, 256) == pytest.approx(3 + 32 / 128)


def test_estimates_follow_six_db_per_bit_and_interpolate_geometrically():
    sqnr = {2: 10.0, 4: 22.0}
    assert estimate(sqnr, 3, "sqnr_db") == pytest.approx(16.0)
    assert estimate(sqnr, 6, "sqnr_db") == pytest.approx(22.0 + 10 * math.log10(16))  # 6.02 dB per bit
    ssim = {4: 0.96, 8: 1 - 0.04 / 256}
    assert 1 - estimate(ssim, 6, "ssim") == pytest.approx(math.sqrt(0.04 * 0.04 / 256))
    assert estimate({4: -1e-3}, 5, "mse") == pytest.approx(-2.5e-4)


def test_only_the_listed_widths_are_measured_and_the_rest_filled():
    widths = {"content": [2, 3, 4, 5, 6, 8], "quality": [3, 5, 6, 8]}
    assert measured_widths(widths, [2, 4, 8]) == {"content": [2, 4, 8], "quality": [8]}
    assert measured_widths({"quality": [3, 5]}, [4]) == {"quality": [3]}
    scores = {"a": {2: 0.5, 4: 0.9, 8: 0.999}, "b": {8: 40.0}, "c": {}}
    groups = {"a": "content", "b": "quality", "c": "quality"}
    assert fill_estimates(scores, widths, groups, {"content": "ssim", "quality": "sqnr_db"}) == 3 + 3
    assert sorted(scores["a"]) == widths["content"] and sorted(scores["b"]) == widths["quality"] and not scores["c"]
    assert scores["a"][2] < scores["a"][3] < scores["a"][4] < scores["a"][5] < scores["a"][6] < scores["a"][8]


def test_build_settings_take_the_ladder_and_refuse_other_widths():
    BuildSettings(prompts=["a"], widths={"content": [2, 3, 4, 5, 6, 8], "quality": [3, 4, 5, 6, 8]},
                  measure_widths=(2, 4, 8)).validate()
    with pytest.raises(MixDQError, match="measure"):
        BuildSettings(prompts=["a"], measure_widths=(2, 7)).validate()
    with pytest.raises(MixDQError, match="widths"):
        BuildSettings(prompts=["a"], widths={"content": [2, 7], "quality": [4, 8]}).validate()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outlier_rows_are_stored_once(kind):
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 16) if kind == "linear" else torch.nn.Conv2d(4, 16, 3, padding=1)
    outliers = {"weights": "int8", "channels": [1, 9]}
    q = quantize_module(module, LayerSpec("int3", outliers=outliers))
    plain = quantize_module(module, LayerSpec("int3"), backend="native")
    assert q.mixdq_backend == "native" and q.weight.shape == module.weight.shape
    assert q.weight_shape[0] == 14 and q.kept_rows.tolist() == [i for i in range(16) if i not in (1, 9)]
    saved = {k: v for k, v in q.state_dict().items() if k.startswith("weight.")}
    assert sum(t.numel() for t in saved.values()) < sum(
        t.numel() for k, t in plain.state_dict().items() if k.startswith("weight."))
    x = torch.randn(3, 64) if kind == "linear" else torch.randn(2, 4, 6, 6)
    op = torch.nn.functional.linear if kind == "linear" else module._conv_forward
    w = q.weight.dequantize()
    with torch.no_grad():
        assert torch.allclose(q(x), op(x, w, module.bias), atol=1e-5)
        ref = op(x, module.weight, module.bias)
        assert (q(x) - ref)[:, [1, 9]].abs().max() < (plain(x) - ref)[:, [1, 9]].abs().max()
    with pytest.raises(MixDQError, match="outlier channels"):
        quantize_module(module, LayerSpec("int4", outliers=outliers), backend="quanto")


@pytest.mark.slow
def test_new_widths_compile_without_graph_breaks():
    from test_compile import MODELS, _compiled_matches_eager, quantized

    torch._dynamo.reset()
    outlier_layer = {"weights": "int3", "activations": "int8", "act_range": "dynamic",
                     "outliers": {"weights": "int8", "channels": [1, 5]}}
    plan = BitPlan.from_dict({**LADDER.to_dict(), "layers": {"down_blocks.0.attentions.0.proj_in": outlier_layer}})
    model = quantized("unet", plan)
    assert {m.mixdq_spec.weights for m in model.modules() if hasattr(m, "mixdq_spec")} >= set(NEW)
    assert model.get_submodule("down_blocks.0.attentions.0.proj_in").kept_rows is not None
    call = MODELS["unet"][1]
    explained = torch._dynamo.explain(model)(**call(0))
    assert explained.graph_break_count == 0, explained.break_reasons
    _compiled_matches_eager(model, call, "aot_eager")


def test_recipe_takes_the_ladder_and_the_measured_widths():
    from diffusers_mixdq.builder.recipe import load_recipe

    ladder = {"content": [2, 3, 4, 5, 6, 8], "quality": [3, 4, 5, 6, 8]}
    s = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4, "candidates": ladder,
                                                  "measure": [8, 2, 4]}}).settings()
    assert s.widths == ladder and list(s.measure_widths) == [2, 4, 8]
    assert load_recipe({"pipeline": "x", "weights": {"budget_bits": 4}}).settings().measure_widths is None
    with pytest.raises(MixDQError, match="weights.measure"):
        load_recipe({"pipeline": "x", "weights": {"budget_bits": 4, "measure": [7]}})


def test_a_checkpoint_holding_the_outlier_rows_twice_is_refused_with_the_fix(unet_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    layer = "down_blocks.0.attentions.0.proj_in"
    entry = {"weights": "int4", "activations": "none"}
    plans = {"once": {layer: {**entry, "outliers": {"weights": "int8", "channels": [3, 17]}}}, "twice": {layer: entry}}
    for name, layers in plans.items():
        plan = BitPlan(rules=[{"targets": ["*"], "weights": "none", "activations": "none"}], layers=layers)
        model = UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=plan))
        model.save_pretrained(tmp_path / name)
    files = {n: next((tmp_path / n).glob("*.safetensors")) for n in plans}
    once, twice = load_file(files["once"]), load_file(files["twice"])
    for key in [k for k in once if k.startswith(f"{layer}.weight._")]:
        once[key] = twice[key]  # the rows of the old layout: every row at int4, the outlier rows too
    save_file(once, files["once"], metadata={"format": "pt"})
    with pytest.raises(MixDQError, match="quantize the full-precision model again"):
        UNet2DConditionModel.from_pretrained(tmp_path / "once")
