"""The bundled demo model, its packaged plans, `mixdq demo` and `mixdq eval` on CPU."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.cli import app

BUNDLED = ("w4a8-mixed", "w8a8")
PACKAGE = Path(demo.__file__).resolve().parent.parent


def test_bundled_plans_are_package_data():
    assert demo.plans_dir().resolve().relative_to(PACKAGE).as_posix() == "demo/plans/shapes"
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["diffusers_mixdq"]
    files = [f.relative_to(PACKAGE).as_posix() for f in (PACKAGE / "demo" / "plans").rglob("*") if f.is_file()]
    assert len(files) == 10  # plan.json + plan.safetensors of 5 plans
    unpackaged = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not unpackaged, f"not in the wheel (pyproject package-data): {unpackaged}"
    assert tuple(demo.plans_in(demo.plans_dir())) == BUNDLED
    for name in BUNDLED:
        path = demo.plan_path(name)
        assert path == demo.plans_dir() / name
        assert (path / "plan.json").is_file() and (path / "plan.safetensors").is_file()
    assert demo.plan_path("w3a8-mixed") == demo.plans_dir("shapes-extra") / "w3a8-mixed"
    with pytest.raises(FileNotFoundError, match="w3a8-mixed"):
        demo.plan_path("w3a8-mixed", "shapes")
    with pytest.raises(ValueError, match="unknown demo plan set"):
        demo.plans_dir("nope")
    assert demo.plans_in(demo.plans_dir() / "w8a8" / "plan.json") == {}


def test_bundled_plans_fit_the_demo_model():
    from diffusers_mixdq.cli import load_model_skeleton

    unet = load_model_skeleton(demo.pipeline_path())
    for name in BUNDLED:
        plan = BitPlan.load(demo.plan_path(name))
        assert plan.is_resolved and "bos.hidden_state" in plan.tensors
        assert plan.resolve(unet).layer_specs() == plan.layer_specs()
    assert BitPlan.load(demo.plan_path("w4a8-mixed")).summary().avg_weight_bits <= 4.0


def test_demo_command_writes_grid_and_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the packaged plans are found wherever the command runs
    result = CliRunner().invoke(app, ["demo", "--out", "out", "--num-prompts", "8", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "w8a8" in result.output and "PSNR" in result.output
    assert (tmp_path / "out" / "grid.png").stat().st_size > 1000
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert set(rows) == {"FP32", "w8a8", "w4a8-mixed"}
    assert rows["FP32"]["alignment"]["colour"] >= 0.9 and rows["FP32"]["alignment"]["shape"] >= 0.9
    assert rows["FP32"]["psnr"] is None and rows["FP32"]["frechet"] > 0
    assert rows["w8a8"]["psnr"] > 35 and rows["w8a8"]["ssim"] > 0.99
    assert rows["w4a8-mixed"]["denoiser_bytes"] < rows["w8a8"]["denoiser_bytes"] < rows["FP32"]["denoiser_bytes"]
    assert rows["w4a8-mixed"]["avg_weight_bits"] <= 4.0 < rows["w8a8"]["avg_weight_bits"]


def test_demo_with_a_plans_directory(tmp_path):
    BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    (tmp_path / "not-a-plan").mkdir()
    result = CliRunner().invoke(app, ["demo", "--plans", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--num-prompts", "8", "--no-memory"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8"]


def test_eval_command_with_a_plan_file(tmp_path):
    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    result = CliRunner().invoke(app, ["eval", demo.pipeline_path(), "--plan", str(plan.parent),
                                      "--num-prompts", "4", "--no-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8"] and rows[1]["psnr"] > 30
    assert rows[1]["alignment"]["n"] == 4 and rows[1]["frechet"] >= 0


def test_eval_command_with_other_prompts_skips_alignment(tmp_path):
    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n\na photo of a dog\n")
    result = CliRunner().invoke(app, ["eval", demo.pipeline_path(), "--plan", str(plan.parent), "--prompts",
                                      str(tmp_path / "prompts.txt"), "--no-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "alignment is not scored" in result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["alignment"] for r in rows] == [None, None] and rows[1]["psnr"] > 30


def test_eval_without_prompts_fails_clearly(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n\n")
    result = CliRunner().invoke(app, ["eval", demo.pipeline_path(), "--plan", "x", "--prompts",
                                      str(tmp_path / "prompts.txt"), "--no-memory"])
    assert result.exit_code == 2 and "No prompts in" in result.output


def test_demo_without_plans_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--plans", str(tmp_path), "--no-memory"])
    assert result.exit_code == 2 and "No demo plans" in result.output


@pytest.mark.slow
def test_peak_memory_of_a_variant_is_measured_in_a_fresh_process(tmp_path):
    from diffusers_mixdq.evaluate import measure_peak_rss

    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc")
    plan = BitPlan.load(demo.plan_path("w8a8")).save(tmp_path / "w8a8")
    prompts = list(demo.DEMO_PROMPTS[:2])
    fp = measure_peak_rss(demo.pipeline_path(), None, prompts, 2, demo.GUIDANCE_SCALE, 0)
    quantized = measure_peak_rss(demo.pipeline_path(), str(plan), prompts, 2, demo.GUIDANCE_SCALE, 0)
    assert 50 * 2**20 < fp < 8 * 2**30 and 50 * 2**20 < quantized < 8 * 2**30
