"""The bundled demo model, its plans, `mixdq demo` and `mixdq eval` on CPU."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.cli import app
from diffusers_mixdq.cli_eval import DEMO_PLANS


def test_bundled_plans_fit_the_demo_model():
    from diffusers_mixdq.cli import load_model_skeleton

    unet = load_model_skeleton(demo.pipeline_path())
    for name in ("w8a8", "w4a8-mixed"):
        plan = BitPlan.load(DEMO_PLANS / name)
        assert plan.is_resolved and "bos.hidden_state" in plan.tensors
        assert plan.resolve(unet).layer_specs() == plan.layer_specs()
    assert BitPlan.load(DEMO_PLANS / "w4a8-mixed").summary().avg_weight_bits <= 4.0


def test_demo_command_writes_grid_and_table(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--num-prompts", "8", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "w8a8" in result.output and "PSNR" in result.output
    assert (tmp_path / "grid.png").stat().st_size > 1000
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"FP32", "w8a8", "w4a8-mixed"}
    assert rows["FP32"]["alignment"]["colour"] >= 0.9 and rows["FP32"]["alignment"]["shape"] >= 0.9
    assert rows["w8a8"]["psnr"] > 35 and rows["w8a8"]["ssim"] > 0.99
    assert rows["w4a8-mixed"]["denoiser_bytes"] < rows["w8a8"]["denoiser_bytes"] < rows["FP32"]["denoiser_bytes"]


def test_eval_command_with_a_plan_file(tmp_path):
    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    result = CliRunner().invoke(app, ["eval", demo.pipeline_path(), "--plan", str(plan.parent),
                                      "--num-prompts", "4", "--no-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8"] and rows[1]["psnr"] > 30


def test_demo_without_plans_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--plans", str(tmp_path), "--no-memory"])
    assert result.exit_code == 2 and "No demo plans" in result.output
