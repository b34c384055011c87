"""Text encoders go through the same per-weight steps as diffusers models (``apply/swap.quantize_placed_weight_``):
outlier rows (plan key ``outliers``) are filled, round-trip pre-quantized, and equal the in-memory path's; the native
weight backend loads text encoders too."""

from __future__ import annotations

import pytest
import torch
from test_transformers_backend import IDS, W4, encode, make_text_encoder

from diffusers_mixdq import MixDQConfig
from diffusers_mixdq.apply.convert import quantize_module

LAYER = "encoder.layers.0.mlp.fc1"  # Linear 32 -> 64
CHANNELS = [3, 17, 40]


@pytest.fixture(scope="module")
def outlier_encoder_dir(tmp_path_factory):
    """The tiny CLIP text encoder with a few rows of LAYER made outlier-heavy (one weight 40x the row's others)."""
    model = make_text_encoder("clip")
    with torch.no_grad():
        w = model.get_submodule(LAYER).weight
        for r in CHANNELS:
            w[r, 7] = 40 * w[r].abs().max()
    path = tmp_path_factory.mktemp("outlier-clip")
    model.save_pretrained(path)
    return path


def outlier_plan(channels):
    entry = {"weights": "int4"}
    if channels:
        entry["outliers"] = {"weights": "int8", "channels": channels}
    return {**W4, "layers": {LAYER: entry}}


@pytest.mark.parametrize("backend", [None, "native"])  # None: the default backend, which picks native for them
def test_outlier_rows_on_a_text_encoder(outlier_encoder_dir, tmp_path, backend):
    from transformers import CLIPTextModel

    fp = CLIPTextModel.from_pretrained(outlier_encoder_dir).eval()
    load = lambda path, plan=None: CLIPTextModel.from_pretrained(  # noqa: E731
        path, quantization_config=None if plan is None else MixDQConfig(plan=plan, weight_backend=backend))
    model, plain = load(outlier_encoder_dir, outlier_plan(CHANNELS)), load(outlier_encoder_dir, outlier_plan([]))
    layer = model.get_submodule(LAYER)
    assert layer.outlier_channels.tolist() == CHANNELS and layer.outlier_weight.dtype == torch.int8

    # the same layer quantized in memory (the path the builder and the diffusers quantizer share) agrees exactly
    twin = quantize_module(fp.get_submodule(LAYER), layer.mixdq_spec, backend="native")
    for name in ("outlier_channels", "outlier_weight", "outlier_scale"):
        assert torch.equal(getattr(layer, name), getattr(twin, name))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x))
        ref = fp.get_submodule(LAYER)(x)
        err = lambda m: ((m(x) - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(layer) < 0.5 * err(plain.get_submodule(LAYER))  # the int8 rows help where they should

    out = encode(model, IDS)
    model.save_pretrained(tmp_path / "q")
    reloaded = load(tmp_path / "q")
    for name in ("outlier_channels", "outlier_weight", "outlier_scale"):
        assert torch.equal(getattr(reloaded.get_submodule(LAYER), name), getattr(layer, name))
    assert torch.equal(encode(reloaded, IDS), out)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_native_backend_loads_text_encoders_like_quanto(tmp_path, kind):
    """transformers re-creates non-persistent buffers and re-initialises weights after loading: the native
    backend's packed weights must survive both (they equal the quanto backend's outputs)."""
    model = make_text_encoder(kind)
    model.save_pretrained(tmp_path / "fp")
    outs = {}
    for backend in ("quanto", "native"):
        quantized = type(model).from_pretrained(tmp_path / "fp",
                                                quantization_config=MixDQConfig(plan=W4, weight_backend=backend))
        outs[backend] = encode(quantized, IDS)
    ref = encode(model, IDS)
    assert torch.allclose(outs["native"], outs["quanto"], atol=1e-5)
    assert 0 < ((outs["native"] - ref).norm() / ref.norm()).item() < 0.3


def test_quanto_backend_named_for_outlier_rows_is_refused_before_loading(outlier_encoder_dir):
    from transformers import CLIPTextModel

    from diffusers_mixdq import MixDQError

    with pytest.raises(MixDQError, match='weight_backend="native"'):
        CLIPTextModel.from_pretrained(outlier_encoder_dir,
                                      quantization_config=MixDQConfig(plan=outlier_plan(CHANNELS), weight_backend="quanto"))
