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
    # plan.json + plan.safetensors of 5 shapes plans; plan.json of 5 scenes plans (T5: no BOS); the text-encoder
    # plan sets (issue #16): te-w8 (1 file each model), w8a8-te-w8 (shapes: 3 files, scenes: 2)
    assert len(files) == 22
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
    result = CliRunner().invoke(app, ["demo", "--model", "shapes", "--out", "out", "--num-prompts", "8",
                                      "--no-memory", "--json", "summary.json"])
    assert result.exit_code == 0, result.output
    assert "w8a8" in result.output and "PSNR" in result.output and "8 test prompts" in result.output
    assert (tmp_path / "out" / "shapes" / "grid.png").stat().st_size > 1000
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "shapes" / "results.json").read_text())}
    assert set(rows) == {"FP32", "w8a8", "w4a8-mixed", "te-w8", "w8a8-te-w8"}  # plans, then plan sets (issue #16)
    assert rows["te-w8"]["psnr"] > 60 and rows["te-w8"]["avg_weight_bits"] == 32  # FP32 denoiser, W8 text encoder
    assert rows["FP32"]["alignment"]["colour"] >= 0.9 and rows["FP32"]["alignment"]["shape"] >= 0.9
    assert rows["FP32"]["psnr"] is None and rows["FP32"]["frechet"] > 0 and len(rows["FP32"]["aligned"]) == 8
    assert rows["w8a8"]["psnr"] > 35 and rows["w8a8"]["ssim"] > 0.99 and len(rows["w8a8"]["psnr_per_image"]) == 8
    assert rows["w8a8"]["summary"]["psnr_median_db"] > 35 and rows["w8a8"]["summary"]["diverged"] == 0
    assert rows["w4a8-mixed"]["denoiser_bytes"] < rows["w8a8"]["denoiser_bytes"] < rows["FP32"]["denoiser_bytes"]
    assert rows["w4a8-mixed"]["avg_weight_bits"] <= 4.0 < rows["w8a8"]["avg_weight_bits"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in summary] == ["shapes/FP32", "shapes/w4a8-mixed", "shapes/w8a8", "shapes/te-w8",
                                            "shapes/w8a8-te-w8"]


def test_demo_with_a_plans_directory(tmp_path):
    BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    (tmp_path / "not-a-plan").mkdir()
    result = CliRunner().invoke(app, ["demo", "--model", "shapes", "--plans", str(tmp_path), "--out",
                                      str(tmp_path / "out"), "--num-prompts", "8", "--no-memory"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "shapes" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8"]


def test_both_bundled_models_have_pipelines_and_plans():
    assert demo.available_models() == ["shapes", "scenes"]
    assert sorted(demo.plans_in(demo.get_model("scenes").plans_dir())) == ["w3a8-mixed", "w3a8-rule", "w4a8-mixed", "w4a8-uniform", "w8a8"]
    for model in ("shapes", "scenes"):  # whole-pipeline plan sets, shown by `mixdq demo` after the plans
        assert list(demo.plan_sets_in(demo.get_model(model).plans_dir())) == ["te-w8", "w8a8-te-w8"]
    assert demo.plan_sets_in(demo.plans_dir("shapes-extra")) == {}


def test_eval_command_with_a_plan_file(tmp_path):
    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    result = CliRunner().invoke(app, ["eval", demo.pipeline_path(), "--plan", str(plan.parent),
                                      "--num-prompts", "4", "--no-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "4 prompts of the shapes test set, seed 0" in result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8"] and rows[1]["psnr"] > 30
    assert rows[1]["alignment"]["n"] == 4 and rows[1]["frechet"] >= 0


def test_eval_takes_a_local_plan_set_with_one_component_folder(tmp_path):
    """A copy of the bundled te-w8 set (text_encoder/ only) is a plan set, not a denoiser plan: it evaluates as the
    bundled one does, exactly."""
    import shutil

    local = tmp_path / "my-te"
    shutil.copytree(demo.get_model("shapes").plans_dir() / "te-w8", local)
    result = CliRunner().invoke(app, ["eval", "--plan", "te-w8", "--plan", str(local), "--num-prompts", "2",
                                      "--no-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert rows["my-te"]["psnr"] == rows["te-w8"]["psnr"] > 40 and rows["my-te"]["avg_weight_bits"] == 32
    assert rows["my-te"]["text_encoder_bytes"] == rows["te-w8"]["text_encoder_bytes"]
    assert rows["te-w8"]["text_encoder_bytes"] < rows["FP32"]["text_encoder_bytes"] / 2  # int8 Linears, fp32 tables


def test_eval_json_has_exactly_the_fields_and_compare_tests_two_variants(tmp_path):
    from diffusers_mixdq.evaluation import SUMMARY_FIELDS

    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    result = CliRunner().invoke(app, ["eval", "--plan", str(plan.parent), "--plan", "w4a8-mixed", "--num-prompts",
                                      "6", "--seed", "3", "--no-memory", "--compare", "u8", "w4a8-mixed", "--json",
                                      str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in rows] == ["FP32", "u8", "w4a8-mixed"]
    assert all(tuple(r) == SUMMARY_FIELDS for r in rows)
    fp, u8 = rows[0], rows[1]
    assert fp["psnr_median_db"] is None and fp["psnr_p10_db"] is None and fp["diverged"] is None
    assert fp["ssim"] is None and fp["avg_weight_bits"] == 32.0 and 0 <= fp["aligned"] <= 100
    assert u8["psnr_p10_db"] <= u8["psnr_median_db"] and u8["psnr_median_db"] > 30 and u8["diverged"] == 0
    assert u8["aligned_ci"][0] <= u8["aligned"] <= u8["aligned_ci"][1] and u8["seconds_per_image"] > 0
    assert rows[2]["denoiser_bytes"] < u8["denoiser_bytes"] < fp["denoiser_bytes"]
    out = " ".join(result.output.split())
    assert "u8 vs w4a8-mixed, 6 paired images" in out and "McNemar exact" in out and "Wilcoxon signed-rank" in out
    bad = CliRunner().invoke(app, ["eval", "--plan", str(plan.parent), "--num-prompts", "2", "--no-memory",
                                   "--compare", "u8", "nope"])
    assert bad.exit_code == 2 and "no variant 'nope'" in bad.output


def test_eval_compares_every_pair_given_and_checks_names_before_generating(tmp_path, monkeypatch):
    from diffusers_mixdq.cli import evaluation as cli_eval

    plan = BitPlan.uniform("int8", activations="int8").save(tmp_path / "u8")
    result = CliRunner().invoke(app, ["eval", "--plan", str(plan.parent), "--plan", "w4a8-mixed", "--num-prompts",
                                      "2", "--no-memory", "--no-scorer", "--compare", "u8", "w4a8-mixed",
                                      "--compare", "FP32", "u8", "--compare", "w4a8-mixed", "FP32"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert all(f"{a} vs {b}, 2 paired images" in out for a, b in
               (("u8", "w4a8-mixed"), ("FP32", "u8"), ("w4a8-mixed", "FP32")))
    monkeypatch.setattr(cli_eval, "_run", lambda *a, **k: pytest.fail("generated before checking --compare"))
    bad = CliRunner().invoke(app, ["eval", "--plan", str(plan.parent), "--no-memory", "--compare", "u8", "FP32",
                                   "--compare", "nope", "u8"])
    assert bad.exit_code == 2 and "no variant 'nope'" in bad.output
    short = CliRunner().invoke(app, ["eval", "--plan", str(plan.parent), "--compare", "u8"])
    assert short.exit_code == 2 and "two variant names" in short.output


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
    result = CliRunner().invoke(app, ["demo", "--model", "shapes", "--plans", str(tmp_path), "--no-memory"])
    assert result.exit_code == 2 and "No demo plans" in result.output
    result = CliRunner().invoke(app, ["demo", "--plans", str(tmp_path), "--no-memory"])  # two bundled models
    assert result.exit_code == 2 and "--plans needs exactly one --model" in result.output


@pytest.mark.slow
def test_peak_memory_of_a_variant_is_measured_in_a_fresh_process(tmp_path):
    from diffusers_mixdq.evaluation import Generation, measure_peak_rss

    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc")
    plan = BitPlan.load(demo.plan_path("w8a8")).save(tmp_path / "w8a8")
    prompts = list(demo.DEMO_PROMPTS[:2])
    gen = Generation(steps=2, guidance=demo.GUIDANCE_SCALE, height=32, width=32)
    fp = measure_peak_rss(demo.pipeline_path(), None, prompts, gen)
    quantized = measure_peak_rss(demo.pipeline_path(), str(plan), prompts, gen)
    assert 50 * 2**20 < fp < 8 * 2**30 and 50 * 2**20 < quantized < 8 * 2**30


def test_a_registered_model_plugs_in_with_its_hooks_and_pipeline_kwargs(tmp_path, monkeypatch, pipeline_dir):
    """What the scenes model provides (data and scorer modules, defaults.json with extra pipeline arguments),
    checked on a tiny pipeline: its prompt sets, its scorer and its pipeline arguments reach the run."""
    import shutil
    import sys

    from diffusers_mixdq import sampling
    from diffusers_mixdq.demo.models import MODELS, DemoModel

    root = tmp_path / "fake"
    shutil.copytree(pipeline_dir, root / "pipeline")
    (root / "defaults.json").write_text(json.dumps({"num_inference_steps": 2, "guidance_scale": 2.0, "height": 32,
                                                    "width": 32, "eta": 0.0}))
    (tmp_path / "fake_data.py").write_text(
        "def caption_pools():\n"
        "    return [[f'cal {i}' for i in range(3)], [f'val {i}' for i in range(3)], [f'test {i}' for i in range(5)]]\n"
        "def parse_caption(c):\n"
        "    split, i = c.split()\n"
        "    return {'split': split, 'i': i}\n")
    (tmp_path / "fake_scorer.py").write_text(
        "import torch\n"
        "class S:\n"
        "    def aligned(self, images, prompts):\n"
        "        return torch.tensor([int(p.split()[1]) % 2 == 0 for p in prompts])\n"
        "    def score(self, images, prompts):\n"
        "        return {'all': self.aligned(images, prompts).float().mean().item(), 'n': len(prompts), 'x': [1]}\n"
        "    def features(self, images):\n"
        "        return images.flatten(1)\n"
        "def load_scorer():\n"
        "    return S()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(MODELS, "fake", DemoModel("fake", root, "fake_data", "fake_scorer"))
    (root.parent / "plans").mkdir()
    BitPlan.uniform("int8", activations="int8").save(tmp_path / "plans" / "u8")
    calls = []
    real_generate = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append(k["pipe_kwargs"]) or real_generate(*a, **k))
    assert demo.prompt_set("fake", "test", 7, seed=0)[5:] == demo.prompt_set("fake", "test", 7, seed=0)[:2]
    assert set(demo.prompt_set("fake", "calibration", 3)) == {"cal 0", "cal 1", "cal 2"}
    result = CliRunner().invoke(app, ["demo", "--model", "fake", "--plans", str(tmp_path / "plans"), "--out",
                                      str(tmp_path / "out"), "--num-prompts", "5", "--no-memory", "--json",
                                      str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert calls == [{"eta": 0.0}, {"eta": 0.0}]
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["name"] for r in rows] == ["fake/FP32", "fake/u8"] and rows[0]["aligned"] == 60.0  # 0, 2, 4 of 5
    assert sys.modules["fake_data"].caption_pools()[2][0] == "test 0"
