"""Plan key ``embeddings``: nn.Embedding tables stored int8 (one scale per row) by both quantizers and every weight
backend, saved and reloaded pre-quantized, counted honestly in plan summaries, malformed values refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet, rel_err, unet_inputs
from test_transformers_backend import IDS, W8, encode, make_text_encoder

from diffusers_mixdq import BitPlan, MixDQConfig, PlanFormatError, PlanMismatchError
from diffusers_mixdq.apply.embeddings import Int8Embedding, swap_tables
from diffusers_mixdq.plan.embeddings import ROW_SCALE_BITS, int8_tables

INT8 = {"weights": "int8"}
W8E = {**W8, "embeddings": INT8}
TABLES = {"clip": ["embeddings.token_embedding", "embeddings.position_embedding"],
          "t5": ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]}  # T5's shared table is tied


@pytest.mark.parametrize("backend", ["quanto", "native"])
@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoder_tables_at_int8(tmp_path, kind, backend):
    from safetensors.torch import load_file

    model = make_text_encoder(kind)
    model.save_pretrained(tmp_path / "fp")
    load = lambda plan: type(model).from_pretrained(  # noqa: E731
        tmp_path / "fp", quantization_config=MixDQConfig(plan=plan, weight_backend=backend))
    quantized, plain = load(W8E), load(W8)
    swapped = [n for n, m in quantized.named_modules() if isinstance(m, Int8Embedding)]
    assert swapped == TABLES[kind]
    for name in swapped:  # the table is the per-row int8 rounding of the full-precision one
        fp_table, table = model.get_submodule(name).weight, quantized.get_submodule(name).weight.dequantize()
        assert quantized.get_submodule(name).int8_weight.dtype == torch.int8
        assert (table - fp_table).abs().max() <= fp_table.abs().amax(1).max() / 254 + 1e-6
    ref, out = encode(model, IDS), encode(quantized, IDS)
    assert rel_err(out, ref) < rel_err(encode(plain, IDS), ref) + 0.01

    quantized.save_pretrained(tmp_path / "q")
    saved = load_file(tmp_path / "q" / "model.safetensors")
    for name in swapped:
        assert saved[f"{name}.int8_weight"].dtype == torch.int8 and f"{name}.weight" not in saved
    reloaded = type(model).from_pretrained(tmp_path / "q")
    assert torch.equal(encode(reloaded, IDS), out)


def test_diffusers_model_table_at_int8(tmp_path):
    unet = make_unet(num_class_embeds=10)
    unet.save_pretrained(tmp_path / "fp")
    from diffusers import UNet2DConditionModel

    quantized = UNet2DConditionModel.from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8E))
    assert isinstance(quantized.class_embedding, Int8Embedding)
    x, t, e = unet_inputs()
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        ref, out = unet(x, t, e, class_labels=labels).sample, quantized(x, t, e, class_labels=labels).sample
    assert 0 < rel_err(out, ref) < 0.05
    quantized.save_pretrained(tmp_path / "q")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, e, class_labels=labels).sample, out)


def test_summary_counts_int8_tables():
    model = make_text_encoder("clip")
    plain, with_tables = (BitPlan(defaults=W8["defaults"], embeddings=e).summary(model) for e in (None, INT8))
    tables = int8_tables(model).values()
    params, rows = sum(m.weight.numel() for m in tables), sum(m.num_embeddings for m in tables)
    assert with_tables.int8_embedding_params == params
    assert plain.size_bytes - with_tables.size_bytes == pytest.approx((8 * params - ROW_SCALE_BITS * rows) / 8)
    assert with_tables.fp16_bytes == plain.fp16_bytes
    assert "embedding-table parameters (int8 rows)" in str(with_tables)


def test_embeddings_key_round_trips_and_is_checked():
    plan = BitPlan(defaults=W8["defaults"], embeddings=INT8)
    assert BitPlan.load(plan.to_dict()).embeddings == INT8
    assert plan.resolve(make_text_encoder("clip")).embeddings == INT8  # what a quantized model saves
    for bad in ({"weights": "int4"}, {"weight": "int8"}, {"weights": "int8", "rows": 3}, "int8"):
        with pytest.raises(PlanFormatError, match="embeddings"):
            BitPlan(defaults=W8["defaults"], embeddings=bad)


def test_tables_that_renormalise_rows_are_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(PlanMismatchError, match="max_norm"):
        swap_tables(model, INT8, torch.float32, from_full_precision=True)
