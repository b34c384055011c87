"""The refine stage (builder/refine.py): budget-keeping moves, the in-plan noise model, and a build on a tiny random
StableDiffusionPipeline: within budget, never worse on its validation objective than its start, recorded in the
provenance, resumable, bad values refused."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_pipeline

from diffusers_mixdq.builder import BuildSettings, build_plan
from diffusers_mixdq.builder.allocate import objective
from diffusers_mixdq.builder.allocate.moves import paired_gain, size_bits, swap_moves, tail_gain
from diffusers_mixdq.builder.noise_model import layer_deltas, probe_widths
from diffusers_mixdq.builder.options import DEFAULT_REFINE_EVALUATIONS
from diffusers_mixdq.builder.recipe import load_recipe
from diffusers_mixdq.builder.refine import enabled as refine_enabled
from diffusers_mixdq.builder.refine import resolved
from diffusers_mixdq.builder.refine_guard import DIVERGED_MSE, diverged, guard
from diffusers_mixdq.builder.sensitivity import applied
from diffusers_mixdq.builder.settings import run_pipeline
from diffusers_mixdq.errors import MixDQError

SETTINGS = dict(prompts=["a red circle", "a blue square"], steps=2, guidance=3.0, height=32, width=32,
                pick_prompts=["a green triangle", "a yellow star", "a black cross"], weight_bits=4.0,
                split_ratios=(1.0,), activations="dynamic-token", pick_objective="psnr")
REFINE = dict(refine_evaluations=6, refine_rounds=2, refine_significance=0.0)


def test_swap_moves_keep_the_budget_and_come_best_predicted_first():
    sizes = {"a": 100.0, "b": 100.0, "c": 50.0, "fixed": 10.0}
    choice = {"a": 4, "b": 4, "c": 4, "fixed": 16}
    deltas = {"a": {2: 5.0, 4: 0.0, 8: -3.0}, "b": {2: 1.0, 4: 0.0, 8: -0.5}, "c": {4: 0.0, 8: -4.0}}
    limit = size_bits(choice, sizes)
    moves = swap_moves(choice, deltas, sizes, limit)
    assert moves and all(size_bits({**choice, **m.changes}, sizes) <= limit for m in moves)
    assert [m.predicted for m in moves] == sorted(m.predicted for m in moves)
    assert all(len(m.changes) > 1 for m in moves)  # a raise is always paid, a lower always spent
    best = moves[0]  # raise c (-4 for 200 bits) paid by lowering b (+1 for 200 bits)
    assert best.changes == {"c": 8, "b": 2} and best.predicted == pytest.approx(-3.0)
    assert swap_moves(choice, deltas, sizes, limit - 1e4) == []  # nothing fits a budget the plan already misses


def test_noise_model_probes_and_ladder():
    assert probe_widths([2, 4, 8], 4) == [8, 2] and probe_widths([2, 4, 8], 8) == [4]
    assert probe_widths([4, 8], 4) == [8] and probe_widths([2, 3, 4, 5, 6, 8], 2) == [8]
    # a layer owning 1e-4 of a 1e-3 noise at int4; 3x more one bit down
    d = layer_deltas([2, 3, 4, 5, 6, 8], 4, 1e-3, {8: 1e-3 - 1e-4 + 1e-4 / 256, 3: 1e-3 + 3e-4})
    assert d[4] == 0 and d[8] == pytest.approx(-1e-4 * (1 - 1 / 256))
    assert d[5] == pytest.approx(-0.75e-4) and d[3] == pytest.approx(3e-4) and d[2] > d[3]
    assert layer_deltas([4], 4, 1e-3, {}) == {4: 0.0}


def test_paired_gain_counts_standard_errors():
    old = [1e-3, 2e-3, 4e-3, 8e-3]
    assert paired_gain([e / 2 for e in old], old, "psnr") == math.inf  # 3 dB on every image
    assert paired_gain(old, old, "psnr") == 0.0
    noisy = [old[0] / 4, old[1] * 2, old[2] / 4, old[3] * 2]
    assert abs(paired_gain(noisy, old, "psnr")) < 2.0
    assert paired_gain([e * 2 for e in old], old, "mse") < 0


def test_tail_gain_is_a_paired_bootstrap_of_the_tail():
    old = [1e-3 * (1 + i % 7) for i in range(48)]
    assert tail_gain(old, old) == 0.0
    worse_tail = sorted(old)[:-5] + [0.05] * 5  # the five worst images (the tail of 48) get much worse
    assert tail_gain(worse_tail, sorted(old)) < -2 and tail_gain(sorted(old), worse_tail) > 2
    body = sorted(old)
    better_body = [e / 2 for e in body[:-5]] + body[-5:]  # the body improves, the five worst images stay
    assert tail_gain(better_body, body) == 0.0
    assert tail_gain(worse_tail, old) == tail_gain(worse_tail, old)  # seeded: a resumed build decides the same
    assert paired_gain(worse_tail, old, "tail") == tail_gain(worse_tail, old)  # the tail objective's own test


def test_guard_rejects_a_diverged_image_even_when_the_mean_improves():
    old = [1e-3] * 47 + [5e-3]
    new = [1e-4] * 47 + [2 * DIVERGED_MSE]  # every image 10 dB better, but the worst one now shows another scene
    assert objective(new, "psnr") < objective(old, "psnr") and paired_gain(new, old, "psnr") > 2
    assert diverged(old) == 0 and diverged(new) == 1 and diverged([DIVERGED_MSE]) == 0  # below 20 dB, strictly
    assert guard(new, old, 2.0) == "diverged images 0 -> 1"
    assert guard(old, new, 2.0) is None  # fixing a diverged image is never refused
    tail = [1e-4] * 43 + [8e-3] * 5  # none diverged, the tail 8x worse
    assert guard(tail, [1e-3] * 43 + [1e-3 * (1 + i) for i in range(5)], 2.0).startswith("tail worse by")
    assert guard([e / 2 for e in old], old, 2.0) is None


@pytest.mark.parametrize("refine, message", [
    ({"evaluations": -1}, "refine.evaluations"),
    ({"evaluations": 4, "rounds": 0}, "refine.rounds"),
    ({"evaluations": 4, "objective": "median"}, "refine.objective"),
    ({"evaluations": 4, "significance": -1}, "refine.significance"),
    ({"evaluations": 4, "guard": "yes"}, "refine.guard"),
    ({"evaluations": 4, "budget": 3}, "refine"),
])
def test_bad_refine_values_are_one_mixdq_error(refine, message):
    with pytest.raises(MixDQError, match=message.replace(".", r"\.")):
        load_recipe({"pipeline": "x", "weights": {"budget_bits": 4}, "refine": refine})


def test_bad_refine_settings_are_refused_before_any_work():
    with pytest.raises(MixDQError, match="refine_evaluations"):
        BuildSettings(**{**SETTINGS, "refine_evaluations": -2}).validate()
    with pytest.raises(MixDQError, match="refine.evaluations.*components"):
        load_recipe({"pipeline": "x", "weights": {"budget_bits": 4}, "components": ["unet", "text_encoder"],
                     "refine": {"evaluations": 4}})


def test_recipe_refine_reaches_the_settings():
    r = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4},
                     "refine": {"evaluations": 12, "rounds": 1, "objective": "tail", "significance": 1.5,
                                "guard": False}})
    s = r.settings()
    assert (s.refine_evaluations, s.refine_rounds, s.refine_objective, s.refine_significance, s.refine_guard) == (
        12, 1, "tail", 1.5, False)
    default = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4}}).settings()
    assert default.refine_evaluations is None  # the default: resolved by the build
    assert resolved(default).refine_evaluations == DEFAULT_REFINE_EVALUATIONS == 16
    assert default.refine_guard is True  # the guard is on unless a recipe says `guard: false`
    assert resolved(default, components=True).refine_evaluations == 0  # skipped with text-encoder components
    off = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4}, "refine": {"evaluations": 0}}).settings()
    assert resolved(off).refine_evaluations == 0


def test_a_build_with_nothing_to_choose_does_not_refine():
    def ctx(widths, **settings):
        s = resolved(BuildSettings(**{**SETTINGS, "widths": widths, **settings}))
        return SimpleNamespace(settings=s, candidates=["a", "b"], groups={"a": "content", "b": "quality"})

    assert refine_enabled(ctx({"content": [2, 4, 8], "quality": [4, 8]}))  # the default is on
    assert not refine_enabled(ctx({"content": [2, 4, 8], "quality": [4, 8]}, refine_evaluations=0))
    assert not refine_enabled(ctx({"content": [4], "quality": [4, 4]}))  # one width each: nothing to refine
    assert not refine_enabled(SimpleNamespace(settings=resolved(BuildSettings(**SETTINGS)), candidates=[],
                                              groups={}))  # every layer protected


@pytest.fixture(scope="module")
def pipe():
    tiny = make_pipeline()
    tiny.set_progress_bar_config(disable=True)
    return tiny


def _pick_objective(pipe, plan, s: BuildSettings, reference) -> float:
    """The plan's psnr objective on the pick prompts, recomputed outside the builder."""
    with applied(pipe.unet, plan, plan.tensors.get("bos.hidden_state")), torch.no_grad():
        images = run_pipeline(pipe, s.pick_settings)
    return objective((images - reference).pow(2).flatten(1).mean(1).tolist(), "psnr")


@pytest.mark.slow
def test_refine_keeps_the_budget_never_worsens_and_records(pipe, tmp_path):
    s = BuildSettings(**SETTINGS, refine_evaluations=0, cache_dir=str(tmp_path))
    start, start_report = build_plan(pipe, s, progress=False)
    assert "refine" not in start.provenance and "refine" not in start_report.sample_evaluations  # 0: off
    refined, report = build_plan(pipe, BuildSettings(**SETTINGS, **REFINE, cache_dir=str(tmp_path)), progress=False)
    assert refined.summary().avg_weight_bits <= 4.0 + 1e-9
    record = refined.provenance["refine"]
    assert record["final"] <= record["start"] and record["objective"] == "psnr"
    assert 1 <= len(record["tried"]) <= 6 and record["spent"]["evaluations"] + record["spent"][
        "reused_evaluations"] <= 6
    assert len(record["kept"]) == sum(t[4] for t in record["tried"])
    assert all((t[5] == "kept") == t[4] for t in record["tried"])  # every proposal says why (not) kept
    assert report.sample_evaluations["refine"] > 0 and report.sample_evaluations["refine_context"] > 0
    assert refined.provenance["sample_evaluations"]["refine"] == report.sample_evaluations["refine"]
    assert report.naive_sample_evaluations > start_report.naive_sample_evaluations
    with torch.no_grad():
        reference = run_pipeline(pipe, s.pick_settings)
    assert _pick_objective(pipe, refined, s, reference) <= _pick_objective(pipe, start, s, reference) + 1e-6
    if record["kept"]:  # what was kept is what the plan holds
        last = {n: w[1] for k in record["kept"] for n, w in k["changes"].items()}
        specs = refined.layer_specs()
        assert all(specs[n].weights == f"int{w}" for n, w in last.items())
    else:
        assert refined.layer_specs() == start.layer_specs()


@pytest.mark.slow
def test_interrupted_refine_resumes_to_the_identical_plan(pipe, tmp_path, monkeypatch):
    from diffusers_mixdq.builder import refine as refine_module

    settings = BuildSettings(**SETTINGS, **REFINE, cache_dir=str(tmp_path / "a"))
    reference, _ = build_plan(pipe, settings, progress=False)

    real = refine_module.image_errors
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill mid-refine")
        return real(*args, **kwargs)

    settings = BuildSettings(**SETTINGS, **REFINE, cache_dir=str(tmp_path / "b"))
    monkeypatch.setattr(refine_module, "image_errors", dying)
    with pytest.raises(KeyboardInterrupt):
        build_plan(pipe, settings, progress=False)
    monkeypatch.setattr(refine_module, "image_errors", real)
    resumed, report = build_plan(pipe, settings, progress=False)
    assert resumed.layer_specs() == reference.layer_specs()
    assert report.reused_sample_evaluations.get("refine", 0) > 0  # the two plans evaluated before the kill
    spent = resumed.provenance["refine"]["spent"]
    assert spent["reused_evaluations"] == 2 and json.dumps(resumed.provenance["refine"]["kept"]) == json.dumps(
        reference.provenance["refine"]["kept"])


@pytest.mark.slow
def test_the_default_build_refines(pipe, tmp_path):
    plan, report = build_plan(pipe, BuildSettings(**SETTINGS, cache_dir=str(tmp_path)), progress=False)
    record = plan.provenance["refine"]
    assert record["spent"]["max_evaluations"] == DEFAULT_REFINE_EVALUATIONS and record["spent"]["max_rounds"] == 1
    assert record["significance"] == 2.0 and record["final"] <= record["start"]
    assert plan.provenance["settings"]["refine_evaluations"] == DEFAULT_REFINE_EVALUATIONS
    assert report.sample_evaluations["refine_context"] > 0 and plan.summary().avg_weight_bits <= 4.0 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("guard_on", [True, False])
def test_the_guard_refuses_a_move_that_adds_a_diverged_image(pipe, tmp_path, monkeypatch, guard_on):
    """Every proposal's images made better on average but one of them diverged (the plans' real image errors
    replaced by made-up ones: the pick's candidates 30 dB on each image, every refine proposal +20, +20 and -17 dB
    against that): with the guard nothing is kept and each proposal says why; without it the first is kept."""
    from diffusers_mixdq.builder import assign as assign_module
    from diffusers_mixdq.builder import refine as refine_module

    monkeypatch.setattr(assign_module, "image_errors", lambda *args, **kwargs: [1e-3, 1e-3, 1e-3])
    monkeypatch.setattr(refine_module, "image_errors", lambda *args, **kwargs: [1e-5, 1e-5, 5 * DIVERGED_MSE])
    s = BuildSettings(**SETTINGS, refine_evaluations=2, refine_rounds=1, refine_significance=0.0,
                      refine_guard=guard_on, cache_dir=str(tmp_path))
    plan, _ = build_plan(pipe, s, progress=False)
    record = plan.provenance["refine"]
    assert record["guard"] is guard_on and record["tried"]
    if guard_on:
        assert not record["kept"] and record["diverged"] == [0, 0]
        assert all(t[4] is False and t[5] == "diverged images 0 -> 1" for t in record["tried"])
        assert record["final"] == record["start"]
    else:
        assert record["tried"][0][4] is True and record["tried"][0][5] == "kept" and record["diverged"] == [0, 1]
        assert record["final"] < record["start"]
