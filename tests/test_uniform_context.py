"""Sensitivities measured inside the uniform model (``context="uniform"``) and the same-size uniform plan as a
candidate of the final pick (``pick_uniform``), issue #14 item 1."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import make_pipeline

from diffusers_mixdq.builder import BuildSettings, build_plan
from diffusers_mixdq.builder.allocate import objective
from diffusers_mixdq.builder.recipe import load_recipe
from diffusers_mixdq.builder.uniform_context import BASE_KEY, base_width, complete
from diffusers_mixdq.errors import MixDQError

CALIBRATION = ["a red circle", "a blue square", "a green star", "a white moon"]
VALIDATION = ["a green triangle", "a yellow star"]
# refine off: these tests check the sweep's context and the pick itself, which refine may then improve on
SETTINGS = dict(prompts=CALIBRATION, steps=2, guidance=3.0, height=32, width=32, weight_bits=4.0,
                split_ratios=(0.5, 1.0, 2.0), pick_prompts=VALIDATION, refine_evaluations=0)


def _build(tmp_path, **extra):
    pipe = make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan, report = build_plan(pipe, BuildSettings(**{**SETTINGS, "cache_dir": str(tmp_path), **extra}), progress=False)
    (cache,) = [json.loads(p.read_text()) for p in tmp_path.glob("sensitivity-*.json")]
    return plan, report, cache


@pytest.fixture(scope="module")
def fp_build(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("fp"))


@pytest.fixture(scope="module")
def uniform_build(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("uniform"), context="uniform", pick_uniform=True)


def test_base_width_is_the_widest_common_candidate_within_the_budget():
    assert base_width({"content": [2, 4, 8], "quality": [4, 8]}, 4.0) == 4
    assert base_width({"content": [2, 4, 8], "quality": [4, 8]}, 7.9) == 4
    assert base_width({"content": [2, 4, 8], "quality": [2, 4, 8]}, 3.0) == 2
    assert base_width({"content": [4, 8], "quality": [4, 8]}, 3.0) == 4  # none fits: the narrowest common


def test_uniform_context_measures_each_layer_inside_the_int4_model(fp_build, uniform_build):
    _, fp_report, fp_cache = fp_build
    plan, report, cache = uniform_build
    # the uniform model is measured once per group; no layer is measured at the base width itself
    assert {k for k in cache if k.startswith(BASE_KEY)} == {f"{BASE_KEY}content|4", f"{BASE_KEY}quality|4"}
    layers = [k for k in cache if not k.startswith(BASE_KEY)]
    assert layers and not any(k.endswith("|4") for k in layers)
    content = {k[:-2] for k in layers if k.endswith("|2")}
    assert content and not any(f"{n}|8" in cache for n in content)  # content widest: extrapolated
    # quality layers at 8 bits score against the int4 model: far below the same layer alone in full precision
    quality8 = [k for k in layers if k.endswith("|8")]
    assert quality8 and all(cache[k] < fp_cache[k] for k in quality8)
    # one measurement per layer instead of one per width: cheaper than measuring in full precision
    assert report.sample_evaluations["sensitivity"] < fp_report.sample_evaluations["sensitivity"]
    assert plan.provenance["settings"]["context"] == "uniform"


def test_complete_fills_the_base_width_and_extrapolates_the_damage():
    cache = {f"{BASE_KEY}content|4": 0.9, f"{BASE_KEY}quality|4": 30.0}
    s = SimpleNamespace(widths={"content": [2, 4, 8], "quality": [4, 8]}, weight_bits=4.0, extrapolate_widest=True)
    ctx = SimpleNamespace(settings=s, candidates=["a", "q"], groups={"a": "content", "q": "quality"})
    sens = SimpleNamespace(scores={"a": {2: 0.75}, "q": {8: 31.0}})
    complete(ctx, sens, SimpleNamespace(get=cache.get))
    # int2 costs 0.15 = 15 x the layer's int4 damage (noise power 16x); int8 removes 255/256 of that damage
    assert sens.scores["a"][4] == 0.9 and sens.scores["a"][8] == pytest.approx(0.9 + 0.01 * (1 - 1 / 256))
    assert sens.scores["q"] == {8: 31.0, 4: 30.0}


def test_pick_uniform_adds_the_uniform_plan_as_the_last_candidate(uniform_build):
    plan, report, _ = uniform_build
    last = report.solver[-1]
    assert last["k"] is None and last["avg_bits"] == pytest.approx(4.0)
    assert len(report.candidate_score) == len(report.solver)
    won = report.candidate_score.index(min(report.candidate_score)) == len(report.solver) - 1
    assert plan.provenance["allocation"]["uniform_picked"] is won
    if won:
        assert {s.weights for s in plan.layer_specs().values()} == {"int4"}


def test_pick_uniform_leaves_out_a_uniform_plan_over_the_budget(tmp_path):
    plan, report, _ = _build(tmp_path, pick_uniform=True, protect_first_last=True, split_ratios=(0.5,), tolerance=0.0)
    # int4 everywhere but conv_in / conv_out in 16 bit is over a 4-bit budget: only the mixed candidate is left
    assert [r["k"] for r in report.solver] == [0.5] and plan.provenance["allocation"]["uniform_picked"] is False


@pytest.mark.parametrize("extra, words", [
    ({"context": "int4"}, "context"),
    ({"pick_uniform": "yes"}, "pick_uniform"),
    ({"content_metric": "psnr"}, "content_metric"),
    ({"pick_objective": "median"}, "pick_objective"),
    ({"context": "uniform", "sensitivity_files": [{"path": "scores.json"}]}, "sensitivity_files"),
    ({"context": "uniform", "widths": {"content": [2], "quality": [4, 8]}}, "widths"),
])
def test_bad_settings_name_the_field(extra, words):
    with pytest.raises(MixDQError, match=words):
        BuildSettings(**SETTINGS, **extra).validate()


def test_recipe_keys_reach_the_settings():
    recipe = {"pipeline": "x", "prompts": CALIBRATION, "weights": {"budget_bits": 4.0}, "context": "uniform",
              "pick_uniform": True}
    s = load_recipe(recipe).settings()
    assert s.context == "uniform" and s.pick_uniform
    s.validate()
    with pytest.raises(MixDQError, match="'context'"):
        load_recipe({**recipe, "context": "int8"})


def test_psnr_objective_is_minus_the_mean_per_image_psnr():
    assert objective([1e-2, 1e-4], "psnr") == pytest.approx(-30.0)  # 20 dB and 40 dB
    assert objective([0.0], "psnr") == pytest.approx(-120.0)  # identical: clamped, not -inf
    # one broken image weighs less than under the mean MSE
    assert objective([1e-1, 1e-5, 1e-5], "psnr") < objective([1e-3] * 3, "psnr")
    assert objective([1e-1, 1e-5, 1e-5], "mse") > objective([1e-3] * 3, "mse")


def test_content_metric_mse_scores_content_layers_by_minus_the_image_mse(tmp_path):
    plan, _, cache = _build(tmp_path, content_metric="mse", split_ratios=(1.0,))
    content = [k for k in cache if k.endswith("|2")]
    assert content and all(-1.0 <= cache[k] <= 0.0 for k in content)
    assert plan.provenance["sensitivity_metric"]["weights"]["content"] == "mse"
    assert plan.provenance["settings"]["content_metric"] == "mse"
