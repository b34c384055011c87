"""Recipes: the ready ones in hub_recipes/ validate; `mixdq build` runs a recipe end to end on a tiny pipeline."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import yaml
from accelerate import init_empty_weights
from typer.testing import CliRunner

from diffusers_mixdq import BitPlan, MixDQError
from diffusers_mixdq.builder.recipe import BUILTIN_PROMPTS, load_recipe
from diffusers_mixdq.cli import app
from diffusers_mixdq.families import family_of
from diffusers_mixdq.plan import layer_table

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "hub_recipes").glob("*/*.yaml"))
SD21_CONFIG = REPO.parent / "shared" / "model-configs" / "sd21-base-unet.json"


def test_there_are_recipes_for_every_model_and_width():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for model in ("sdxl-turbo", "sd-turbo", "lcm-sdxl", "pixart-sigma"):
        for width in ("w8a8", "w5a8", "w4a8"):
            assert (model, width) in names
    table = (REPO / "hub_recipes" / "README.md").read_text()
    assert all(f"hub_recipes/{p.parent.name}/{p.name}" in table for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ready_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.prompts == BUILTIN_PROMPTS and recipe.activations == "dynamic-token"  # the default since #14
    bits = {"w8a8": 8.0, "w5a8": 5.0, "w4a8": 4.0}[path.stem]
    assert recipe.budget_bits == bits and recipe.calibrate_only == (path.stem == "w8a8")
    if path.parent.name == "lcm-sdxl":
        assert recipe.steps == 4
    if path.parent.name in ("sdxl-turbo", "sd-turbo"):
        assert recipe.steps == 1


@pytest.mark.skipif(not SD21_CONFIG.is_file(), reason="needs ../shared/model-configs")
def test_sd_turbo_recipe_layers_exist_in_the_real_architecture():
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads(SD21_CONFIG.read_text()))
    names = list(layer_table(unet))
    for path in (REPO / "hub_recipes" / "sd-turbo").glob("*.yaml"):
        recipe = load_recipe(path)
        # without content_patterns the build takes the denoiser family's (the UNet's: cross-attention and ff)
        content = recipe.content_patterns if recipe.content_patterns is not None else list(family_of(unet).content)
        assert content == ["*attn2.*", "*.ff.*"]
        for pattern in recipe.protected + content:
            assert any(fnmatch.fnmatchcase(n, pattern) for n in names), (path, pattern)
        BitPlan(defaults={"weights": "int8"}, ignore=recipe.protected).resolve(unet)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"weights": {"budget_bits": 4}}, "needs 'pipeline'"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "stepz": 2}, r"unknown field\(s\) \['stepz'\]"),
        ({"pipeline": "x", "weights": {"budget_bits": 4, "size_mb": 3}}, "exactly one of"),
        ({"pipeline": "x", "weights": {"budget_bits": 4, "candidates": {"content": [7]}}}, "list of 2, 3, 4, 5, 6 and 8"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "activations": "int4"}, "'activations' \\(mode\\) must be"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "activations": {"candidates": [2, 8]}}, "list of 4 and 8"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "activations": {"candidates": [4, 8], "budget_bits": 9}},
         "between 4 and 8"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "activations": {"mode": "none", "protect_most_sensitive": 2}},
         "activations.budget_bits / activations.protect_most_sensitive need quantized activations"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "activations": {"bits": 8}}, "'activations' takes"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "sweep_fraction": 0}, "sweep_fraction"),
        ({"pipeline": "x", "weights": {"budget_bits": 4}, "prompts": "nope.txt"}, "neither 'builtin' nor a file"),
        ({"pipeline": "x", "weights": {"budget_bits": 6, "candidates": {"content": [8], "quality": [8]}}},
         "budget_bits must be 8"),
    ],
)
def test_bad_recipes_are_refused(data, message):
    with pytest.raises(MixDQError, match=message):
        load_recipe(data)


def test_activation_options_reach_the_builder():
    r = load_recipe({"pipeline": "x", "weights": {"budget_bits": 4},
                     "activations": {"mode": "dynamic", "candidates": [8, 4], "budget_bits": 7.5,
                                     "protect_most_sensitive": 7},
                     "sweep_fraction": 0.5, "content_fraction": 0.75, "device": "cuda"})
    s = r.settings()
    assert (s.activations, s.act_widths, s.act_bits, s.act_protect) == ("dynamic", [4, 8], 7.5, 7)
    assert (s.sweep_fraction, s.content_fraction, s.device) == (0.5, 0.75, "cuda")
    s.validate()
    w8 = load_recipe({"pipeline": "x", "weights": {"budget_bits": 8, "candidates": {"content": [8], "quality": [8]}},
                      "activations": {"candidates": [8], "protect_most_sensitive": 3}})
    assert not w8.calibrate_only  # protecting activation-sensitive layers needs the activation sweep


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pipeline: [unclosed\n")
    with pytest.raises(MixDQError, match="not valid YAML"):
        load_recipe(path)


def write_recipe(tmp_path, pipeline_dir, extra: dict | None = None, **weights) -> Path:
    data = {**(extra or {}), "pipeline": str(pipeline_dir), "prompts": ["a red circle", "a blue square"], "steps": 2,
            "guidance": 3.0, "resolution": 32, "weights": weights, "split_ratios": [0.5, 1.0],
            "protected": ["conv_in", "conv_out"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_mixdq_build_mixed_recipe(tmp_path, pipeline_dir):
    recipe = write_recipe(tmp_path, pipeline_dir, budget_bits=4.0)
    result = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "denoiser evaluations" in result.output and "fewer" in result.output
    plan = BitPlan.load(tmp_path / "out" / "unet")
    assert plan.summary().avg_weight_bits <= 4.0
    assert plan.target["base_model"] == str(pipeline_dir)
    assert plan.provenance["recipe"]["budget_bits"] == 4.0
    assert plan.provenance["allocation"]["pick_objective"] == "psnr"  # the builder's default pick
    assert {s.act_range for s in plan.layer_specs().values() if s.activations != "none"} == {"dynamic-token"}
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "out" / "unet")])
    assert shown.exit_code == 0, shown.output
    assert "How it was built" in shown.output and "Optimal" in shown.output
    assert "naive protocol" in shown.output and str(recipe) in shown.output


@pytest.mark.slow
def test_mixdq_build_calibrate_only_and_size_budget(tmp_path, pipeline_dir):
    recipe = write_recipe(tmp_path, pipeline_dir, budget_bits=8.0, candidates={"content": [8], "quality": [8]})
    result = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / "w8")])
    assert result.exit_code == 0, result.output
    specs = BitPlan.load(tmp_path / "w8" / "unet").layer_specs()
    assert specs["conv_in"].weights == "none"
    assert all(s.weights == "int8" and s.act_range == "dynamic-token" for n, s in specs.items()
               if n not in ("conv_in", "conv_out"))  # the builder's default activations: a range per token
    static = write_recipe(tmp_path, pipeline_dir, {"activations": "int8"}, budget_bits=8.0,
                          candidates={"content": [8], "quality": [8]})
    result = CliRunner().invoke(app, ["build", str(static), "--out", str(tmp_path / "w8-static")])
    assert result.exit_code == 0, result.output
    specs = BitPlan.load(tmp_path / "w8-static" / "unet").layer_specs()
    assert all(s.activations == "int8" and isinstance(s.act_range, float) and s.act_range > 0
               for n, s in specs.items() if n not in ("conv_in", "conv_out"))  # named: static, calibrated

    sized = write_recipe(tmp_path, pipeline_dir, size_mb=0.5)
    result = CliRunner().invoke(app, ["build", str(sized), "--out", str(tmp_path / "sized")])
    assert result.exit_code == 0, result.output
    summary = BitPlan.load(tmp_path / "sized" / "unet").summary()
    assert summary.params * summary.avg_weight_bits / 8 <= 0.5 * 2**20 + 1


def test_mixdq_build_reports_errors(tmp_path):
    result = CliRunner().invoke(app, ["build", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "No recipe file" in result.output


@pytest.mark.slow
def test_two_process_sharded_build_equals_single_process(tmp_path, pipeline_dir):
    """`accelerate launch --multi_gpu --num_processes 2 mixdq build ...` (gloo on a CPU-only machine) gives the plan a
    single process gives."""
    import os
    import shutil
    import subprocess
    import sys

    # activations are allocated too, so both sweeps are sharded and merged
    acts = {"activations": {"candidates": [4, 8], "budget_bits": 6.0, "protect_most_sensitive": 1}}
    recipe = write_recipe(tmp_path, pipeline_dir, acts, budget_bits=4.0)
    mixdq = shutil.which("mixdq", path=os.path.dirname(sys.executable)) or "mixdq"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same float summation order in every process
    single = subprocess.run([mixdq, "build", str(recipe), "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", mixdq, "build", str(recipe), "--out", str(tmp_path / "sharded")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted((tmp_path / "sharded" / ".sensitivity-cache").glob("sensitivity-*.part*.json"))
    assert len(parts) == 2 and all(json.loads(p.read_text()) for p in parts)
    # the refine stage ran in both processes, each writing its own part (one shared file raced: CI at f37c268)
    cache = tmp_path / "sharded" / ".sensitivity-cache"
    refine_parts = {p.name.rsplit(".part", 1)[1] for p in cache.glob("refine-*.part*.json")}
    assert refine_parts == {"0.json", "1.json"}
    sharded = BitPlan.load(tmp_path / "sharded" / "unet")
    assert sharded.layer_specs() == BitPlan.load(tmp_path / "single" / "unet").layer_specs()
    assert sharded.provenance["denoiser_evaluations"]["shards"] == 2
    assert {sp.activations for sp in sharded.layer_specs().values()} >= {"int4", "int8", "none"}


def test_a_protected_pattern_matching_nothing_is_one_error_in_both_build_paths(tmp_path, pipeline_dir, monkeypatch):
    """Calibrate-only and mixed builds both refuse a 'protected' typo with the same error, before calibrating."""
    from diffusers_mixdq.builder import builder

    monkeypatch.setattr(builder, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking 'protected'"))
    outputs = []
    for name, weights in (("w8", {"budget_bits": 8.0, "candidates": {"content": [8], "quality": [8]}}),
                          ("w4", {"budget_bits": 4.0})):
        recipe = write_recipe(tmp_path, pipeline_dir, **weights)
        data = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump({**data, "protected": ["conv_in", "conv_outt", "re:nothing.*"]}))
        result = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / name)])
        assert result.exit_code == 2, result.output
        assert not (tmp_path / name).exists()
        outputs.append(" ".join(result.output.split()))
    assert all("'protected' patterns match no layer of UNet2DConditionModel: 'conv_outt', 're:nothing.*'" in o
               for o in outputs), outputs


def test_build_help_and_recipe_docs_state_the_builder_defaults():
    """`mixdq build --help` and the recipe reference name the defaults the builder uses (issue #14)."""
    from diffusers_mixdq.builder import recipe
    from diffusers_mixdq.builder.options import DEFAULT_ACTIVATION_MODE, DEFAULT_PICK_OBJECTIVE

    shown = " ".join(CliRunner().invoke(app, ["build", "--help"], terminal_width=200).output.split())
    assert f"activations: {DEFAULT_ACTIVATION_MODE}" in shown and f"pick_objective: {DEFAULT_PICK_OBJECTIVE}" in shown
    lines = recipe.__doc__.splitlines()
    assert any(line.startswith(f"activations: {DEFAULT_ACTIVATION_MODE} ") and "default" in line for line in lines)
    assert any(line.startswith(f"pick_objective: {DEFAULT_PICK_OBJECTIVE} ") and "default" in line for line in lines)
