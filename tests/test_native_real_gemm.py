"""The native backend's real low-precision GEMM path (``torch._int_mm`` on the CPU and CUDA, ``torch._scaled_mm`` on
CUDA), forced on here for the CPU (the int8 GEMM on any CPU, the float8 one by widening its devices): the input goes
through the same balancing, activation scheme, timestep-group scale and outlier rows as on the simulated path; and
the eager CPU path's dequantization of large weights a slice of output channels at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_int8_gemm, rel_err

from diffusers_mixdq import LayerSpec
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.apply.activations import ActivationScheme
from diffusers_mixdq.apply.backends.native import kernels, real_gemm
from diffusers_mixdq.apply.qmodule import MixDQModuleMixin
from diffusers_mixdq.apply.timestep_groups import CLOCK_ATTR, TimestepClock
from diffusers_mixdq.plan.layer_tensors import balance_key, lowrank_keys

GROUPS = ((0.0, 499.0, 1.0), (500.0, 1000.0, 3.0))
CASES = {
    "static": (LayerSpec("int8", "int8", 4.0), torch.float32),
    "dynamic": (LayerSpec("int8", "int8", "dynamic"), torch.float32),
    "per-token": (LayerSpec("int8", "int8", "dynamic-token"), torch.float32),
    "timestep-groups": (LayerSpec("int8", "int8", 8.0, act_groups=GROUPS), torch.float32),
    "balance": (LayerSpec("int8", "int8", 4.0, flags={"balance": True}), torch.float32),
    "outliers": (LayerSpec("int8", "int8", "dynamic-token", outliers={"weights": "int8", "channels": [3, 17]}),
                 torch.float32),
    "fp8": (LayerSpec("float8", "float8", 6.0), torch.bfloat16),
}


def make(case: str):
    spec, dtype = CASES[case]
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 128).to(dtype)
    tensors = {balance_key("l"): torch.rand(256, generator=g) + 0.5}
    module = quantize_module(linear, spec, tensors=tensors, name="l", backend="native")
    x = (torch.randn(2, 24, 256, generator=g) * 2).to(dtype)
    x[:, 5] *= 20  # an outlier token: per-token and per-tensor scales differ
    return module, x


@pytest.fixture
def on_cpu(monkeypatch):
    """The real GEMMs take CPU calls; returns the list of their calls."""
    calls = []
    gemm = real_gemm.gemm
    monkeypatch.setattr(real_gemm, "FP8_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(real_gemm, "_cpu_int8", True)
    monkeypatch.setattr(real_gemm, "gemm", lambda *a: calls.append(_kind(a[0])) or gemm(*a))
    return calls


def _kind(module):
    return torch.float8_e4m3fn if module.act_dtype == "float8" else torch.int8


def _with_clock(module, t: float | None) -> None:
    clock = TimestepClock()
    clock.t = None if t is None else torch.tensor(t)
    setattr(module, CLOCK_ATTR, clock)


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_gemm_takes_the_same_input_transformation(case, on_cpu, monkeypatch):
    module, x = make(case)
    _with_clock(module, 700.0)
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(real_gemm, "FP8_DEVICES", ("cuda",))  # CPU calls simulated
            m.setattr(real_gemm, "_cpu_int8", False)
            assert not real_gemm.accepts(module, x)
            simulated = module(x)
        real = module(x)
    # a layer storing outlier rows apart (valid plans: int2 ... int6 weights, never a real-GEMM layer) stays simulated
    gemms = [] if case == "outliers" else [torch.int8 if CASES[case][1] == torch.float32 else torch.float8_e4m3fn]
    assert on_cpu == gemms
    assert rel_err(real, simulated) < (1e-5 if x.dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_codes_are_the_simulated_quantization(case):
    module, x = make(case)
    _with_clock(module, 700.0)
    x = x / module.mixdq_balance if hasattr(module, "mixdq_balance") else x
    codes, row_scales = real_gemm.prepare_input(module, x, module.input_quant_scale(x))
    assert codes.dtype == (torch.int8 if module.act_dtype == "int8" else torch.float8_e4m3fn)
    assert row_scales.shape == ((48, 1) if module.mixdq_spec.act_range == "dynamic-token" else (1, 1))
    rescaled = (codes.to(x.dtype) * row_scales.to(x.dtype)).reshape(x.shape)
    assert torch.equal(rescaled, MixDQModuleMixin.quantize_input(module, x))


def test_timestep_group_scale_reaches_the_real_gemm(on_cpu):
    module, x = make("timestep-groups")
    outs = []
    with torch.no_grad():
        for t in (100.0, 700.0, None):  # group 1, group 2, outside a denoiser call (the layer's act_range)
            _with_clock(module, t)
            outs.append(module(x))
    assert len(on_cpu) == 3
    assert rel_err(outs[0], outs[1]) > 1e-3 and rel_err(outs[1], outs[2]) > 1e-3


class _NoScale(ActivationScheme):
    def quantize(self, x, dtype, input_scale):
        return x


def test_scheme_without_a_scale_and_refused_shapes_stay_simulated(on_cpu):
    module, x = make("static")
    with torch.no_grad():
        module(x[:, :8])  # 16 rows: cuBLASLt's int8 GEMM wants more, the CPU's takes them
        assert on_cpu == [torch.int8]
        module._act_scheme = _NoScale()
        assert torch.equal(module(x), kernels.linear(module, x))
    assert on_cpu == [torch.int8]


WEIGHTS = ["int8", "int6", "int5", "int4", "int3", "int2", "float8"]  # int3 / 5 / 6: two bit planes


def _layers():
    torch.manual_seed(0)
    return {"linear": torch.nn.Linear(288, 48), "conv3x3": torch.nn.Conv2d(16, 24, 3, padding=1),
            "conv-odd": torch.nn.Conv2d(5, 7, 3, stride=2)}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("kind", sorted(_layers()))
def test_large_weights_run_a_slice_of_channels_at_a_time(kind, weights, monkeypatch):
    module = quantize_module(_layers()[kind], LayerSpec(weights), backend="native")
    x = torch.randn(2, 6, 288) if kind == "linear" else torch.randn(2, module.in_channels, 9, 9)
    full = module.weight.dequantize()
    n = full.shape[0]
    for a, b in ((0, n), (0, 5), (1, n - 3), (n - 1, n)):  # slices across packing blocks (and planes)
        assert torch.equal(kernels.channels(module, a, b), full[a:b])
    with torch.no_grad():
        whole = module(x)
        monkeypatch.setattr(kernels, "CHUNK_BYTES", full[0].numel() * 4 * 5)  # 5 channels a slice
        assert len(kernels.slices(module, x)) == -(-n // 5)
        sliced = module(x)
    assert sliced.shape == whole.shape and rel_err(sliced, whole) < 1e-6


# ----------------------------------------------------------------- the CPU int8 GEMM against the simulated path
#: relative error (L2) of the int8 GEMM's output against the simulated path's, same input: fp32 rounds the
#: simulated products / sums in fp32 (the integer sums are exact), bf16 rounds the simulated GEMM in bf16
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
SCHEMES = {"static": LayerSpec("int8", "int8", 4.0), "dynamic": LayerSpec("int8", "int8", "dynamic"),
           "per-token": LayerSpec("int8", "int8", "dynamic-token"),
           "timestep-groups": LayerSpec("int8", "int8", 8.0, act_groups=GROUPS),
           "balance+lowrank": LayerSpec("int8", "int8", "dynamic-token", flags={"balance": True, "lowrank": True}),
           "int4-activations": LayerSpec("int8", "int4", "dynamic")}


def _odd_layer(spec, k, n, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {balance_key("l"): torch.rand(k, generator=g) + 0.5,
               lowrank_keys("l")[0]: torch.randn(3, k, generator=g) * 0.1,
               lowrank_keys("l")[1]: torch.randn(n, 3, generator=g) * 0.1}
    return quantize_module(torch.nn.Linear(k, n).to(dtype), spec, tensors=tensors, name="l", backend="native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,shape", [(37, 13, (1, 5)), (200, 72, (3, 33)), (64, 8, (4,))])  # K, N: odd too
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_cpu_int8_gemm_equals_the_simulated_path(scheme, k, n, shape, dtype, on_cpu):
    module = _odd_layer(SCHEMES[scheme], k, n, dtype)
    _with_clock(module, 700.0)
    x = (torch.randn(*shape, k, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    with torch.no_grad():
        real = module(x)
        with cpu_int8_gemm(False):
            simulated = module(x)
    assert on_cpu == [torch.int8] and real.dtype == dtype and real.shape == shape + (n,)
    assert rel_err(real, simulated) < TOLERANCE[dtype]


@pytest.mark.parametrize("scheme", ["static", "per-token"])
def test_cpu_chunks_of_rows_give_the_same_output(scheme, on_cpu, monkeypatch):
    module = _odd_layer(SCHEMES[scheme], 96, 40, torch.float32)
    x = torch.randn(2, 150, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = module(x)  # 300 rows: one chunk
        monkeypatch.setattr(real_gemm, "CHUNK_BYTES", 4 * 96 * 64)  # 64 rows a chunk, the last one 44
        monkeypatch.setattr(real_gemm, "MIN_CHUNK_ROWS", 16)
        calls, int_mm = [], torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b, out: calls.append(a.shape[0]) or int_mm(a, b, out=out))
        assert torch.equal(module(x), whole)
    assert calls == [64] * 4 + [44]


def _recorded_layers(model, plan, inputs):
    """``{name: (module, input, output)}`` of every native W8A8 Linear of ``model`` quantized with ``plan``, run once
    with the int8 GEMM on."""
    resolved = plan.resolve(model, strict=False)
    for name, spec in resolved.layer_specs().items():
        if spec.is_quantized:
            model.set_submodule(name, quantize_module(model.get_submodule(name), spec, backend="native"))
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, (module, args[0], out))
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and hasattr(m, "mixdq_spec")]
    with torch.no_grad(), cpu_int8_gemm(True):
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("model_name", ["unet", "pixart"])
@pytest.mark.parametrize("act_range", [4.0, "dynamic", "dynamic-token"])
def test_every_layer_of_a_tiny_denoiser_matches_the_simulated_path(model_name, act_range):
    from conftest import make_pixart, make_unet, pixart_inputs, unet_inputs

    from diffusers_mixdq import BitPlan

    if model_name == "unet":
        x, t, e = unet_inputs()
        model, inputs = make_unet(), dict(sample=x, timestep=t, encoder_hidden_states=e)
    else:
        model, inputs = make_pixart(), pixart_inputs()
    seen = _recorded_layers(model, BitPlan.uniform("int8", activations="int8", act_range=act_range), inputs)
    assert len(seen) >= 8
    with torch.no_grad(), cpu_int8_gemm(False):
        worst = max(rel_err(out, module(inp)) for module, inp, out in seen.values())
    assert worst < TOLERANCE[torch.float32]


@pytest.mark.parametrize("weights", ["int6", "int5", "int4", "int3", "int2"])
@pytest.mark.parametrize("act_range", [4.0, "dynamic-token"])
def test_low_width_weights_with_a_group_per_channel_take_the_int8_gemm(weights, act_range, on_cpu):
    """Affine codes (``w = code * scale - shift``) as int8, the shift's term exactly from the input codes' row
    sums; grouped weights (K > 128, a multiple of 32) stay simulated (per-group integer GEMMs measured slower)."""
    for k, n, takes in ((96, 40, True), (37, 13, True), (256, 24, False)):
        module = _odd_layer(LayerSpec(weights, "int8", act_range), k, n, torch.float32)
        x = torch.randn(3, 21, k, generator=torch.Generator().manual_seed(2)) * 3
        with torch.no_grad():
            real = module(x)
            with cpu_int8_gemm(False):
                simulated = module(x)
        assert real_gemm.integer_weight(module) is takes
        assert rel_err(real, simulated) < TOLERANCE[torch.float32]
    assert on_cpu == [torch.int8, torch.int8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["static", "dynamic", "per-token", "balance+lowrank"])
def test_pointwise_convolutions_take_the_int8_gemm_and_3x3_ones_do_not(scheme, dtype, on_cpu):
    g = torch.Generator().manual_seed(1)
    spec = SCHEMES[scheme]
    outs = []
    for conv in (torch.nn.Conv2d(37, 13, 1), torch.nn.Conv2d(37, 13, 3, padding=1)):
        tensors = {balance_key("c"): torch.rand(37, generator=g) + 0.5,
                   lowrank_keys("c")[0]: torch.randn(3, 37 * conv.kernel_size[0] ** 2, generator=g) * 0.1,
                   lowrank_keys("c")[1]: torch.randn(13, 3, generator=g) * 0.1}
        module = quantize_module(conv.to(dtype), spec, tensors=tensors, name="c", backend="native")
        x = (torch.randn(3, 37, 5, 7, generator=g) * 3).to(dtype)
        with torch.no_grad():
            real = module(x)
            with cpu_int8_gemm(False):
                simulated = module(x)
        assert real.shape == (3, 13, 5, 7) and real.is_contiguous() and real.dtype == dtype
        outs.append(rel_err(real, simulated))
    assert on_cpu == [torch.int8]  # the 1x1 convolution only
    assert outs[0] < TOLERANCE[dtype] and outs[1] == 0


@pytest.mark.parametrize("weights", ["int8", "float8"])
@pytest.mark.parametrize("kind", sorted(_layers()))
def test_per_channel_weights_scale_the_output_when_it_is_smaller(kind, weights, monkeypatch):
    """int8 / float8 weights (one scale per output channel): with fewer rows than the weight has inputs, the codes
    run the GEMM and the output is scaled, alone or with the slices; equal to the dequantized weight's op up to fp32
    rounding. Many rows, or a weight under the size threshold: the weight is scaled, as before."""
    module = quantize_module(_layers()[kind], LayerSpec(weights), backend="native")
    few = torch.randn(1, 3, 288) if kind == "linear" else torch.randn(1, module.in_channels, 4, 4)
    many = torch.randn(4, 100, 288) if kind == "linear" else torch.randn(4, module.in_channels, 40, 40)
    full = module.weight.dequantize()
    used = []
    monkeypatch.setattr(kernels, "codes", lambda m, a, b, f=kernels.codes: used.append((a, b)) or f(m, a, b))

    def check(x, scaled: bool):
        used.clear()
        with torch.no_grad():
            out = module(x)
            ref = (torch.nn.functional.linear(x, full, module.bias) if kind == "linear"
                   else module._conv_forward(x, full, module.bias))
        assert bool(used) == scaled and rel_err(out, ref) < 1e-6
        return len(used)

    monkeypatch.setattr(kernels, "SCALED_OUTPUT_MIN_BYTES", 0)
    assert check(few, True) == 1
    check(many, False)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", full[0].numel() * 4 * 5)  # and 5 channels a slice
    assert check(few, True) == -(-full.shape[0] // 5)
    monkeypatch.setattr(kernels, "SCALED_OUTPUT_MIN_BYTES", full.numel() * 4 + 1)  # below it: as before
    check(few, False)
