"""Regression tests of issue #17 for plan input: every bad plan is one MixDQError naming the problem, fast."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import make_unet

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanFormatError, PlanMismatchError, PlanSourceError
from diffusers_mixdq.bos import attach_bos, check_bos_invariance, prompt_length
from diffusers_mixdq.families import compile_pattern, match_all, matches
from diffusers_mixdq.plan import BOS_STATE_KEY, layer_table, limits, save_tensors

HEADER = {"format": "diffusers-mixdq-plan", "version": 1}


@pytest.fixture(scope="module")
def unet():
    return make_unet()


# ---------------------------------------------------------------------------------------------- the reader
def test_plan_file_not_utf8(tmp_path):
    (tmp_path / "plan.json").write_bytes(b'{"format": "diffusers-mixdq-plan", "note": "\xff\xfe"}')
    with pytest.raises(PlanFormatError, match=r"is not UTF-8 text \(byte 44"):
        BitPlan.load(tmp_path)


def test_deeply_nested_json_file_and_dict():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(PlanFormatError, match="nested too deeply"):
        BitPlan.load('{"format": "diffusers-mixdq-plan", "version": 1, "provenance": {"x": ' + deep + "}}")
    nested: dict = {}
    inner = nested
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(PlanFormatError, match="nested more than 32 levels"):
        BitPlan.load({**HEADER, "provenance": nested})
    with pytest.raises(PlanFormatError, match="nested more than 32 levels"):
        BitPlan(defaults={"weights": "int8"}, provenance=nested)


@pytest.mark.parametrize("value, message", [
    ({1, 2}, "is a set"),
    (torch.ones(2), "is a Tensor"),
    (b"int8", "is a bytes"),
    (math.nan, "is nan; plan numbers must be finite"),
    (math.inf, "is inf"),
    (object(), "is a object"),
])
def test_non_json_values_in_dict_plans(value, message):
    with pytest.raises(PlanFormatError, match=message):
        BitPlan.load({**HEADER, "provenance": {"x": value}})
    with pytest.raises(PlanFormatError, match=message):
        BitPlan(defaults={"weights": "int8", "activations": "int8", "act_range": value})


def test_non_string_keys_and_tuples():
    with pytest.raises(PlanFormatError, match="has the key 3 of type int"):
        BitPlan.load({**HEADER, "layers": {3: {"weights": "int8"}}})
    plan = BitPlan.load({**HEADER, "ignore": ("conv_in",), "defaults": {"weights": "int8"}})
    assert plan.ignore == ["conv_in"]


def test_plan_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PLAN_BYTES", 1000)
    (tmp_path / "plan.json").write_text(json.dumps({**HEADER, "provenance": {"pad": "x" * 2000}}))
    with pytest.raises(PlanFormatError, match="plan files are limited to"):
        BitPlan.load(tmp_path)


def test_huge_integer_text():
    with pytest.raises(PlanFormatError, match="cannot be read"):
        BitPlan.load('{"format": "diffusers-mixdq-plan", "version": 1, "provenance": {"n": ' + "9" * 5000 + "}}")


# ---------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value", [0, -1.0, 1e300, int("9" * 401), 1e6 + 1, True, "Dynamic", [1.0]])
def test_act_range_out_of_bounds(value):
    with pytest.raises(PlanFormatError, match="act_range must be a positive number"):
        BitPlan.load({**HEADER, "defaults": {"weights": "int8", "activations": "int8", "act_range": value}})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_act_range_not_finite(value):
    with pytest.raises(PlanFormatError, match="finite"):
        BitPlan.load({**HEADER, "defaults": {"weights": "int8", "activations": "int8", "act_range": value}})
    with pytest.raises(PlanFormatError, match="finite"):
        BitPlan.from_json(json.dumps({**HEADER, "defaults": {"activations": "int8", "act_range": value}}))


def test_largest_act_range_and_calibrated_ranges(unet):
    plan = BitPlan(defaults={"weights": "int8", "activations": "int8", "act_range": 1e6})
    assert plan.resolve(unet).layer_specs()["conv_in"].act_range == 1e6
    static = BitPlan(defaults={"weights": "int8", "activations": "int8"})
    for bad in (math.nan, math.inf, 0.0, 1e7):
        with pytest.raises(PlanFormatError, match="calibrated activation range"):
            static.resolve(unet, act_ranges=dict.fromkeys(layer_table(unet), bad))


# ---------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("pattern", ["re:(", "re:[a-", "re:*x", "re:(?P<n>a)(?P<n>b)", "re:(?=a)b", r"re:(a)\1"])
def test_invalid_regex_is_an_error_even_next_to_a_matching_pattern(pattern, unet):
    with pytest.raises(PlanFormatError, match=r"rules/0/targets: Invalid"):
        BitPlan(rules=[{"targets": ["conv_in", pattern], "weights": "int8"}])
    with pytest.raises(PlanFormatError, match=r"ignore: Invalid"):
        BitPlan(defaults={"weights": "int8"}, ignore=["conv_in", pattern])


@pytest.mark.parametrize("pattern", ["re:(.|.)*!", "re:(a+)+b", "re:(x*)*y", "re:(.*a){25}"])
def test_catastrophic_regexes_run_in_linear_time(pattern, unet):
    plan = BitPlan(defaults={"weights": "int8"}, rules=[{"targets": [pattern, "conv_in"], "weights": "int4"}])
    t0 = time.perf_counter()
    specs = plan.resolve(unet).layer_specs()
    assert not matches(pattern, "a" * 10_000 + "x")
    assert time.perf_counter() - t0 < 1.0
    assert specs["conv_in"].weights == "int4"


def test_pattern_length_and_count_limits():
    with pytest.raises(PlanFormatError, match="patterns are limited to 1000"):
        compile_pattern("*" + "a" * 1000)
    many = [f"*blocks.{i}.x*" for i in range(40_000)]
    t0 = time.perf_counter()
    with pytest.raises(PlanFormatError, match="40000 layer-name patterns.*limit is 10000"):
        BitPlan(defaults={"weights": "int8"}, ignore=many)
    assert time.perf_counter() - t0 < 2.0


def test_many_patterns_and_unknown_layers_are_fast(unet):
    names = list(layer_table(unet))
    t0 = time.perf_counter()
    hits = match_all([f"*blocks.{i}.x*" for i in range(10_000)] + ["*attn2.*"], names)
    assert hits["*attn2.*"] and time.perf_counter() - t0 < 2.0
    too_many = {**HEADER, "layers": {f"nope.{i}": {"weights": "int8"} for i in range(200_000)}}
    t0 = time.perf_counter()
    with pytest.raises(PlanFormatError, match="'layers' has 200000 entries; the limit is 20000"):
        BitPlan.load(too_many)
    assert time.perf_counter() - t0 < 0.5
    at_limit = {**HEADER, "layers": {f"nope.{i}": {"weights": "int8", "activations": "int8", "act_range": i + 1}
                                     for i in range(20_000)}}
    t0 = time.perf_counter()
    with pytest.raises(PlanMismatchError, match="does not exist"):
        BitPlan.load(at_limit).resolve(unet)
    assert time.perf_counter() - t0 < 2.0


def test_globs_match_like_fnmatch():
    import fnmatch

    names = ["down_blocks.0.attn2.to_k", "conv_in", "a[b", "x.y?z", "a]b", "cxx", "a\nb"]
    for glob in ["*attn2.*", "conv_*", "a[b", "a[[]b", "[!c]*", "x.y?z", "*.to_?", "[a-d]*", "[]]*", "a[!]b", "a?b"]:
        for name in names:
            assert matches(glob, name) == fnmatch.fnmatchcase(name, glob), (glob, name)


def test_typo_in_ignore_is_an_error_under_strict_and_a_warning_otherwise(unet):
    plan = BitPlan(defaults={"weights": "int8"}, ignore=["conv_in", "conv_outt"])
    with pytest.raises(PlanMismatchError, match=r"(?s)'ignore' patterns of the plan match no layer.*conv_outt"):
        plan.resolve(unet)
    with pytest.warns(UserWarning, match="conv_outt"):
        specs = plan.resolve(unet, strict=False).layer_specs()
    assert specs["conv_in"].weights == "none" and specs["conv_out"].weights == "int8"


# ---------------------------------------------------------------------------------------------- BOS sidecar
def _bos_plan_on_disk(tmp_path: Path, state: torch.Tensor | None = None) -> Path:
    plan = attach_bos(BitPlan.uniform("int8"), torch.randn(32))
    path = plan.save(tmp_path / "p")
    if state is not None:
        save_tensors({BOS_STATE_KEY: state}, path.with_suffix(".safetensors"))
    return path


def test_bos_sidecar_hash_is_verified(tmp_path, unet):
    assert BitPlan.load(_bos_plan_on_disk(tmp_path)).resolve(unet)
    with pytest.raises(PlanFormatError, match=r"sha256 .* is not the one the plan records"):
        BitPlan.load(_bos_plan_on_disk(tmp_path, torch.randn(32)))


@pytest.mark.parametrize("bad, message", [
    (torch.full((32,), math.inf), "NaN or infinite"),
    (torch.tensor([math.nan] * 32), "NaN or infinite"),
    (torch.randn(48), "48 torch.float32 values, but the plan records a 32-dim state"),
    (torch.ones(32, dtype=torch.int64), "records a 32-dim state"),
])
def test_bos_sidecar_state_checked(tmp_path, bad, message):
    with pytest.raises(PlanFormatError, match=message):
        BitPlan.load(_bos_plan_on_disk(tmp_path, bad))
    if "NaN" in message:  # attaching such a state is refused too
        with pytest.raises(PlanFormatError, match=message):
            attach_bos(BitPlan.uniform("int8"), bad)


def test_bos_state_of_wrong_width_never_disables_bos_silently(unet):
    with pytest.raises(PlanMismatchError, match="48-dim BOS state"):
        attach_bos(BitPlan.uniform("int8"), torch.randn(48)).resolve(unet)


# ---------------------------------------------------------------------------------------------- check_bos_invariance
class _Tokenizer:
    def __init__(self, model_max_length):
        if model_max_length is not None:
            self.model_max_length = model_max_length
        self.seen = []

    def __call__(self, prompt, padding, max_length, truncation, return_tensors):
        self.seen.append(max_length)
        ids = torch.tensor([[49406] + [ord(c) % 100 + 1 for c in prompt][: max_length - 1]])
        ids = torch.nn.functional.pad(ids, (0, max_length - ids.shape[1]), value=0)
        return type("Batch", (), {"input_ids": ids})()


class _CausalEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": 12})()
        self.emb = torch.nn.Embedding(50000, 8)

    def forward(self, ids):
        return (self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None],)


@pytest.mark.parametrize("model_max_length", [None, int(1e30), 10**20])
def test_check_bos_invariance_without_model_max_length(model_max_length):
    tokenizer, encoder = _Tokenizer(model_max_length), _CausalEncoder()
    state = check_bos_invariance(encoder, tokenizer)
    assert state.shape == (8,) and set(tokenizer.seen) == {12}
    assert prompt_length(encoder, _Tokenizer(77)) == 77
    encoder.config = type("Config", (), {})()
    with pytest.raises(MixDQError, match="max_position_embeddings"):
        prompt_length(encoder, _Tokenizer(model_max_length))


# ---------------------------------------------------------------------------------------------- local paths
@pytest.mark.parametrize("source", ["plans/w8a8", "./x", "../x", "/abs/no/such/plan", "a/b/c", "x.json", "~/p"])
def test_missing_local_paths_are_refused_at_once(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans" / "w8").mkdir(parents=True)
    t0 = time.perf_counter()
    with pytest.raises(PlanSourceError, match="No plan found at .*: there is no such local file or directory"):
        MixDQConfig(plan=source)
    assert time.perf_counter() - t0 < 1.0


def test_missing_local_path_names_what_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans" / "w8a8-v2").mkdir(parents=True)
    with pytest.raises(PlanSourceError, match=r"'plans' exists; it holds w8a8-v2"):
        MixDQConfig(plan="plans/w8a8")


def test_reading_keeps_key_order(tmp_path):
    """The bounded reader copies plans without reordering them (file bytes, hashes and pushes depend on it)."""
    data = {**HEADER, "target": {"base_model": "b", "class_name": "a"}, "defaults": {"weights": "int8"},
            "provenance": {"z": 1, "a": [{"y": 2, "x": 3}], "m": None}}
    plan = BitPlan.load(data)
    assert json.dumps(plan.to_dict()) == json.dumps(data)
    path = plan.save(tmp_path / "p")
    assert BitPlan.load(path).to_json() == plan.to_json() == path.read_text()
