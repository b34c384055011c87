"""The native backend's real low-precision GEMM path (``torch._int_mm`` on the CPU and CUDA, ``torch._scaled_mm`` on
CUDA), forced on here for the CPU (the int8 GEMM on any CPU, the float8 one by widening its devices): the input goes
through the same balancing, activation scheme, timestep-group scale and outlier rows as on the simulated path; and
the eager CPU path's dequantization of large weights a slice of output channels at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_mixdq import LayerSpec
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.apply.activations import ActivationScheme
from diffusers_mixdq.apply.backends.native import kernels, real_gemm
from diffusers_mixdq.apply.qmodule import MixDQModuleMixin
from diffusers_mixdq.apply.timestep_groups import CLOCK_ATTR, TimestepClock
from diffusers_mixdq.plan.layer_tensors import balance_key

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
