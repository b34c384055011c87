"""The builder with text encoders (issue #16): plan sets under a joint or per-component budget, their sensitivity
cache, BOS-safe widths, and the recipe keys."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_pipeline
from typer.testing import CliRunner

from diffusers_mixdq import BitPlan, MixDQError
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.plan_set import build_plan_set
from diffusers_mixdq.builder.recipe import load_recipe
from diffusers_mixdq.builder.refine import SKIPPED_WITH_COMPONENTS
from diffusers_mixdq.cli import app

# the tiny random CLIP moves its BOS state by more than the tolerance even at int8, so these builds measure without
# BOS rows (bos=False); test_bos_safe_widths_* checks the BOS floors on the bundled shapes model
SETTINGS = dict(prompts=["a red circle", "a blue square"], steps=2, guidance=3.0, height=32, width=32,
                split_ratios=(0.5, 1.0, 2.0), bos=False, components=("unet", "text_encoder"))
RECIPE = {"prompts": ["a red circle", "a blue square"], "steps": 2, "guidance": 3.0, "resolution": 32,
          "split_ratios": [0.5, 1.0, 2.0], "components": ["unet", "text_encoder"]}


@pytest.fixture(scope="module")
def pipe():
    p = make_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("te-cache")


def params(plan: BitPlan) -> int:
    return plan.summary().params


@pytest.mark.slow
def test_joint_and_per_component_budgets_are_honoured(pipe, cache):
    joint, _ = build_plan_set(pipe, BuildSettings(**SETTINGS, weight_bits=5.0, cache_dir=str(cache)), progress=False)
    assert set(joint) == {"unet", "text_encoder"}
    total_bits = sum(p.summary().avg_weight_bits * params(p) for p in joint.values())
    assert total_bits / sum(params(p) for p in joint.values()) <= 5.0 + 1e-9
    te = joint["text_encoder"]
    assert te.target["class_name"] == "CLIPTextModel"
    assert {sp.weights for sp in te.layer_specs().values()} <= {"int4", "int8"}
    assert all(sp.activations == "none" for sp in te.layer_specs().values())  # weight-only
    record = joint["unet"].provenance["components"]
    assert record["budget_scope"] == "joint" and te.provenance["components"] == record
    # the default refine stage refines the denoiser alone: skipped here, and said so
    assert joint["unet"].provenance["refine"] == {"skipped": SKIPPED_WITH_COMPONENTS}
    assert "refine" not in joint["unet"].provenance["sample_evaluations"]

    per, _ = build_plan_set(pipe, BuildSettings(**SETTINGS, weight_bits=5.0, budget_scope="per_component",
                                                component_budgets={"text_encoder": 6.0}, cache_dir=str(cache)),
                            progress=False)
    assert per["unet"].summary().avg_weight_bits <= 5.0 + 1e-9
    assert 5.0 < per["text_encoder"].summary().avg_weight_bits <= 6.0 + 1e-9  # its own budget, used
    assert per["unet"].provenance["components"]["budget_bits"] == {"unet": 5.0, "text_encoder": 6.0}


@pytest.mark.slow
def test_text_encoder_scores_have_their_own_cache(pipe, cache, monkeypatch):
    from diffusers_mixdq.builder import text_encoders

    s = BuildSettings(**SETTINGS, weight_bits=5.0, cache_dir=str(cache))
    first, _ = build_plan_set(pipe, s, progress=False)
    (te_file,) = cache.glob("sensitivity-text_encoder-*.json")
    denoiser_files = [p for p in cache.glob("sensitivity-*.json") if p != te_file]
    te_layers = set(first["text_encoder"].layer_specs())
    te_names = {k.split("|")[0] for k in json.loads(te_file.read_text())}
    assert te_names <= te_layers and te_names  # the encoder's own names, int4 measured (int8 extrapolated)
    for path in denoiser_files:
        assert not {k.split("|")[0] for k in json.loads(path.read_text())} & te_layers
    # a rerun takes every text-encoder score from its file: no content job runs
    monkeypatch.setattr(text_encoders, "content_scorer", lambda ctx, rec: _scorer_that_fails(ctx, rec))
    again, report = build_plan_set(pipe, s, progress=False)
    assert report.sample_evaluations["text_encoder_sensitivity"] == 0
    assert again["text_encoder"].layer_specs() == first["text_encoder"].layer_specs()
    # another text encoder (other weights) is another key, never these scores
    other = make_pipeline(seed=1)
    other.set_progress_bar_config(disable=True)
    with pytest.raises(AssertionError, match="measured again"):
        build_plan_set(other, s, progress=False)


def _scorer_that_fails(ctx, rec):
    from diffusers_mixdq.builder.measure import content_scorer

    scorer = content_scorer(ctx, rec)

    def fail():
        raise AssertionError("measured again")

    scorer.score = fail
    return scorer


@pytest.mark.slow
def test_mixdq_build_writes_a_plan_set_that_pipelines_load(tmp_path, pipeline_dir):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "pipeline": str(pipeline_dir), "weights": {"budget_bits": 5.0}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "text_encoder/plan.json" in result.output and "PipelineQuantizationConfig" in result.output
    plans = {c: BitPlan.load(out / c) for c in ("unet", "text_encoder")}
    assert all(p.target["base_model"] == str(pipeline_dir) for p in plans.values())
    qpipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=PipelineQuantizationConfig(
        quant_backend="mixdq", quant_kwargs={"plan": str(out)}, components_to_quantize=["unet", "text_encoder"]))
    for component, plan in plans.items():
        specs = plan.layer_specs()
        assert quantized_layers(getattr(qpipe, component)) == {n: (sp.weights, sp.activations)
                                                               for n, sp in specs.items() if sp.is_quantized}
    images = qpipe("a red square", num_inference_steps=2, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_bos_safe_widths_keep_the_bundled_text_encoder_near_its_bos_state():
    from diffusers_mixdq import demo
    from diffusers_mixdq.bos import bos_hidden_state
    from diffusers_mixdq.builder.bos_floors import BOS_MARGIN, bos_drift, bos_safe_widths
    from diffusers_mixdq.builder.text_encoders import text_encoder_parts, text_encoder_plan
    from diffusers_mixdq.plan import BOS_MATCH_TOLERANCE

    pipe = demo.load_pipeline()
    state = bos_hidden_state(pipe)
    parts = text_encoder_parts(pipe, ["unet", "text_encoder"], "unet")
    (part,) = parts
    w4 = {"text_encoder": text_encoder_plan(part, {n: 4 for n in part.table})}
    assert bos_drift(pipe, parts, w4, state) > BOS_MATCH_TOLERANCE  # int4 everywhere: the BOS rows would be lost
    raised = bos_safe_widths(pipe, parts, [4, 8], state)
    assert raised and len(raised) < len(part.table)  # some layers must stay wider, not all
    narrowest = {"text_encoder": text_encoder_plan(part, {n: w[0] for n, w in part.widths.items()})}
    assert bos_drift(pipe, parts, narrowest, state) <= BOS_MARGIN * BOS_MATCH_TOLERANCE
    assert {f"text_encoder/{n}" for n, w in part.widths.items() if w == [8]} == set(raised)
    bos_safe_widths(pipe, parts, [4, 8], None)  # no BOS state (a T5 encoder): no floor
    assert all(w == [4, 8] for w in part.widths.values())


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"budget_scope": "both"}, "'budget_scope' must be 'joint' or 'per_component'"),
        ({"component_budgets": {"text_encoder": 8}}, "set 'budget_scope' to per_component"),
        ({"budget_scope": "per_component", "component_budgets": {"vae": 8}}, "names 'vae', which is not among"),
        ({"budget_scope": "per_component", "component_budgets": {"text_encoder": 20}}, "between 1 and 16"),
        ({"components": ["unet", "unet"]}, "lists a component twice"),
        ({"text_encoder_widths": [7, 8]}, "'text_encoder_widths' must be a non-empty list of 2, 3, 4, 5, 6 and 8"),
        ({"context": "uniform"}, "with text-encoder 'components' use context 'fp'"),
        ({"balance": True}, "set 'budget_scope' to per_component"),
        ({"budget_scope": "per_component", "weights": {"size_mb": 2}}, "weights.size_mb is one size"),
        ({"weights": {"budget_bits": 8, "candidates": {"content": [8], "quality": [8]}}}, "need a mixed build"),
    ],
)
def test_bad_component_recipes_are_refused(extra, message):
    with pytest.raises(MixDQError, match=message):
        load_recipe({**RECIPE, "pipeline": "x", "weights": {"budget_bits": 4}, **extra})


@pytest.mark.parametrize(
    "components, message",
    [
        (("unet", "vae"), "lists 'vae', a AutoencoderKL: a build makes plans for the denoiser"),
        (("unet", "text_encoder_2"), "lists 'text_encoder_2', which StableDiffusionPipeline does not have"),
        (("text_encoder",), "must include the denoiser, 'unet'"),
    ],
)
def test_bad_components_are_refused_before_any_work(pipe, components, message, monkeypatch):
    from diffusers_mixdq.builder import builder

    monkeypatch.setattr(builder, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(MixDQError, match=message):
        build_plan_set(pipe, BuildSettings(**{**SETTINGS, "components": components}), progress=False)
    with pytest.raises(MixDQError, match="budget_scope must be"):  # settings are checked like recipes
        build_plan_set(pipe, BuildSettings(**{**SETTINGS, "budget_scope": "global"}), progress=False)
