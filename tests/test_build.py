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
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan, record_input_ranges
from diffusers_mixdq.builder.sensitivity import layer_group, sqnr_db

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_interrupted_build_resumes_to_the_identical_plan(pipe, tmp_path, monkeypatch):
    from diffusers_mixdq.builder import scores

    s = dict(**SETTINGS, weight_bits=4.0, split_ratios=(1.0,))
    reference, _ = build_plan(pipe, BuildSettings(**s), progress=False)

    calls = {"n": 0}
    real_put = scores.ScoreCache.put

    def dying_put(self, key, score):
        real_put(self, key, score)
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill mid-sweep")

    monkeypatch.setattr(scores.ScoreCache, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        build_plan(pipe, BuildSettings(**s, cache_dir=str(tmp_path)), progress=False)
    monkeypatch.setattr(scores.ScoreCache, "put", real_put)
    (cache_file,) = tmp_path.glob("sensitivity-*.json")
    assert len(__import__("json").loads(cache_file.read_text())) == 40
    resumed, report = build_plan(pipe, BuildSettings(**s, cache_dir=str(tmp_path)), progress=False)
    assert resumed.layer_specs() == reference.layer_specs()
    full_evals = reference.provenance["denoiser_evaluations"]["sensitivity"]
    assert 0 < report.denoiser_evaluations["sensitivity"] < full_evals


def test_sample_subset_replays_exactly_and_covers_every_sample(pipe):
    from diffusers_mixdq.builder.builder import BuildSettings as S, calibrate  # the names cli/examples use

    rec = calibrate(pipe, S(**SETTINGS)).recording
    assert rec.num_calls == 2 and rec.num_samples == 8  # 2 steps x (2 prompts x CFG)
    sub = rec.subset(0.25)
    assert sub.num_calls == rec.num_calls and sub.num_samples == 2
    from diffusers_mixdq.builder.recording import subset_is_exact

    assert subset_is_exact(pipe.unet, sub)
    # a wrong slice is caught: shift every recorded output
    broken = rec.subset(0.5)
    broken.outputs = [o + 1.0 for o in broken.outputs]
    assert not subset_is_exact(pipe.unet, broken)
    assert rec.subset(1.0) is rec


def test_calibration_is_cached_on_disk(pipe, tmp_path, monkeypatch):
    from diffusers_mixdq.builder import calibration as builder
    from diffusers_mixdq.builder.calibration import load_calibration

    s = BuildSettings(**SETTINGS, cache_dir=str(tmp_path))
    first = builder.calibrate(pipe, s)
    (path,) = tmp_path.glob("calibration-*.safetensors")
    loaded = load_calibration(path)
    assert loaded.ranges == first.ranges and loaded.bos_layers == first.bos_layers
    assert loaded.elements == first.elements and all(v > 0 for v in loaded.elements.values())
    assert torch.equal(loaded.bos_state, first.bos_state) and torch.equal(loaded.recording.images,
                                                                          first.recording.images)
    for (a1, k1), (a2, k2) in zip(first.recording.calls, loaded.recording.calls):
        assert len(a1) == len(a2) and set(k1) == set(k2)
        assert torch.equal(a1[0], a2[0]) and torch.equal(k1["encoder_hidden_states"], k2["encoder_hidden_states"])

    def no_run(*a, **k):
        raise AssertionError("calibration ran again")

    monkeypatch.setattr(builder, "_calibrate_now", no_run)
    again = builder.calibrate(pipe, s)
    assert again.ranges == first.ranges
    other = BuildSettings(**{**SETTINGS, "seed": 7}, cache_dir=str(tmp_path))  # another run: not reused
    with pytest.raises(AssertionError, match="ran again"):
        builder.calibrate(pipe, other)
    path.write_bytes(b"torn file")  # a torn cache is recomputed, never trusted
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="unreadable calibration"):
        assert builder.calibrate(pipe, s).ranges == first.ranges


@pytest.mark.slow
def test_sweep_is_cheaper_than_naive_and_counts_honestly(pipe):
    # 8 prompts: content measurements generate 4 of them, quality measurements replay a quarter of the samples
    prompts = ["a red circle", "a blue square", "a green star", "a tiny dot", "two lines", "a big ring", "an arc",
               "a cross"]
    # refine off: its proposals differ between the two builds, and what is compared here is the measurement sweep
    s = dict(**{**SETTINGS, "prompts": prompts}, weight_bits=4.0, split_ratios=(1.0,), refine_evaluations=0)
    _, naive = build_plan(pipe, BuildSettings(**s, sweep_fraction=1.0, content_fraction=1.0,
                                              extrapolate_widest=False), progress=False)
    assert naive.reduction == pytest.approx(1.0)  # measuring everything on every sample is the naive protocol
    _, fast = build_plan(pipe, BuildSettings(**s), progress=False)
    assert fast.naive_sample_evaluations == naive.naive_sample_evaluations
    assert fast.reduction >= 3.0, fast.sample_evaluations
    from diffusers_mixdq.builder.measure import prompt_subset

    assert prompt_subset(8, 0.5, 4) == [0, 2, 4, 6] and prompt_subset(2, 0.5, 4) == [0, 1]
    # a single candidate width leaves nothing to measure
    plan, w8 = build_plan(pipe, BuildSettings(**{**s, "weight_bits": 8.0}, widths={"content": [8], "quality": [8]}),
                          progress=False)
    assert w8.sample_evaluations["sensitivity"] == 0
    assert {sp.weights for sp in plan.layer_specs().values()} == {"int8"}


@pytest.mark.slow
def test_activation_allocation_meets_its_budget_and_protects_the_most_sensitive(pipe, tmp_path):
    s = BuildSettings(**SETTINGS, weight_bits=6.0, split_ratios=(1.0,), act_widths=[4, 8], act_bits=6.0,
                      act_protect=2, protected=("conv_in",))
    plan, report = build_plan(pipe, s, progress=False)
    specs = plan.layer_specs()
    assert report.sample_evaluations["activation_sensitivity"] > 0
    assert report.activation_solver and report.activation_solver[0]["status"] == "Optimal"
    kept = plan.provenance["allocation"]["activations_kept_unquantized"]
    assert len(kept) == 2 and all(specs[n].activations == "none" for n in kept)
    assert specs["conv_in"].activations == "none"
    acts = {sp.activations for sp in specs.values()}
    assert {"int4", "int8"} <= acts
    # the budget is element-weighted: each layer counts with its input elements per sample, measured here anew
    elements = {}
    record_input_ranges(pipe.unet, lambda: pipe(list(s.prompts), num_inference_steps=2, guidance_scale=3.0,
                                                height=32, width=32, output_type="np"), elements=elements)
    quantized = {n: int(sp.activations[3:]) for n, sp in specs.items() if sp.activations != "none"}
    avg = sum(b * elements[n] for n, b in quantized.items()) / sum(elements[n] for n in quantized)
    assert avg <= 6.0 + 1e-6 and avg == pytest.approx(report.activation_solver[0]["avg_bits"])
    plan.save(tmp_path / "plan")
    pipe.save_pretrained(tmp_path / "pipe")
    qpipe = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe",
        quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=tmp_path / "plan")}),
    )
    qpipe.set_progress_bar_config(disable=True)
    images = qpipe(["a red circle"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                   output_type="np").images
    assert np.isfinite(images).all()


def test_most_sensitive_ranks_across_groups_by_relative_damage():
    from diffusers_mixdq.builder.assign import most_sensitive

    groups = {"q1": "quality", "q2": "quality", "q3": "quality", "c1": "content", "c2": "content"}
    metric = {"quality": "sqnr_db", "content": "ssim"}
    # q3 has 100x the noise of q1/q2; c2 loses 10x the SSIM of c1: q3 stands out more within its group
    scores = {"q1": 40.0, "q2": 40.0, "q3": 20.0, "c1": 0.999, "c2": 0.99}
    assert most_sensitive(scores, groups, metric, 1) == ["q3"]
    assert most_sensitive(scores, groups, metric, 2) == ["q3", "c2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(sweep_fraction=0.0), "sweep_fraction"),
    (dict(content_fraction=1.5), "content_fraction"),
    (dict(act_widths=[2, 8]), "act_widths"),
    (dict(act_widths=[4, 8], act_bits=3.0), "between 4 and 8"),
    (dict(activations="none", act_protect=3), "need quantized activations"),
    (dict(activations="int2"), "activations must be"),
    (dict(allocator="nope"), "allocator must name a registered allocator"),
])
def test_bad_settings_are_refused_before_any_work(pipe, kwargs, message):
    from diffusers_mixdq.errors import MixDQError

    with pytest.raises(MixDQError, match=message):
        build_plan(pipe, BuildSettings(**SETTINGS, **kwargs), progress=False)


def test_build_device_placement():
    from types import SimpleNamespace

    from diffusers_mixdq.builder.distributed import build_device

    s = BuildSettings(**SETTINGS)
    assert build_device(s) is None
    assert build_device(BuildSettings(**SETTINGS, device="cpu")) == torch.device("cpu")
    rank1 = SimpleNamespace(device=torch.device("cuda", 1))
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else None
    assert build_device(s, rank1) == expected
