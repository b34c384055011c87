"""Plan format v1: loading, validation, rule resolution, fingerprints and summaries (no quantization here)."""

from __future__ import annotations

import json
import re

import pytest
from accelerate import init_empty_weights
from conftest import TINY_UNET, make_pixart

from diffusers_mixdq import BitPlan, MixDQError, PlanFormatError, PlanMismatchError, PlanSourceError, families
from diffusers_mixdq.plan import (
    ACTIVATION_DTYPES,
    BOS_DEFAULT_PATTERNS,
    WEIGHT_DTYPES,
    LayerInfo,
    fingerprint,
    layer_table,
    resolve_plan_source,
    schema,
    storage_bits_per_weight,
)
from diffusers_mixdq.plan import resolve, validation
from diffusers_mixdq.plan.summary import format_bytes


@pytest.fixture(scope="module")
def meta_unet():
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**TINY_UNET)


def test_schema_ships_with_package():
    s = schema()
    assert s["properties"]["version"] == {"const": 1}
    assert set(s["$defs"]["weight_dtype"]["enum"]) == {"int8", "int6", "int5", "int4", "int3", "int2", "float8", "none"}


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
        ("defaults", {"weights": "int7"},
         r"unknown weight dtype 'int7'; use one of int8, int6, int5, int4, int3, int2, float8, none"),
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
        BitPlan.load({"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int7"}})


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
    with pytest.warns(UserWarning, match=r"match no layer[\s\S]*attn3") as caught:
        plan.resolve(meta_unet, strict=False)
    assert caught[0].filename == __file__  # the warning points at the caller of resolve()


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


def test_schema_spells_the_dtype_vocabulary():
    s = schema()
    assert s["$defs"]["weight_dtype"]["enum"] == list(WEIGHT_DTYPES)
    assert s["$defs"]["activation_dtype"]["enum"] == list(ACTIVATION_DTYPES)


def test_a_plan_must_be_an_object():
    with pytest.raises(PlanFormatError, match="A plan must be a JSON object, got list"):
        BitPlan.from_json("[1, 2]")


@pytest.mark.parametrize("how", ["file", "dict", "text", "bitplan", "constructor"])
def test_schema_is_validated_once_per_load(tmp_path, monkeypatch, how):
    plan = BitPlan(defaults={"weights": "int8"}, rules=[{"targets": ["conv_*"], "weights": "int4"}])
    path = plan.save(tmp_path / "p.json")
    calls = []
    real = validation.validate_plan_data
    monkeypatch.setattr(validation, "validate_plan_data", lambda data: calls.append(data) or real(data))
    sources = {"file": path, "dict": plan.to_dict(), "text": plan.to_json(), "bitplan": plan}
    loaded = BitPlan(defaults={"weights": "int8"}) if how == "constructor" else BitPlan.load(sources[how])
    assert len(calls) == 1
    assert loaded.defaults == {"weights": "int8"}


def test_bad_files_are_still_refused_after_one_validation(tmp_path):
    bad = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8"}, "extra": 1}
    (tmp_path / "plan.json").write_text(json.dumps(bad))
    with pytest.raises(PlanFormatError, match=r"\(top level\): Additional properties are not allowed \('extra'"):
        BitPlan.load(tmp_path)
    manifest = {"format": "diffusers-mixdq-plan", "version": 1, "target": {"layers": {"x": ["Linear", [4, 4], 1]}}}
    with pytest.raises(PlanFormatError, match="target.layers"):
        BitPlan.load(manifest)


def test_each_pattern_is_matched_once_per_layer(meta_unet, monkeypatch):
    """Patterns shared by rules and the ignore list are matched in one pass over the layers (RE2 sets)."""
    calls = []

    def match_all(patterns, names):
        patterns, names = list(patterns), list(names)
        calls.extend((p, n) for p in dict.fromkeys(patterns) for n in names)
        return families.match_all(patterns, names)

    monkeypatch.setattr(resolve, "match_all", match_all)
    patterns = ["*attn2.to_k", "re:.*\\.ff\\..*", "conv_in"]
    plan = BitPlan(
        defaults={"weights": "int8"},
        rules=[{"targets": patterns[:2], "weights": "int4"}, {"targets": patterns[1:2], "weights": "int2"}],
        ignore=patterns[2:] + patterns[:1],
    )
    specs = plan.resolve(meta_unet).layer_specs()
    assert sorted(calls) == sorted((p, n) for p in patterns for n in specs)
    assert specs["conv_in"].weights == "none"
    assert {s.weights for n, s in specs.items() if ".ff." in n} == {"int2"}


def test_bos_defaults_come_from_the_model_family(meta_unet, monkeypatch):
    generic = ("*attn2.to_k", "*attn2.to_v", "*.add_k_proj", "*.add_v_proj")
    assert BOS_DEFAULT_PATTERNS == families.GENERIC.text_kv == generic
    plan = BitPlan(target={"bos": {"sha256": "0" * 64, "dim": 32}}, defaults={"weights": "int8"})
    bos = {n for n, s in plan.resolve(meta_unet).layer_specs().items() if s.flags.get("bos_aware")}
    assert bos and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in bos)
    only_v = families.ModelFamily("test", text_kv=("*attn2.to_v",))
    monkeypatch.setattr(resolve, "family_of", lambda name: only_v if name == "UNet2DConditionModel" else None)
    flagged = {n for n, s in plan.resolve(meta_unet).layer_specs().items() if s.flags.get("bos_aware")}
    assert flagged == {n for n in bos if n.endswith("attn2.to_v")}


def test_calibrated_ranges_fill_static_activations(meta_unet):
    plan = BitPlan(defaults={"weights": "int8", "activations": "int8"}, layers={"conv_in": {"act_range": 9.0}})
    names = list(layer_table(meta_unet))
    specs = plan.resolve(meta_unet, act_ranges={n: 2 for n in names}).layer_specs()
    assert specs["conv_in"].act_range == 9.0  # the plan's own range wins
    assert specs[names[1]].act_range == 2.0 and isinstance(specs[names[1]].act_range, float)
    with pytest.raises(PlanFormatError, match=f"have none:\n  - {re.escape(names[-1])}\n"):
        plan.resolve(meta_unet, act_ranges={n: 2 for n in names[:-1]})


def test_summary_activation_average_is_weighted_by_input_features(meta_unet):
    table = layer_table(meta_unet)
    a, b = "conv_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    plan = BitPlan(
        defaults={"weights": "int8"},
        layers={a: {"activations": "int8", "act_range": 1.0}, b: {"activations": "int4", "act_range": "dynamic"}},
    )
    s = plan.resolve(meta_unet).summary()
    expected = (8 * table[a].in_features + 4 * table[b].in_features) / (table[a].in_features + table[b].in_features)
    assert table[a].in_features != table[b].in_features
    assert s.avg_activation_bits_by_inputs == pytest.approx(expected)
    assert s.avg_activation_bits == s.avg_activation_bits_by_inputs  # the former name still reads
    d = s.to_dict()
    assert d["avg_activation_bits_by_inputs"] == d["avg_activation_bits"] == pytest.approx(expected)
    assert "average activation bits (input-feature-weighted)" in str(s)


def test_sizes_are_bytes_shown_in_binary_units(meta_unet):
    s = BitPlan.uniform("int8").resolve(meta_unet).summary()
    assert isinstance(s.size_bytes, float) and s.fp16_bytes == 2 * s.params
    rows = dict(s.rows())
    assert rows["FP16 size"].startswith(f"{s.fp16_bytes / 2**20:.2f} MiB (")
    assert rows["estimated size"] == f"{s.size_bytes / 2**10:.2f} KiB"
    assert [format_bytes(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30, 2**40)] == [
        "512 B", "1.50 KiB", "3.00 MiB", "5.00 GiB", "1024.00 GiB"
    ]


def test_summary_counts_layers_per_method_stage(meta_unet):
    from diffusers_mixdq.plan.spec import LayerSpec
    from diffusers_mixdq.plan.summary import method_counts

    names = list(layer_table(meta_unet))
    a, b, c = names[1], names[2], names[3]
    plan = BitPlan(
        defaults={"weights": "int8"},
        layers={a: {"activations": "int8", "act_range": 2.0, "act_groups": [[0, 499, 1.0], [500, 1000, 3.0]]},
                b: {"activations": "int8", "act_range": "dynamic-token"},
                c: {"activations": "int8", "act_range": "dynamic"}},
    )
    s = plan.resolve(meta_unet).summary()
    assert s.methods == {"static ranges": 1, "act_groups": 1, "dynamic-token": 1, "dynamic": 1}
    assert dict(s.rows())["layers by method stage"] == "act_groups: 1, dynamic: 1, dynamic-token: 1, static ranges: 1"
    assert s.to_dict()["methods"] == s.methods
    assert "layers by method stage" not in dict(BitPlan.uniform("int8").resolve(meta_unet).summary().rows())
    flagged = [LayerSpec("int4", flags={"balance": {"sha256": "x"}, "lowrank": {}}),
               LayerSpec("int4", flags={"bos_aware": True}),
               LayerSpec("int4", outliers={"weights": "int8", "channels": [1]})]
    assert method_counts(flagged) == {"balance": 1, "lowrank": 1, "bos_aware": 1, "outliers": 1}
