"""MixDQConfig on transformers text encoders: registration, quantize on load, save, pre-quantized reload."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import diffusers_mixdq
from diffusers_mixdq import MixDQConfig, MixDQError

W8 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8", "activations": "none"}}
W4 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int4", "activations": "none"}}


def make_text_encoder(kind: str, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if kind == "t5":
        return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       feed_forward_proj="gated-gelu")).eval()
    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if kind == "clip-proj" else CLIPTextModel
    return cls(config).eval()


def encode(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.last_hidden_state


IDS = torch.tensor([[0, 5, 9, 17, 3, 1], [0, 7, 2, 1, 1, 1]])


def test_registered_with_both_libraries():
    from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as diffusers_configs
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from diffusers_mixdq._registration import is_registered_with_transformers, register_transformers

    register_transformers()  # idempotent: a second registration is no error and keeps one entry
    assert is_registered_with_transformers()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["mixdq"] is diffusers_configs["mixdq"] is MixDQConfig
    assert AUTO_QUANTIZER_MAPPING["mixdq"].__name__ == "MixDQTransformersQuantizer"


def test_import_stays_light_and_registers_when_transformers_quantizers_load():
    code = textwrap.dedent("""
        import sys
        import diffusers_mixdq
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert AUTO_QUANTIZER_MAPPING["mixdq"].__name__ == "MixDQTransformersQuantizer"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind,plan", [("clip", W8), ("clip-proj", W8), ("t5", W8), ("t5", W4)])
def test_quantize_save_reload(tmp_path, kind, plan):
    from diffusers_mixdq.apply.qmodule import is_mixdq_module

    model = make_text_encoder(kind)
    cls = type(model)
    model.save_pretrained(tmp_path / "fp")
    quantized = cls.from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=plan))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_mixdq_module(quantized.get_submodule(n)) for n in linears)
    ref, out = encode(model, IDS), encode(quantized, IDS)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.05 if plan is W8 else 0.3)

    quantized.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "mixdq" and set(saved["plan"]) == {"file", "sha256"}
    assert (tmp_path / "q" / "mixdq_plan.json").is_file()
    reloaded = cls.from_pretrained(tmp_path / "q")  # no plan given: the checkpoint carries it
    assert all(is_mixdq_module(reloaded.get_submodule(n)) for n in linears)
    assert torch.equal(encode(reloaded, IDS), out)


def test_reload_in_a_fresh_process(tmp_path):
    model = make_text_encoder("clip")
    model.save_pretrained(tmp_path / "fp")
    quantized = type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8))
    quantized.save_pretrained(tmp_path / "q")
    torch.save(encode(quantized, IDS), tmp_path / "out.pt")
    torch.save(IDS, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import torch, diffusers_mixdq
        from transformers import CLIPTextModel
        from diffusers_mixdq.apply.qmodule import is_mixdq_module
        model = CLIPTextModel.from_pretrained({str(tmp_path / "q")!r})
        assert is_mixdq_module(model.get_submodule("encoder.layers.0.mlp.fc1"))
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "ids.pt")!r})).last_hidden_state
        assert torch.equal(out, torch.load({str(tmp_path / "out.pt")!r}))
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_saved_model_without_its_plan_file_is_refused(tmp_path):
    model = make_text_encoder("clip")
    model.save_pretrained(tmp_path / "fp")
    type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8)).save_pretrained(
        tmp_path / "q")
    (tmp_path / "q" / "mixdq_plan.json").unlink()
    with pytest.raises(MixDQError, match="mixdq_plan.json"):
        type(model).from_pretrained(tmp_path / "q")


def test_plan_for_another_model_is_refused_before_loading(tmp_path):
    model = make_text_encoder("clip")
    model.save_pretrained(tmp_path / "fp")
    plan = {**W8, "layers": {"text_model.encoder.layers.0.no_such_layer": {"weights": "int8"}}}
    with pytest.raises(MixDQError, match="no_such_layer"):
        type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=plan))


def test_fp16_load_keeps_transformers_fp32_modules_in_floating_point(tmp_path):
    from diffusers_mixdq.apply.qmodule import is_mixdq_module

    model = make_text_encoder("t5")
    model.save_pretrained(tmp_path / "fp")
    quantized = type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8),
                                            dtype=torch.float16)
    ffn = quantized.encoder.block[0].layer[1].DenseReluDense
    assert not is_mixdq_module(ffn.wo) and is_mixdq_module(ffn.wi_0)
    assert diffusers_mixdq.MixDQConfig is MixDQConfig


def test_device_map_one_device_loads_several_is_refused(tmp_path):
    model = make_text_encoder("clip")
    model.save_pretrained(tmp_path / "fp")
    quantized = type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8),
                                            device_map="cpu")
    assert encode(quantized, IDS).isfinite().all()
    with pytest.raises(MixDQError, match="one device"):
        type(model).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8),
                                    device_map={"embeddings": "cpu", "encoder": "meta", "final_layer_norm": "cpu"})
