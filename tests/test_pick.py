"""The allocator's final pick (issue #14, item 1): held-out pick prompts, the tail objective, first/last layers
protected by family, and errors for bad values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from conftest import make_pipeline

from diffusers_mixdq.builder import BuildSettings, build_plan
from diffusers_mixdq.builder import assign as assign_module
from diffusers_mixdq.builder import plan_errors as plan_errors_module
from diffusers_mixdq.builder.allocate import AllocationError, objective, pick
from diffusers_mixdq.builder.recipe import load_recipe
from diffusers_mixdq.errors import MixDQError

CALIBRATION = ["a red circle", "a blue square"]
VALIDATION = ["a green triangle", "a yellow star", "a purple square"]
SETTINGS = dict(prompts=CALIBRATION, steps=2, guidance=3.0, height=32, width=32, weight_bits=4.0,
                split_ratios=(0.5, 1.0, 2.0))


def _candidate(k: float) -> SimpleNamespace:
    return SimpleNamespace(k=k)  # pick only hands candidates to the metric


def test_tail_objective_ranks_one_bad_image_below_uniformly_small_error():
    one_bad = [0.0] * 19 + [0.5]  # mean 0.025, but one image broken
    uniform = [0.04] * 20  # mean 0.04, every image slightly off
    assert objective(one_bad, "mse") < objective(uniform, "mse")
    assert objective(one_bad, "tail") == pytest.approx(0.25)  # worst 10% of 20 images: 2 of them
    assert objective(uniform, "tail") == pytest.approx(0.04)
    a, b = _candidate(0.5), _candidate(1.0)
    errors = {id(a): one_bad, id(b): uniform}
    assert pick([a, b], lambda c: objective(errors[id(c)], "mse")) is a
    assert pick([a, b], lambda c: objective(errors[id(c)], "tail")) is b


def test_objective_edge_cases():
    assert objective([0.3], "tail") == pytest.approx(0.3)  # fewer than 10 images: the worst one
    assert objective([0.1, 0.2, 0.9], "tail") == pytest.approx(0.9)
    assert math.isnan(objective([0.1, float("nan")], "tail"))
    with pytest.raises(AllocationError, match="worst"):
        objective([0.1], "worst")
    with pytest.raises(AllocationError, match="at least one"):
        objective([], "mse")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build with held-out pick prompts, the tail objective and first/last protected, recording every prompt
    list the pick generates."""
    pipe = make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen: list[list[str]] = []
    real = assign_module.run_pipeline

    def recording(p, s, indices=None):
        seen.append(list(s.prompts))
        return real(p, s, indices)

    mp = pytest.MonkeyPatch()
    mp.setattr(assign_module, "run_pipeline", recording)  # the reference run
    mp.setattr(plan_errors_module, "run_pipeline", recording)  # the candidates' runs
    try:
        # refine off: its runs (also on the pick prompts, tests/test_refine.py) would add to the counted runs
        s = BuildSettings(**SETTINGS, pick_prompts=VALIDATION, pick_objective="tail", protect_first_last=True,
                          refine_evaluations=0)
        plan, report = build_plan(pipe, s, progress=False)
    finally:
        mp.undo()
    return plan, report, seen


def test_pick_generates_on_the_pick_prompts_only(built):
    plan, report, seen = built
    # one full-precision reference run, then one run per candidate, all on the validation prompts
    assert len(seen) == 1 + len(report.candidate_score) and len(report.candidate_score) >= 1
    assert all(prompts == VALIDATION for prompts in seen)
    assert report.sample_evaluations["pick_reference"] > 0
    prov = plan.provenance
    assert prov["num_pick_prompts"] == 3 and "pick_prompts" not in prov["settings"]
    assert prov["allocation"]["pick_objective"] == "tail"
    chosen = report.candidate_score.index(min(report.candidate_score))
    assert prov["allocation"]["k"] == report.solver[chosen]["k"]
    # the tail is never below the mean of the same images
    assert all(t >= m - 1e-12 for t, m in zip(report.candidate_score, report.candidate_mse))


def test_protect_first_last_keeps_the_family_layers_in_16_bit(built):
    plan, _, _ = built
    specs = plan.layer_specs()
    assert specs["conv_in"].weights == "none" and specs["conv_out"].weights == "none"
    assert {"conv_in", "conv_out"} <= set(plan.provenance["settings"]["protected"])
    assert plan.summary().avg_weight_bits <= 4.0 + 1e-9


def test_default_pick_uses_the_calibration_prompts(monkeypatch):
    pipe = make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen: list[list[str]] = []
    real = assign_module.run_pipeline
    recording = lambda p, s, i=None: seen.append(list(s.prompts)) or real(p, s, i)  # noqa: E731
    monkeypatch.setattr(assign_module, "run_pipeline", recording)
    monkeypatch.setattr(plan_errors_module, "run_pipeline", recording)
    settings = BuildSettings(**{**SETTINGS, "split_ratios": (1.0,)}, refine_evaluations=0)  # (as above)
    plan, report = build_plan(pipe, settings, progress=False)
    assert seen == [CALIBRATION]  # the calibration run's images are the reference: no extra run
    assert "pick_reference" not in report.sample_evaluations
    assert plan.provenance["allocation"]["pick_objective"] == "psnr"  # the default: minus the mean per-image PSNR
    assert len(report.candidate_score) == len(report.candidate_mse) and all(v < 0 for v in report.candidate_score)
    assert plan.provenance["settings"]["protected"] == [] and "num_pick_prompts" not in plan.provenance


@pytest.mark.parametrize("field, value, words", [
    ("pick_objective", "worst", "pick_objective"),
    ("protect_first_last", "yes", "protect_first_last"),
    ("pick_prompts", [CALIBRATION[0], "a new prompt"], "pick_prompts must be held out"),
    ("pick_prompts", "validation.txt", "pick_prompts"),
])
def test_bad_settings_name_the_field(field, value, words):
    with pytest.raises(MixDQError, match=words):
        BuildSettings(**SETTINGS, **{field: value}).validate()


@pytest.mark.parametrize("field, value, words", [
    ("pick_objective", "p10", "'pick_objective'"),
    ("protect_first_last", 1, "'protect_first_last'"),
    ("pick_prompts", ["a red circle"], "'pick_prompts' must be held out"),
    ("pick_prompts", "missing.txt", "'pick_prompts' names 'missing.txt', which is not a file"),
    ("pick_prompts", "builtin", "'pick_prompts' names 'builtin'"),
])
def test_bad_recipe_values_name_the_key(field, value, words):
    recipe = {"pipeline": "x", "prompts": CALIBRATION, "weights": {"budget_bits": 4.0}, field: value}
    with pytest.raises(MixDQError, match=words):
        load_recipe(recipe)


def test_recipe_keys_reach_the_settings(tmp_path):
    (tmp_path / "validation.txt").write_text("\n".join(VALIDATION) + "\n")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("pipeline: x\nprompts: [a red circle]\nweights: {budget_bits: 4.0}\n"
                           "pick_prompts: validation.txt\npick_objective: tail\nprotect_first_last: true\n")
    s = load_recipe(recipe_file).settings()
    assert list(s.pick_prompts) == VALIDATION and s.pick_objective == "tail" and s.protect_first_last
    s.validate()
