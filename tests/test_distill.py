"""The distill stage (MPQ-DM's relation distillation, simplified): adapters trained against full precision lower
the quantized model's error on the recorded calls, count in the size, load from the plan and round-trip."""

from __future__ import annotations

import torch
from conftest import make_unet
from diffusers import UNet2DConditionModel
from test_balance import load, run, unet_calibration

from diffusers_mixdq import BitPlan
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.distill import distill, relation_kl
from diffusers_mixdq.builder.recording import replay
from diffusers_mixdq.builder.sensitivity import applied


def recorded_error(model, plan, calib) -> float:
    with applied(model, plan):
        outs = replay(model, calib.recording)
    return sum(float((o - r).pow(2).mean()) for o, r in zip(outs, calib.recording.outputs))


def test_relation_kl_is_zero_for_equal_features_and_positive_otherwise():
    f = torch.randn(2, 8, 4, 4)
    assert float(relation_kl(f, f)) < 1e-6
    assert float(relation_kl(f, f + 0.5 * torch.randn_like(f))) > 1e-3


def test_distilled_adapters_lower_the_error_and_round_trip(tmp_path):
    model = make_unet()
    model.save_pretrained(tmp_path / "fp")
    # conv_out quantized too: gradients must pass its input rounding
    plan = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0}).resolve(model)
    s = BuildSettings(prompts=["x"], distill_seconds=4.0, distill_rank=2, distill_lr=3e-3,
                      lowrank_layers=["*attn*", "*.ff.*", "*resnets*"])
    with torch.inference_mode():  # as builds run: the stage must still train
        calib = unet_calibration(model)
        distilled = distill(model, calib, plan, s)
    record = distilled.provenance["distillation"]
    assert record["steps"] >= 3 and record["layers"] > 0
    flagged = [n for n, e in distilled.layers.items() if "adapter" in e.get("flags", {})]
    assert len(flagged) == record["layers"]
    assert recorded_error(model, distilled, calib) < 0.9 * recorded_error(model, plan, calib)
    assert distilled.summary().avg_weight_bits > plan.summary().avg_weight_bits
    distilled.save(tmp_path / "plan")
    loaded = load(tmp_path / "fp", tmp_path / "plan")
    loaded.save_pretrained(tmp_path / "q")
    assert torch.equal(run(UNet2DConditionModel.from_pretrained(tmp_path / "q")), run(loaded))
    # off by default: the plan comes back unchanged
    assert distill(model, calib, plan, BuildSettings(prompts=["x"])) is plan
