"""Plan format v1: loading, validation, rule resolution, fingerprints and summaries (no quantization here)."""

from __future__ import annotations

import json

import pytest
from accelerate import init_empty_weights
from conftest import TINY_UNET, make_pixart

from diffusers_mixdq import BitPlan, MixDQError, PlanFormatError, PlanMismatchError, PlanSourceError
from diffusers_mixdq.plan import (
    LayerInfo,
    fingerprint,
    layer_table,
    resolve_plan_source,
    schema,
    storage_bits_per_weight,
)


@pytest.fixture(scope="module")
def meta_unet():
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**TINY_UNET)


def test_schema_ships_with_package():
    s = schema()
    assert s["properties"]["version"] == {"const": 1}
    assert set(s["$defs"]["weight_dtype"]["enum"]) == {"int8", "int4", "int2", "float8", "none"}


@pytest.mark.parametrize("how", ["file", "dir", "dict", "text", "bitplan"])
def test_load_and_save_round_trip(tmp_path, how):
    plan = BitPlan(
        defaults={"weights": "int8"},
        rules=[{"targets": ["*attn2.to_k"], "weights": "int4", "activations": "int8", "act_range": 3.5}],
        ignore=["conv_in"],
        layers={"conv_out": {"weights": "int2"}},
        provenance={"built_by": "test"},
    )
    if how == "file":
        source = plan.save(tmp_path / "p.json")
    elif how == "dir":
        plan.save(tmp_path / "plan_dir")
        source = tmp_path / "plan_dir"
    elif how == "dict":
        source = plan.to_dict()
    elif how == "text":
        source = plan.to_json()
    else:
        source = plan
    loaded = BitPlan.load(source)
    assert loaded == plan
    assert loaded.to_dict()["format"] == "diffusers-mixdq-plan"
    assert loaded.provenance == {"built_by": "test"}


def test_malformed_json_is_reported_with_position(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "diffusers-mixdq-plan", "version": 1,,}')
    with pytest.raises(PlanFormatError, match=r"not valid JSON.*line 1"):
        BitPlan.load(bad)


def test_unknown_format_version_asks_for_upgrade():
    with pytest.raises(PlanFormatError, match=r"version 7.*Upgrade diffusers-mixdq"):
        BitPlan.load({"format": "diffusers-mixdq-plan", "version": 7})


def test_not_a_plan():
    with pytest.raises(PlanFormatError, match="Not a diffusers-mixdq plan"):
        BitPlan.load({"weights": "int8"})


@pytest.mark.parametrize(
    "where, spec, message",
    [
        ("defaults", {"weights": "int3"}, r"unknown weight dtype 'int3'; use one of int8, int4, int2, float8, none"),
        ("defaults", {"activations": "int2"}, r"unknown activation dtype 'int2'; use one of int8, int4, float8, none"),
        ("defaults", {"weights": "int8", "bits": 8}, r"unknown field"),
        ("defaults", {"activations": "int8", "act_range": -1}, r"act_range must be a positive number"),
    ],
)
def test_bad_specs_raise_plan_format_error(where, spec, message):
    data = {"format": "diffusers-mixdq-plan", "version": 1, where: spec}
    with pytest.raises(PlanFormatError, match=message):
        BitPlan.load(data)


def test_errors_are_value_errors():
    assert issubclass(MixDQError, ValueError)
    with pytest.raises(ValueError):
        BitPlan.load({"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int3"}})


def test_missing_source():
    with pytest.raises(PlanSourceError, match="No plan found at 'nowhere/plan.json'"):
        resolve_plan_source("nowhere/plan.json")
    with pytest.raises(PlanSourceError, match="No plan given"):
        resolve_plan_source(None)


def test_resolution_precedence(meta_unet):
    """explicit layer entry > ignore > rules (later wins, field by field) > defaults."""
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    v = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    plan = BitPlan(
        defaults={"weights": "int8"},
        rules=[
            {"targets": ["*.attn2.to_[kv]"], "weights": "int4", "activations": "int8", "act_range": "dynamic"},
            {"targets": ["re:.*attn2\\.to_v"], "weights": "int2"},
        ],
        ignore=["conv_in", "conv_out", k],
        layers={k: {"weights": "float8"}, "time_embedding.linear_1": {"weights": "none"}},
    )
    specs = plan.resolve(meta_unet).layer_specs()
    assert len(specs) == len(layer_table(meta_unet))
    assert specs["conv_in"].weights == "none" and specs["conv_out"].activations == "none"
    assert specs[k].weights == "float8" and specs[k].activations == "none"  # ignore, then explicit on top
    assert (specs[v].weights, specs[v].activations, specs[v].act_range) == ("int2", "int8", "dynamic")
    assert specs["time_embedding.linear_1"].weights == "none"
    assert specs["down_blocks.0.resnets.0.conv1"].weights == "int8"


def test_resolved_plan_carries_manifest_and_round_trips(meta_unet):
    resolved = BitPlan.uniform("int4").resolve(meta_unet)
    assert resolved.is_resolved
    assert resolved.target["fingerprint"] == fingerprint(layer_table(meta_unet))
    again = BitPlan.load(json.loads(resolved.to_json()))
    assert again.is_resolved and again.layer_specs() == resolved.layer_specs()
    assert again.resolve(meta_unet).layer_specs() == resolved.layer_specs()


def test_unknown_layer_is_refused(meta_unet):
    plan = BitPlan(defaults={"weights": "int8"}, layers={"down_blocks.9.nope": {"weights": "int4"}})
    with pytest.raises(PlanMismatchError, match="'down_blocks.9.nope' does not exist in UNet2DConditionModel"):
        plan.resolve(meta_unet)


def test_non_quantizable_layer_type_is_refused(meta_unet):
    plan = BitPlan(defaults={"weights": "int8"}, layers={"conv_norm_out": {"weights": "int4"}})
    with pytest.raises(PlanMismatchError, match="'conv_norm_out' is a GroupNorm, which cannot be quantized"):
        plan.resolve(meta_unet)


def test_strict_requires_every_layer(meta_unet):
    plan = BitPlan(layers={"conv_in": {"weights": "int8"}})
    with pytest.raises(PlanMismatchError, match=r"says nothing about \d+ quantizable layer[\s\S]*strict=False"):
        plan.resolve(meta_unet)
    with pytest.warns(UserWarning, match="stay in floating point"):
        specs = plan.resolve(meta_unet, strict=False).layer_specs()
    assert specs["conv_in"].weights == "int8" and specs["conv_out"].weights == "none"


def test_rule_matching_nothing(meta_unet):
    plan = BitPlan(defaults={"weights": "int8"}, rules=[{"targets": ["*.attn3.*"], "weights": "int4"}])
    with pytest.raises(PlanMismatchError, match=r"match no layer[\s\S]*attn3"):
        plan.resolve(meta_unet)
    with pytest.warns(UserWarning):
        plan.resolve(meta_unet, strict=False)


def test_static_activations_need_a_range(meta_unet):
    plan = BitPlan(defaults={"weights": "int8", "activations": "int8"})
    with pytest.raises(PlanFormatError, match=r"Static activation quantization needs a range[\s\S]*act_range"):
        plan.resolve(meta_unet)


def test_fingerprint_from_other_architecture_lists_differences(meta_unet):
    from diffusers import UNet2DConditionModel

    resolved = BitPlan.uniform("int8").resolve(meta_unet)
    with init_empty_weights():
        other = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 48})
    with pytest.raises(PlanMismatchError, match=r"another architecture[\s\S]*attn2.to_k' is Linear \[32, 32\] in the plan"):
        resolved.resolve(other)
    with pytest.raises(PlanMismatchError, match="made for a UNet2DConditionModel, but it is being applied to a PixArt"):
        resolved.resolve(make_pixart())


def test_fingerprint_ignores_order_and_sees_shapes():
    a = {"x": LayerInfo("Linear", (4, 8)), "y": LayerInfo("Conv2d", (4, 4, 3, 3))}
    b = dict(reversed(list(a.items())))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "x": LayerInfo("Linear", (4, 9))})


def test_summary_numbers(meta_unet):
    resolved = BitPlan(
        defaults={"weights": "int8"}, ignore=["conv_in"], layers={"conv_out": {"weights": "int4"}}
    ).resolve(meta_unet)
    s = resolved.summary()
    table = layer_table(meta_unet)
    params = sum(i.numel for i in table.values())
    n_in, n_out = table["conv_in"].numel, table["conv_out"].numel
    assert s.num_layers == len(table)
    assert s.weight_layers == {"none": 1, "int4": 1, "int8": len(table) - 2}
    expected_bits = (16 * n_in + 4 * n_out + 8 * (params - n_in - n_out)) / params
    assert s.avg_weight_bits == pytest.approx(expected_bits)
    assert s.fp16_bytes == 2 * params and s.fp32_bytes == 4 * params
    assert 1.8 < s.ratio_vs_fp16 < 2.0  # int8 plus per-channel scales
    assert "average weight bits" in str(s)
    with_model = resolved.summary(meta_unet)
    assert with_model.other_params > 0 and with_model.fp16_bytes == 2 * (params + with_model.other_params)


def test_storage_bits_follow_group_layout():
    assert storage_bits_per_weight("int4", LayerInfo("Linear", (64, 256))) == pytest.approx(4 + 32 / 128)
    assert storage_bits_per_weight("int4", LayerInfo("Conv2d", (64, 32, 3, 3))) == pytest.approx(4 + 32 / 96)
    assert storage_bits_per_weight("int8", LayerInfo("Linear", (64, 256))) == pytest.approx(8 + 16 / 256)
    assert storage_bits_per_weight("none", LayerInfo("Linear", (64, 256))) == 16


def test_tensor_sidecar_round_trip(tmp_path):
    import torch

    plan = BitPlan(defaults={"weights": "int8"})
    plan.tensors = {"bos.a": torch.arange(6.0).reshape(2, 3)}
    path = plan.save(tmp_path / "withtensors")
    assert (path.parent / "plan.safetensors").is_file()
    assert json.loads(path.read_text())["tensors"] == "plan.safetensors"
    again = BitPlan.load(path.parent)
    assert torch.equal(again.tensors["bos.a"], plan.tensors["bos.a"])
    (path.parent / "plan.safetensors").unlink()
    with pytest.raises(PlanFormatError, match="no such file beside it"):
        BitPlan.load(path.parent)
