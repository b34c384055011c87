"""The native weight backend: quanto's layout and numerics without optimum-quanto, checkpoints interchangeable
with the quanto backend, its kernels (packed few-row kernels, caches) equal to the dequantized reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import cpu_int8_gemm, rel_err, unet_inputs
from diffusers import UNet2DConditionModel
from test_apply import MIXED

from diffusers_mixdq import BitPlan, LayerSpec, MixDQConfig, MixDQError, use_weight_backend
from diffusers_mixdq.apply import quantize_module, quantized_layers
from diffusers_mixdq.apply.backends.native import cache, kernels

WEIGHTS = ["int8", "int4", "int2", "float8"]


def layers():
    torch.manual_seed(0)
    return {"linear": torch.nn.Linear(288, 48), "linear-small": torch.nn.Linear(64, 24, bias=False),
            "conv3x3": torch.nn.Conv2d(16, 24, 3, padding=1), "conv1x1": torch.nn.Conv2d(160, 8, 1),
            "conv-odd": torch.nn.Conv2d(5, 6, 3, stride=2)}


def layer_input(module, rows=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    if isinstance(module, torch.nn.Linear):
        return torch.randn(2, rows, module.in_features, generator=g).to(dtype)
    return torch.randn(2, module.in_channels, 9, 9, generator=g).to(dtype)


def as_bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def load(path, plan, backend=None, **kw):
    config = MixDQConfig(plan=plan, weight_backend=backend)
    return UNet2DConditionModel.from_pretrained(path, quantization_config=config, **kw)


def run(model, dtype=torch.float32):
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x.to(dtype), t, e.to(dtype)).sample.float()


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("kind", sorted(layers()))
def test_same_stored_weight_and_output_as_quanto(weights, kind):
    module = layers()[kind]
    spec = LayerSpec(weights, "int8" if weights == "int8" else "none", "dynamic" if weights == "int8" else None)
    quanto, native = quantize_module(module, spec, backend="quanto"), quantize_module(module, spec, backend="native")
    sq, sn = quanto.state_dict(), native.state_dict()
    assert sorted(sq) == sorted(sn)
    for key in sq:
        assert sq[key].shape == sn[key].shape and sq[key].dtype == sn[key].dtype, key
        assert torch.equal(as_bytes(sq[key]), as_bytes(sn[key])), key
    x = layer_input(module)
    with torch.no_grad():
        with cpu_int8_gemm(False):  # the simulated path: quanto's numerics bit for bit
            assert torch.equal(native(x), quanto(x))
        with cpu_int8_gemm(True):  # W8A8 Linears through torch._int_mm: exact integer sums, rescaled in fp32
            assert rel_err(native(x), quanto(x)) < 1e-6
        assert torch.equal(native.weight.dequantize(), quanto.weight.dequantize())
    assert native.weight.shape == module.weight.shape and native.weight.dtype == torch.float32


def test_loaded_model_matches_the_quanto_backend(unet_dir):
    quanto, native = load(unet_dir, MIXED), load(unet_dir, MIXED, "native")
    assert quantized_layers(native) == quantized_layers(quanto)
    assert {m.mixdq_backend for m in native.modules() if hasattr(m, "mixdq_spec")} == {"native"}
    with cpu_int8_gemm(False):
        assert torch.equal(run(native), run(quanto))
    with cpu_int8_gemm(True):  # exact per layer (tests/test_native_real_gemm.py: < 1e-6 on the same input); a
        # last-bit difference moves an input on a rounding boundary to the next code downstream, and this random
        # network amplifies it (measured: 1 of 12288 codes of up_blocks.0.resnets.1.conv_shortcut's input -> 2.4e-2)
        assert rel_err(run(native), run(quanto)) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoints_move_between_backends(unet_dir, tmp_path, dtype, monkeypatch):
    from diffusers_mixdq.apply.backends.native import real_gemm

    with cpu_int8_gemm(False):  # bit-for-bit comparisons with quanto: the simulated path
        _checkpoints_move_between_backends(unet_dir, tmp_path, dtype)
    quanto = load(unet_dir, MIXED, torch_dtype=dtype)
    with use_weight_backend("native"), cpu_int8_gemm(True):  # a quanto checkpoint runs the int8 GEMM in native
        from_quanto = UNet2DConditionModel.from_pretrained(tmp_path / "q", torch_dtype=dtype)
        calls, gemm = [], real_gemm.gemm
        monkeypatch.setattr(real_gemm, "gemm", lambda *a: calls.append(1) or gemm(*a))
        out = run(from_quanto, dtype)
        assert calls
    with cpu_int8_gemm(False):
        ref = run(load(unet_dir, MIXED, "native"))
    assert rel_err(out, ref) < (0.05 if dtype == torch.float32 else 2 * rel_err(run(quanto, dtype), ref) + 0.05)


def _checkpoints_move_between_backends(unet_dir, tmp_path, dtype):
    quanto = load(unet_dir, MIXED, torch_dtype=dtype)
    quanto.save_pretrained(tmp_path / "q")
    with use_weight_backend("native"):
        from_quanto = UNet2DConditionModel.from_pretrained(tmp_path / "q", torch_dtype=dtype)
    assert {m.mixdq_backend for m in from_quanto.modules() if hasattr(m, "mixdq_spec")} == {"native"}
    native = load(unet_dir, MIXED, "native", torch_dtype=dtype)
    assert torch.equal(run(from_quanto, dtype), run(native, dtype))
    if dtype == torch.float32:
        assert torch.equal(run(from_quanto, dtype), run(quanto, dtype))
    else:  # quanto's bf16 CPU kernels round differently; both stay as close to the fp32 model
        ref = run(load(unet_dir, MIXED, "native"))
        assert rel_err(run(native, dtype), ref) < 2 * rel_err(run(quanto, dtype), ref) + 0.02
    native.save_pretrained(tmp_path / "n")  # round trip, and the config remembers the backend
    again = UNet2DConditionModel.from_pretrained(tmp_path / "n", torch_dtype=dtype)
    assert again.config.quantization_config.weight_backend == "native"
    assert torch.equal(run(again, dtype), run(native, dtype))
    sa, sn = again.state_dict(), native.state_dict()
    assert sorted(sa) == sorted(sn) and all(torch.equal(as_bytes(sa[k]), as_bytes(sn[k])) for k in sn)
    with use_weight_backend("quanto"):  # and the native save loads into quanto
        assert torch.equal(run(UNet2DConditionModel.from_pretrained(tmp_path / "n", torch_dtype=dtype), dtype),
                           run(quanto, dtype))


def test_load_state_dict_and_bad_pieces(unet_dir):
    native = load(unet_dir, BitPlan.uniform("int4"), "native")
    fresh = load(unet_dir, BitPlan.uniform("int4"), "native")
    state = {k: v.clone() for k, v in native.state_dict().items()}
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh), run(native))
    key = next(k for k in state if k.endswith("weight._scale"))
    state[key] = state[key][:1]
    with pytest.raises(RuntimeError, match="the layer needs"):
        fresh.load_state_dict(state)


def test_no_optimum_quanto_to_quantize_save_load_and_run(unet_dir, tmp_path):
    """optimum-quanto made unimportable: the native backend quantizes, saves, reloads and runs all the same."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "optimum.quanto" or name.startswith("optimum.quanto."):
                    raise ImportError("optimum-quanto is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers_mixdq import BitPlan, MixDQConfig
        plan = BitPlan(defaults={{"weights": "int8", "activations": "int8", "act_range": "dynamic"}},
                       rules=[{{"targets": ["*attn*"], "weights": "int4"}}, {{"targets": ["*ff*"], "weights": "int2"}}])
        m = UNet2DConditionModel.from_pretrained({str(unet_dir)!r},
                                                 quantization_config=MixDQConfig(plan=plan, weight_backend="native"))
        m.save_pretrained({str(tmp_path)!r})
        m = UNet2DConditionModel.from_pretrained({str(tmp_path)!r})
        out = m(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 7, 32)).sample
        assert torch.isfinite(out).all()
        assert not [k for k in sys.modules if k.startswith("optimum.quanto")]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_packed_kernels_for_few_rows_in_bf16(kind, weights):
    module = layers()[kind].to(torch.bfloat16)
    native = quantize_module(module, LayerSpec(weights), backend="native")
    if weights == "int4":
        assert (cache.prepare_int4_kernels(native) > 0) == (kind == "linear")  # group 96 -> kernel groups of 32
    x = layer_input(module, rows=1, dtype=torch.bfloat16)
    x = x[:, :, :2, :1] if x.dim() == 4 else x  # 2 x 1 x 2 pixels / 2 x 1 tokens: few rows
    rows = x.numel() // (x.shape[-1] if x.dim() == 3 else x.shape[1])
    uses_packed = kernels._packed_kernel(native, rows, x) is not None
    assert uses_packed == (weights == "int8" or kind == "linear")
    reference = (torch.nn.functional.linear(x.float(), native.weight.dequantize().float(), None) if kind == "linear"
                 else native._conv_forward(x.float(), native.weight.dequantize().float(), None))
    if native.bias is not None:
        reference = reference + (native.bias.float() if kind == "linear" else native.bias.float()[:, None, None])
    with torch.no_grad():
        assert rel_err(native(x).float(), reference) < 1e-2


def test_dequantize_once_cache_is_opt_in_and_counted():
    torch.manual_seed(0)
    model = torch.nn.Sequential(quantize_module(torch.nn.Conv2d(16, 24, 3), LayerSpec("int4"), backend="native"),
                                quantize_module(torch.nn.Conv2d(24, 8, 1), LayerSpec("int8"), backend="native"))
    x = layer_input(model[0])
    with torch.no_grad():
        before = model(x)
        added = cache.cache_dequantized(model)
        assert added == model[0].weight.numel() * 4 and model[1].dequantized_cache is None  # 1x1: not by default
        assert torch.equal(model(x), before)
        assert cache.cache_dequantized(model, kinds=("conv",), pointwise=True) == added + model[1].weight.numel() * 4
        assert cache.drop_dequantized(model) == added + model[1].weight.numel() * 4
    with pytest.raises(MixDQError, match="Unknown layer kind"):
        cache.cache_dequantized(model, kinds=("attention",))


def test_modes_gradients_and_dtype_moves():
    module = layers()["linear"]
    native = quantize_module(module, LayerSpec("int8"), backend="native")
    x = layer_input(module)
    with torch.inference_mode():
        expected = native(x)
    x.requires_grad_(True)  # with autograd recording, the weight is never the shared workspace
    out = native(x)
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert torch.allclose(x.grad, native.weight.dequantize().sum(0).expand_as(x), atol=1e-5)
    f8 = quantize_module(layers()["conv3x3"], LayerSpec("float8"), backend="native")
    stored = f8.state_dict()["weight._data"].clone()
    f8.to(torch.bfloat16)  # float8 data is held as bytes: casting the model never touches it
    assert torch.equal(as_bytes(f8.state_dict()["weight._data"]), as_bytes(stored))
    assert f8.weight.dtype == torch.bfloat16 and f8.qscale.dtype == torch.bfloat16


def test_backend_choice_errors():
    with pytest.raises(MixDQError, match="weight_backend must be one of"):
        MixDQConfig(plan=BitPlan.uniform("int8"), weight_backend="nope")
    with pytest.raises(MixDQError, match="Unknown weight backend"), use_weight_backend("nope"):
        pass
    assert "weight_backend" not in MixDQConfig(plan=BitPlan.uniform("int8")).to_dict()
    assert MixDQConfig(plan=BitPlan.uniform("int8"), weight_backend="native").to_dict()["weight_backend"] == "native"


# ---------------------------------------------------------------------------------------------- CUDA (GPU only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _real_and_simulated(spec, dtype):
    from diffusers_mixdq.apply.backends.native import real_gemm
    from diffusers_mixdq.apply.qmodule import MixDQModuleMixin

    torch.manual_seed(0)
    module = quantize_module(torch.nn.Linear(256, 128).to("cuda", dtype), spec, backend="native")
    x = torch.randn(4, 32, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert real_gemm.accepts(module, x)
        simulated = kernels.linear(module, MixDQModuleMixin.quantize_input(module, x))
        return module(x), simulated


def test_cpu_int8_gemm_follows_the_switch(monkeypatch):
    from diffusers_mixdq.apply.backends.native import real_gemm

    module = quantize_module(layers()["linear"], LayerSpec("int8", "int8", "dynamic"), backend="native")
    x = layer_input(module, rows=24)
    monkeypatch.setattr(real_gemm, "_cpu_int8", real_gemm._cpu_int8)  # restored after the test
    real_gemm.use_cpu_int8_gemm(False)
    assert not real_gemm.accepts(module, x)
    real_gemm.use_cpu_int8_gemm(True)
    assert real_gemm.accepts(module, x)
    fp8 = quantize_module(layers()["linear"], LayerSpec("float8", "float8", 6.0), backend="native")
    assert not real_gemm.accepts(fp8.to(torch.bfloat16), x.to(torch.bfloat16))  # float8 GEMMs: CUDA only
    for value, expected in (("0", False), ("on", True), ("", real_gemm.cpu_has_int8_instructions())):
        monkeypatch.setenv(real_gemm.CPU_INT8_ENV, value)
        real_gemm.use_cpu_int8_gemm(None)
        assert real_gemm.cpu_int8_gemm_enabled() is expected
    monkeypatch.setattr(real_gemm, "_HAS_INT8", True)  # by default: calls of enough work, on VNNI / AMX CPUs
    assert real_gemm._cpu_int8 is None and not real_gemm.accepts(module, x)  # 2 x 24 x 288 x 48 multiply-adds
    monkeypatch.setattr(real_gemm, "CPU_MIN_WORK", 2 * 24 * 288 * 48)
    assert real_gemm.accepts(module, x)
    monkeypatch.setattr(real_gemm, "_HAS_INT8", False)
    assert not real_gemm.accepts(module, x)
    monkeypatch.setenv(real_gemm.CPU_INT8_ENV, "maybe")
    with pytest.raises(MixDQError, match="DIFFUSERS_MIXDQ_CPU_INT8_GEMM='maybe' is not understood"):
        real_gemm.use_cpu_int8_gemm(None)


@needs_cuda
@pytest.mark.parametrize("act_range", [4.0, "dynamic"])
def test_cuda_int8_gemm_matches_the_simulated_path(act_range):
    real, simulated = _real_and_simulated(LayerSpec("int8", "int8", act_range), torch.float32)
    assert rel_err(real, simulated) < 1e-4


@needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_cuda_fp8_scaled_mm_matches_the_simulated_path():
    real, simulated = _real_and_simulated(LayerSpec("float8", "float8", 6.0), torch.bfloat16)
    assert rel_err(real, simulated) < 2e-2
