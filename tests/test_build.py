"""The builder core end to end on a tiny random StableDiffusionPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pipeline
from diffusers import DiffusionPipeline
from diffusers.quantizers import PipelineQuantizationConfig

from diffusers_mixdq import BitPlan, MixDQConfig
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.build import BuildSettings, build_plan, calibrated_plan, record_input_ranges
from diffusers_mixdq.build.sensitivity import layer_group, sqnr_db

SETTINGS = dict(prompts=["a red circle", "a blue square"], steps=2, guidance=3.0, height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    p = make_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_groups_and_sqnr():
    assert layer_group("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == "content"
    assert layer_group("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == "content"
    assert layer_group("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == "quality"
    assert layer_group("conv_in") == "quality"
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x * 1.1, x) == pytest.approx(20.0, abs=1e-4)  # fp32 1.1


def test_calibrated_w8a8_plan(pipe, tmp_path):
    s = BuildSettings(**SETTINGS)
    plan = calibrated_plan(pipe, BitPlan(defaults={"weights": "int8", "activations": "int8"}), s)
    specs = plan.layer_specs()
    assert all(isinstance(sp.act_range, float) and sp.act_range > 0 for sp in specs.values())
    bos = [n for n, sp in specs.items() if sp.flags.get("bos_aware")]
    assert bos and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in bos)
    assert "bos" in plan.target and "bos.hidden_state" in plan.tensors
    path = plan.save(tmp_path / "w8a8")
    loaded = BitPlan.load(path.parent)
    assert loaded.layer_specs() == specs


def test_build_meets_budget_loads_and_generates(pipe, tmp_path):
    s = BuildSettings(**SETTINGS, weight_bits=4.0, split_ratios=(0.5, 1.0, 2.0), protected=("conv_in", "conv_out"))
    plan, report = build_plan(pipe, s, progress=False)
    summary = plan.summary()
    assert summary.avg_weight_bits <= 4.0 + 1e-9
    specs = plan.layer_specs()
    assert specs["conv_in"].weights == "none" and specs["conv_out"].weights == "none"
    widths = {sp.weights for n, sp in specs.items() if n not in ("conv_in", "conv_out")}
    assert widths <= {"int2", "int4", "int8"} and len(widths) >= 2  # mixed
    assert all(sp.weights in ("int4", "int8") for n, sp in specs.items()
               if layer_group(n) == "quality" and n not in ("conv_in", "conv_out"))
    assert report.chosen_k in (0.5, 1.0, 2.0)
    assert all(entry["status"] == "Optimal" for entry in report.solver)
    prov = plan.provenance
    assert prov["denoiser_evaluations"]["sensitivity"] > 0 and prov["allocation"]["status"] == "Optimal"

    plan_dir = tmp_path / "plan"
    plan.save(plan_dir)
    pipe.save_pretrained(tmp_path / "pipe")
    qpipe = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe",
        quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=plan_dir)}),
    )
    qpipe.set_progress_bar_config(disable=True)
    assert quantized_layers(qpipe.unet) == {n: (sp.weights, sp.activations) for n, sp in specs.items()}
    images = qpipe(list(s.prompts), num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                   output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_bos_layers_are_calibrated_without_token_zero(pipe):
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k")]

    def run():
        pipe(["a red circle"], num_inference_steps=1, height=32, width=32, output_type="np")

    full = record_input_ranges(pipe.unet, run, layers=names)
    skipped = record_input_ranges(pipe.unet, run, layers=names, skip_first_token=names)
    assert all(skipped[n] <= full[n] for n in names)


def test_interrupted_build_resumes_to_the_identical_plan(pipe, tmp_path, monkeypatch):
    from diffusers_mixdq.build import sensitivity

    s = dict(**SETTINGS, weight_bits=4.0, split_ratios=(1.0,))
    reference, _ = build_plan(pipe, BuildSettings(**s), progress=False)

    calls = {"n": 0}
    real_put = sensitivity.ScoreCache.put

    def dying_put(self, name, bits, score):
        real_put(self, name, bits, score)
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill mid-sweep")

    monkeypatch.setattr(sensitivity.ScoreCache, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        build_plan(pipe, BuildSettings(**s, cache_dir=str(tmp_path)), progress=False)
    monkeypatch.setattr(sensitivity.ScoreCache, "put", real_put)
    (cache_file,) = tmp_path.glob("sensitivity-*.json")
    assert len(__import__("json").loads(cache_file.read_text())) == 40
    resumed, report = build_plan(pipe, BuildSettings(**s, cache_dir=str(tmp_path)), progress=False)
    assert resumed.layer_specs() == reference.layer_specs()
    full_evals = reference.provenance["denoiser_evaluations"]["sensitivity"]
    assert 0 < report.denoiser_evaluations["sensitivity"] < full_evals
