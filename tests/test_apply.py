"""Applying plans through diffusers' from_pretrained: layer precisions, accuracy, dtypes, modes, save/reload."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from conftest import SMALLEST_UNET, dir_snapshot, make_unet, rel_err, unet_inputs
from diffusers import UNet2DConditionModel

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanMismatchError
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.plan import layer_table

MIXED = BitPlan(
    defaults={"weights": "int8", "activations": "int8", "act_range": "dynamic"},
    rules=[
        {"targets": ["*.attn2.to_[kv]"], "weights": "int4"},
        {"targets": ["*.ff.*"], "weights": "int2", "activations": "none"},
        {"targets": ["*.resnets.*.conv1"], "weights": "float8", "activations": "float8", "act_range": 6.0},
    ],
    ignore=["conv_in", "conv_out"],
    layers={"time_embedding.linear_1": {"weights": "none", "activations": "int8", "act_range": 2.0}},
)


def load(path, plan, **kw):
    return UNet2DConditionModel.from_pretrained(path, quantization_config=MixDQConfig(plan=plan), **kw)


def fp_reference(path, **kw):
    return UNet2DConditionModel.from_pretrained(path, **kw).eval()


def run(model, dtype=torch.float32):
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x.to(dtype), t, e.to(dtype)).sample.float()


def test_loaded_layers_match_the_plan(unet_dir):
    model = load(unet_dir, MIXED)
    expected = {n: (s.weights, s.activations) for n, s in MIXED.resolve(model).layer_specs().items()}
    assert quantized_layers(model) == expected
    kinds = set(expected.values())
    assert {("int4", "int8"), ("int2", "none"), ("float8", "float8"), ("none", "int8"), ("none", "none")} <= kinds
    # the loaded model carries the resolved per-layer table
    carried = model.config.quantization_config.plan
    assert carried.is_resolved and carried.layer_specs() == MIXED.resolve(model).layer_specs()
    # static scales come from the plan's ranges
    conv1 = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv1.input_scale.item() == pytest.approx(6.0 / 448)
    lin = model.get_submodule("time_embedding.linear_1")
    assert lin.input_scale.item() == pytest.approx(2.0 / 127)
    assert torch.isfinite(run(model)).all()


def test_int8_is_near_lossless_on_a_tiny_unet(tmp_path):
    make_unet(**SMALLEST_UNET).save_pretrained(tmp_path)
    ref = run(fp_reference(tmp_path))
    err = rel_err(run(load(tmp_path, BitPlan.uniform("int8"))), ref)
    assert err < 1e-2, err


def test_error_grows_as_bits_shrink(unet_dir):
    ref = run(fp_reference(unet_dir))
    errs = {w: rel_err(run(load(unet_dir, BitPlan.uniform(w))), ref) for w in ("int8", "int4", "int2")}
    assert errs["int8"] < errs["int4"] < errs["int2"], errs
    a8 = rel_err(run(load(unet_dir, BitPlan.uniform("int8", activations="int8"))), ref)
    assert errs["int8"] < a8 < errs["int4"], (a8, errs)


@pytest.mark.parametrize("act, qmax", [("int8", 127), ("int4", 7)])
def test_conv_inputs_are_quantized(unet_dir, act, qmax):
    """Activation-only quantization of one Conv2d: its output equals the conv of the fake-quantized input."""
    name = "down_blocks.0.resnets.0.conv2"
    plan = BitPlan(
        defaults={"weights": "none"},
        layers={name: {"weights": "none", "activations": act, "act_range": 0.5}},
    )
    model = load(unet_dir, plan)
    conv = model.get_submodule(name)
    x = torch.randn(1, conv.in_channels, 8, 8) * 0.3
    scale = torch.tensor(0.5 / qmax)
    expected = torch.nn.functional.conv2d(
        torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale, conv.weight, conv.bias, padding=1
    )
    with torch.no_grad():
        got = conv(x)
        plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dtypes(unet_dir, dtype):
    model = load(unet_dir, MIXED, torch_dtype=dtype)
    assert model.get_submodule("conv_in").weight.dtype == dtype
    assert model.get_submodule("down_blocks.0.resnets.0.conv2").weight._scale.dtype == dtype
    ref = run(fp_reference(unet_dir))
    out = run(model, dtype)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.5  # int2 feed-forwards: lossy, but the same function


@pytest.mark.parametrize("weights", ["int4", "int2", "int8"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_inference_and_no_grad_modes(unet_dir, weights, mode):
    model = load(unet_dir, BitPlan.uniform(weights, activations="int8"))
    x, t, e = unet_inputs()
    with torch.no_grad():
        expected = model(x, t, e).sample
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = model(x, t, e).sample
    assert torch.equal(got, expected)


def test_full_precision_copy_never_materialises_for_quantized_layers(unet_fp16_dir, monkeypatch):
    """Each weight is quantized right after it is placed: at most one full-precision planned weight exists."""
    from diffusers_mixdq.apply import default_backend

    backend = default_backend()
    live = []
    original = backend.quantize_weight_

    def spy(module):
        others = [m for m in seen if m is not module and not m.frozen and m.weight.device.type != "meta"]
        live.append(len(others))
        original(module)

    seen = []
    real_make = backend.make_module

    def track(*args, **kwargs):
        m = real_make(*args, **kwargs)
        seen.append(m)
        return m

    monkeypatch.setattr(backend, "quantize_weight_", spy)
    monkeypatch.setattr(backend, "make_module", track)
    model = load(unet_fp16_dir, BitPlan.uniform("int4"), torch_dtype=torch.float16)
    assert live and max(live) == 0
    assert all(m.frozen for m in seen)
    assert len(seen) == len(layer_table(model))


def test_save_and_reload_is_bit_identical(unet_dir, tmp_path):
    model = load(unet_dir, MIXED)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mixdq"
    saved_plan = BitPlan.load(tmp_path / "mixdq_plan.json")
    assert len(saved_plan.layers) == len(layer_table(model))
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert quantized_layers(reloaded) == quantized_layers(model)
    assert torch.equal(run(reloaded), run(model))
    # a pre-quantized checkpoint is smaller than the full-precision one
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path) < 0.6 * size(unet_dir)


def test_reload_in_fresh_process_after_only_import(unet_dir, tmp_path):
    import subprocess
    import sys

    model = load(unet_dir, BitPlan.uniform("int4", activations="int8"))
    model.save_pretrained(tmp_path / "q")
    torch.save(run(model), tmp_path / "expected.pt")
    code = (
        "import sys, torch, diffusers_mixdq\n"
        "from diffusers import UNet2DConditionModel\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import unet_inputs\n"
        f"m = UNet2DConditionModel.from_pretrained(r'{tmp_path / 'q'}')\n"
        "x, t, e = unet_inputs()\n"
        "with torch.inference_mode():\n"
        "    out = m(x, t, e).sample.float()\n"
        f"assert torch.equal(out, torch.load(r'{tmp_path / 'expected.pt'}')), 'differs'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_bad_plan_leaves_files_untouched(unet_dir):
    before = dir_snapshot(unet_dir)
    other = BitPlan.uniform("int8").resolve(make_unet(cross_attention_dim=48))
    with pytest.raises(PlanMismatchError, match="another architecture"):
        load(unet_dir, other)
    with pytest.raises(MixDQError, match="does not exist"):
        load(unet_dir, BitPlan(defaults={"weights": "int8"}, layers={"nope": {"weights": "int4"}}))
    assert dir_snapshot(unet_dir) == before


def test_config_rejects_bad_arguments(tmp_path):
    with pytest.raises(MixDQError, match="unknown argument"):
        MixDQConfig(plan=BitPlan.uniform(), weights="int8")
    with pytest.raises(MixDQError, match="strict must be True or False"):
        MixDQConfig(plan=BitPlan.uniform(), strict="yes")
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(MixDQError, match="not valid JSON"):
        MixDQConfig(plan=bad)


def test_unsupported_torch_dtype(unet_dir):
    with pytest.raises(MixDQError, match="torch_dtype=torch.float64 is not supported"):
        load(unet_dir, BitPlan.uniform(), torch_dtype=torch.float64)


def test_modules_to_not_convert(unet_dir):
    cfg = MixDQConfig(plan=BitPlan.uniform("int8"), modules_to_not_convert=["*attn1*"])
    model = UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=cfg)
    layers = quantized_layers(model)
    assert all(v == ("none", "none") for k, v in layers.items() if "attn1" in k)
    assert layers["conv_in"] == ("int8", "none")


def test_quanto_extension_builds_in_user_cache():
    from optimum.quanto.library.extensions import cpp

    from diffusers_mixdq.apply.backends.quanto.modules import cache_dir

    assert cpp.ext.build_directory.startswith(str(cache_dir()))
    assert "site-packages" not in cpp.ext.build_directory


def test_repr_and_to_dict_do_not_leak_token():
    cfg = MixDQConfig(plan=BitPlan.uniform(), token="hf_secret")
    assert "hf_secret" not in repr(cfg) and "hf_secret" not in json.dumps(cfg.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MixDQConfig.from_dict(cfg.to_dict()).plan == cfg.plan


# ---------------------------------------------------------------------------------------------- the plan file
def test_config_keeps_a_reference_to_the_plan_file(unet_dir, tmp_path):
    plan_path = MIXED.save(tmp_path / "plans" / "mine.json")
    model = UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=plan_path))
    model.save_pretrained(tmp_path / "q")
    text = (tmp_path / "q" / "config.json").read_text()
    qc = json.loads(text)["quantization_config"]
    plan_file = tmp_path / "q" / "mixdq_plan.json"
    assert qc["plan"] == {"file": "mixdq_plan.json", "sha256": hashlib.sha256(plan_file.read_bytes()).hexdigest()}
    assert str(tmp_path) not in text and "plan_source" not in qc and '"layers"' not in text
    assert len(json.dumps(qc)) < 2048  # small enough for diffusers' user-agent
    assert BitPlan.load(plan_file) == model.config.quantization_config.plan
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.plan == model.config.quantization_config.plan
    assert torch.equal(run(reloaded), run(model))


def test_edited_or_missing_plan_file_is_refused(unet_dir, tmp_path):
    load(unet_dir, BitPlan.uniform("int8")).save_pretrained(tmp_path)
    plan_file = tmp_path / "mixdq_plan.json"
    original = plan_file.read_text()
    plan_file.write_text(original.replace('"int8"', '"int4"', 1))
    with pytest.raises(MixDQError, match="mixdq_plan.json does not match the sha256 its config.json records"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    plan_file.unlink()
    with pytest.raises(MixDQError, match="refers to its plan file mixdq_plan.json, but there is none"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    plan_file.write_text(original)
    assert quantized_layers(UNet2DConditionModel.from_pretrained(tmp_path))["conv_in"] == ("int8", "none")


def test_checkpoint_with_the_table_in_config_json_still_loads(unet_dir, tmp_path):
    """Checkpoints saved before the plan file existed carry the whole resolved table in config.json."""
    model = load(unet_dir, MIXED)
    model.save_pretrained(tmp_path)
    resolved = model.config.quantization_config.plan
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mixdq", "strict": True, "plan_source": str(tmp_path / "p.json"),
                                     "plan": {k: v for k, v in resolved.to_dict().items() if k != "tensors"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "mixdq_plan.json").unlink()
    old = UNet2DConditionModel.from_pretrained(tmp_path)
    assert quantized_layers(old) == quantized_layers(model)
    assert torch.equal(run(old), run(model))
    # saved again, it gets the new layout and forgets the machine path
    old.save_pretrained(tmp_path / "again")
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert set(qc["plan"]) == {"file", "sha256"} and "plan_source" not in qc
    assert torch.equal(run(UNet2DConditionModel.from_pretrained(tmp_path / "again")), run(model))


# ---------------------------------------------------------------------------------------------- extension points
def test_a_second_weight_backend_is_used_for_sizes_and_loading(unet_dir, monkeypatch):
    """A backend registered from outside the package (here: quanto's modules with fp32 scales in its size
    estimate) replaces the default one without any other change."""
    from diffusers_mixdq import registry
    from diffusers_mixdq.apply.backends.quanto import QuantoBackend

    made = []

    class Fp32Scales(QuantoBackend):
        name = "test-fp32-scales"

        def storage_bits(self, dtype, bits, in_features, float_bits=16):
            return super().storage_bits(dtype, bits, in_features, float_bits=32)

        def make_module(self, module, spec, scale_dtype):
            made.append(spec)
            qmodule = super().make_module(module, spec, scale_dtype)
            qmodule.mixdq_backend = self.name
            return qmodule

    model = make_unet()
    plan = BitPlan.uniform("int4")
    quanto_size = plan.summary(model).size_bytes
    monkeypatch.setitem(registry.WEIGHT_BACKENDS._entries, Fp32Scales.name, Fp32Scales())
    monkeypatch.setattr(registry, "DEFAULT_WEIGHT_BACKEND", Fp32Scales.name)
    table = layer_table(model)
    summary = plan.summary(model)
    layer_bits = sum(Fp32Scales().storage_bits("int4", 4, i.in_features) * i.numel for i in table.values())
    assert summary.size_bytes == pytest.approx((layer_bits + 16 * summary.other_params) / 8)
    assert summary.size_bytes > quanto_size
    loaded = load(unet_dir, plan)
    assert len(made) == len(table)
    assert all(m.mixdq_backend == Fp32Scales.name for m in loaded.modules() if hasattr(m, "mixdq_spec"))
    assert set(quantized_layers(loaded).values()) == {("int4", "none")}


def test_activation_schemes_are_picked_from_the_plan_and_extensible(monkeypatch):
    from diffusers_mixdq import LayerSpec
    from diffusers_mixdq.apply import ACTIVATION_SCHEMES, ActivationScheme, quantize_module
    from diffusers_mixdq.apply.activations import scheme_for

    assert scheme_for(LayerSpec("int8", "none")) is None
    assert scheme_for(LayerSpec("int8", "int8", 2.0)).name == "static"
    assert scheme_for(LayerSpec("int8", "int8", "dynamic")).name == "dynamic"
    x = torch.linspace(-1, 1, 9)
    static = ACTIVATION_SCHEMES.get("static")
    scale = torch.tensor(0.5 / 127)
    assert torch.equal(static.quantize(x, "int8", scale), torch.clamp(torch.round(x / scale), -128, 127) * scale)
    dyn = torch.tensor(1.0 / 7)  # from the input's absmax (1.0); the module's input_scale is not used
    assert torch.equal(ACTIVATION_SCHEMES.get("dynamic").quantize(x, "int4", torch.tensor(123.0)),
                       torch.clamp(torch.round(x / dyn), -8, 7) * dyn)

    class Halve(ActivationScheme):
        name = "static"

        def quantize(self, x, dtype, input_scale):
            return x / 2

    with pytest.raises(MixDQError, match="registered already"):
        ACTIVATION_SCHEMES.register("static", Halve())
    monkeypatch.setitem(ACTIVATION_SCHEMES._entries, "static", Halve())
    lin = torch.nn.Linear(8, 4)
    layer = quantize_module(lin, LayerSpec("none", "int8", 1.0))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(layer(x), lin(x / 2), atol=1e-6)
