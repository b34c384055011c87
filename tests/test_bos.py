"""BOS-aware quantization of the text-embedding path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_pipeline, make_unet, rel_err
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.quantizers import PipelineQuantizationConfig

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanMismatchError
from diffusers_mixdq.bos import (
    NonCausalEncoderError,
    attach_bos,
    bos_hidden_state,
    bos_layers,
    check_bos_invariance,
    state_sha256,
    verify_text_encoder,
)
from diffusers_mixdq.builder import record_input_ranges

KV = ["*.attn2.to_k", "*.attn2.to_v"]
CALIB = ["a red circle", "a blue square at the top", "green", "a yellow triangle, small", "purple star"]
EVAL = ["an orange circle at the bottom left", "a big blue square", "cyan", "a tiny red star in the middle"]


@pytest.fixture(scope="module")
def pipe():
    p = make_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def embeddings(pipe, prompts, bos_scale=30.0, max_length=16):
    """Text embeddings with the token-0 state scaled (CLIP's BOS outlier, exaggerated); still prompt-invariant."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0].clone()
    h[:, 0] *= bos_scale
    return h


def unet_run(unet, emb, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(emb.shape[0], 4, 16, 16, generator=g)
    t = torch.full((emb.shape[0],), 400)
    with torch.no_grad():
        return unet(x, t, emb).sample


def test_causal_encoder_state_is_prompt_invariant(pipe):
    state = check_bos_invariance(pipe.text_encoder, pipe.tokenizer)
    assert state.shape == (32,)
    for prompt in ("x", "a much longer prompt with many words in it"):  # truncated to 16 tokens
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            assert (pipe.text_encoder(ids)[0][0, 0] - state).abs().max() < 1e-5
    assert torch.allclose(bos_hidden_state(pipe), state, atol=1e-6)


def test_bidirectional_encoder_is_refused(pipe):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(pipe.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ).eval()
    with pytest.raises(NonCausalEncoderError, match="not causal"):
        check_bos_invariance(t5, pipe.tokenizer)
    assert issubclass(NonCausalEncoderError, MixDQError)


def _load(unet_dir, plan):
    return UNet2DConditionModel.from_pretrained(unet_dir, quantization_config=MixDQConfig(plan=plan))


def test_bos_aware_w8a8_beats_plain_per_tensor(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path)
    fp = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    calib, evaluation = embeddings(pipe, CALIB), embeddings(pipe, EVAL)
    state = calib[0, 0]
    kv_layers = [n for n, m in fp.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    plan = BitPlan(
        defaults={"weights": "none"},
        rules=[{"targets": KV, "weights": "int8", "activations": "int8"}],
    )
    plain_ranges = record_input_ranges(fp, lambda: unet_run(fp, calib), layers=kv_layers)
    bos_ranges = record_input_ranges(fp, lambda: unet_run(fp, calib), layers=kv_layers, skip_first_token=kv_layers)
    assert all(bos_ranges[n] * 5 < plain_ranges[n] for n in kv_layers)  # the outlier dominated the range

    plain = _load(tmp_path, plan.resolve(fp, act_ranges=plain_ranges))
    bos_plan = attach_bos(plan, state).resolve(fp, act_ranges=bos_ranges)
    assert all(bos_plan.layer_specs()[n].flags["bos_aware"] for n in kv_layers)
    aware = _load(tmp_path, bos_plan)
    assert set(bos_layers(aware)) == set(kv_layers) and not bos_layers(plain)

    ref = unet_run(fp, evaluation)
    err_plain = rel_err(unet_run(plain, evaluation), ref)
    err_aware = rel_err(unet_run(aware, evaluation), ref)
    assert err_aware * 2 <= err_plain, (err_aware, err_plain)

    # row 0 of every BOS-aware layer is the full-precision output
    outputs = {}
    hooks = [aware.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n in kv_layers]
    unet_run(aware, evaluation)
    for h in hooks:
        h.remove()
    for n in kv_layers:
        layer = fp.get_submodule(n)
        expected = F.linear(state, layer.weight, layer.bias)
        for b in range(evaluation.shape[0]):
            assert torch.allclose(outputs[n][b, 0], expected, atol=1e-5, rtol=1e-5)


def test_rows_from_full_precision_weights_in_fp16(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path)
    emb = embeddings(pipe, EVAL)
    plan = attach_bos(BitPlan.uniform("int4", activations="int8"), emb[0, 0])
    model = UNet2DConditionModel.from_pretrained(
        tmp_path, torch_dtype=torch.float16, quantization_config=MixDQConfig(plan=plan)
    )
    for name, module in bos_layers(model).items():
        layer = pipe.unet.get_submodule(name)
        bias = None if layer.bias is None else layer.bias.half().float()
        expected = F.linear(emb[0, 0], layer.weight.half().float(), bias)
        assert module.bos_output.dtype == torch.float16
        assert torch.allclose(module.bos_output.float(), expected, rtol=2e-3, atol=2e-3)
    assert set(bos_layers(model)) == {n for n, _ in model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def test_save_reload_keeps_bos_rows_bit_identical(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path / "fp")
    emb = embeddings(pipe, EVAL)
    plan = attach_bos(BitPlan.uniform("int8", activations="int8"), emb[0, 0])
    model = _load(tmp_path / "fp", plan)
    model.save_pretrained(tmp_path / "q")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    assert set(bos_layers(reloaded)) == set(bos_layers(model))
    for name, module in bos_layers(model).items():
        assert torch.equal(bos_layers(reloaded)[name].bos_output, module.bos_output)
    assert torch.equal(unet_run(reloaded, emb), unet_run(model, emb))
    assert reloaded.config.quantization_config.plan.target["bos"]["sha256"] == state_sha256(emb[0, 0])
    # the plan file travels with its tensor sidecar (the BOS state), both beside the weights
    assert (tmp_path / "q" / "mixdq_plan.safetensors").is_file()
    assert torch.equal(reloaded.config.quantization_config.plan.tensors["bos.hidden_state"], emb[0, 0])


def test_non_bos_rows_keep_the_quantized_path(pipe, tmp_path):
    """A sample whose row 0 is not the BOS state (e.g. zeroed negative prompt embeddings) is not overwritten."""
    pipe.unet.save_pretrained(tmp_path)
    emb = embeddings(pipe, EVAL[:2])
    emb[1] = 0.0
    model = _load(tmp_path, attach_bos(BitPlan.uniform("int8", activations="int8"), emb[0, 0]))
    name, module = next(iter(bos_layers(model).items()))
    with torch.no_grad():
        out = module(emb)
    assert torch.allclose(out[0, 0], module.bos_output, atol=1e-6)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))  # zero input (no bias): not the stored row
    assert module.bos_output.abs().max() > 0


@pytest.mark.parametrize("max_length", [16, 10])
def test_pipeline_cfg_batches_and_prompt_embeds(pipe, tmp_path, max_length):
    pipe.save_pretrained(tmp_path)
    state = bos_hidden_state(pipe)
    plan = attach_bos(BitPlan.uniform("int8", activations="int8", ignore=["conv_in", "conv_out"]), state)
    qpipe = DiffusionPipeline.from_pretrained(
        tmp_path, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=plan)})
    )
    qpipe.set_progress_bar_config(disable=True)
    verify_text_encoder(qpipe)
    seen = []
    name, module = next(iter(bos_layers(qpipe.unet).items()))
    module.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    prompts = ["a red circle", "a blue square"]
    common = dict(num_inference_steps=2, height=32, width=32, guidance_scale=4.0, output_type="np")
    images = qpipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **common).images
    assert images.shape[0] == 4 and np.isfinite(images).all()
    x, out = seen[-1]
    assert x.shape[0] == 8  # CFG doubles the batch of 2 prompts x 2 images
    assert torch.allclose(out[:, 0], module.bos_output.expand(8, -1), atol=1e-6)

    ids = qpipe.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
    neg = qpipe.tokenizer([""] * 2, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
    with torch.no_grad():
        pe, ne = qpipe.text_encoder(ids)[0], qpipe.text_encoder(neg)[0]
    seen.clear()
    direct = qpipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0),
                   **common).images
    x, out = seen[-1]
    assert x.shape[1] == max_length
    assert torch.allclose(out[:, 0], module.bos_output.expand(x.shape[0], -1), atol=1e-6)
    if max_length == 16:
        again = qpipe(prompts, generator=torch.Generator().manual_seed(0), **common).images
        assert np.allclose(direct, again, atol=1e-5)


def test_mismatched_text_encoder_is_detected(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    plan = attach_bos(BitPlan.uniform("int8", activations="int8"), bos_hidden_state(pipe))
    qpipe = DiffusionPipeline.from_pretrained(
        tmp_path, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=plan)})
    )
    verify_text_encoder(qpipe)
    other = make_pipeline(seed=7).text_encoder
    qpipe.text_encoder = other
    with pytest.raises(MixDQError, match="does not match the one the unet's BOS rows were computed for"):
        verify_text_encoder(qpipe)


def test_flags_defaults_and_misuse(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path)
    state = bos_hidden_state(pipe)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    plan = attach_bos(BitPlan(defaults={"weights": "int8"}, layers={k: {"flags": {"bos_aware": False}}}), state)
    specs = plan.resolve(pipe.unet).layer_specs()
    assert specs[k].flags == {"bos_aware": False}
    assert specs[k.replace("to_k", "to_v")].flags == {"bos_aware": True}
    assert not specs["conv_in"].flags and not specs[k.replace("attn2", "attn1")].flags
    bad = attach_bos(BitPlan(defaults={"weights": "int8"}, layers={"conv_in": {"flags": {"bos_aware": True}}}), state)
    with pytest.raises(PlanMismatchError, match="flagged BOS-aware but cannot be"):
        bad.resolve(pipe.unet)
    no_state = BitPlan(defaults={"weights": "int8"}, rules=[{"targets": KV, "flags": {"bos_aware": True}}])
    with pytest.raises(PlanMismatchError, match="flagged BOS-aware"):
        no_state.resolve(pipe.unet)
    # a plan saved with its BOS state keeps it in the safetensors sidecar
    path = plan.save(tmp_path / "plan")
    again = BitPlan.load(path.parent)
    assert torch.equal(again.tensors["bos.hidden_state"], state)
    assert again.target["bos"]["sha256"] == state_sha256(state)


def test_dit_cross_attention_gets_bos_rows(tmp_path):
    from conftest import make_pixart, pixart_inputs
    from diffusers import PixArtTransformer2DModel

    make_pixart().save_pretrained(tmp_path)
    inputs = pixart_inputs()
    state = inputs["encoder_hidden_states"][0, 0]
    inputs["encoder_hidden_states"][:, 0] = state
    plan = attach_bos(BitPlan.uniform("int8", activations="int8"), torch.randn(16))
    # PixArt's cross-attention reads 16-dim projected captions: layers of that width get the flag
    model = PixArtTransformer2DModel.from_pretrained(tmp_path, quantization_config=MixDQConfig(plan=plan))
    assert sorted(bos_layers(model)) == sorted(
        f"transformer_blocks.{i}.attn2.to_{kv}" for i in range(2) for kv in "kv"
    )


def test_bos_state_of_another_width_is_one_clear_error(pipe):
    """A BOS state no text-reading layer can use never silently turns BOS handling off (issue #17)."""
    plan = attach_bos(BitPlan.uniform("int8"), torch.randn(48))
    with pytest.raises(PlanMismatchError, match=r"48-dim BOS state.*take 32-dim inputs"):
        plan.resolve(make_unet())
