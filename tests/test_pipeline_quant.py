"""Whole pipelines: one plan directory with a plan per component, quant_backend="mixdq" and quant_mapping."""

from __future__ import annotations

import json

import pytest
import torch

import diffusers_mixdq  # noqa: F401  (registers the backend)
from diffusers_mixdq import MixDQConfig, MixDQError
from diffusers_mixdq.apply.qmodule import is_mixdq_module

W8 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8", "activations": "none"}}


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans")
    for component in ("unet", "text_encoder"):
        (path / component).mkdir()
        (path / component / "plan.json").write_text(json.dumps(W8))
    return path


def quantized(module) -> bool:
    return any(is_mixdq_module(m) for m in module.modules())


def load(pipeline_dir, **kwargs):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        pipeline_dir, quantization_config=PipelineQuantizationConfig(**kwargs))


def run(pipe):
    out = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


def test_quant_backend_quantizes_every_listed_component(pipeline_dir, plan_dir, tmp_path):
    pipe = load(pipeline_dir, quant_backend="mixdq", quant_kwargs={"plan": str(plan_dir)},
                components_to_quantize=["unet", "text_encoder"])
    assert quantized(pipe.unet) and quantized(pipe.text_encoder) and not quantized(pipe.vae)
    assert pipe.unet.config.quantization_config.component == "unet"
    assert pipe.text_encoder.config.quantization_config.component == "text_encoder"
    images = run(pipe)
    assert torch.isfinite(images).all()

    pipe.save_pretrained(tmp_path / "saved")  # pre-quantized pipeline: reloads without any quantization config
    from diffusers import StableDiffusionPipeline

    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert quantized(again.unet) and quantized(again.text_encoder)
    assert torch.equal(run(again), images)


def test_listed_component_without_a_plan_is_a_clear_error(pipeline_dir, plan_dir):
    with pytest.raises(MixDQError, match="no plan for the pipeline component 'vae'.*unet, text_encoder|text_encoder, unet"):
        load(pipeline_dir, quant_backend="mixdq", quant_kwargs={"plan": str(plan_dir)},
             components_to_quantize=["unet", "text_encoder", "vae"])


def test_quant_mapping_with_one_config_per_component(pipeline_dir, plan_dir):
    pipe = load(pipeline_dir, quant_mapping={
        "text_encoder": MixDQConfig(plan=plan_dir, component="text_encoder"),
        "unet": MixDQConfig(plan=plan_dir / "unet"),
    })
    assert quantized(pipe.unet) and quantized(pipe.text_encoder) and not quantized(pipe.vae)


def test_component_plans_are_read_at_once_and_picked_by_class(plan_dir, tmp_path):
    config = MixDQConfig(plan=plan_dir)
    assert config.components == ["text_encoder", "unet"]
    with pytest.raises(MixDQError, match="several components"):
        config.plan_object()
    # a model read from a folder that is no pipeline component: the only plan made for its class
    typed = dict(W8, target={"class_name": "UNet2DConditionModel"})
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "plan.json").write_text(json.dumps(typed))
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "plan.json").write_text(json.dumps(W8))
    picked = MixDQConfig(plan=tmp_path).for_component("snapshot-1234", "UNet2DConditionModel")
    assert picked.component == "unet"
    with pytest.raises(MixDQError, match="component="):
        MixDQConfig(plan=tmp_path).for_component("snapshot-1234", "CLIPTextModel")
    with pytest.raises(MixDQError, match="No plan found"):
        MixDQConfig(plan=tmp_path, component="text_encoder_2")


def test_broken_component_plan_is_refused_when_the_config_is_made(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "plan.json").write_text(json.dumps(W8))
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "plan.json").write_text("{not json")
    with pytest.raises(MixDQError, match="not valid JSON"):
        MixDQConfig(plan=tmp_path)


def test_evaluation_loads_a_plan_set(pipeline_dir, plan_dir):
    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.evaluation.generation import load_pipeline

    pipe = load_pipeline(pipeline_dir, str(plan_dir))
    assert quantized(pipe.unet) and quantized(pipe.text_encoder) and not quantized(pipe.vae)
    only_text = load_pipeline(pipeline_dir, {"text_encoder": BitPlan.from_dict(W8)})
    assert quantized(only_text.text_encoder) and not quantized(only_text.unet)
    with pytest.raises(MixDQError, match="transformer"):
        load_pipeline(pipeline_dir, {"transformer": BitPlan.from_dict(W8)})


@pytest.mark.parametrize("model", ["shapes", "scenes"])
def test_bundled_text_encoder_plan_sets(model):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    from diffusers_mixdq import demo

    m = demo.get_model(model)
    if not m.available():
        pytest.skip(f"the {model} pipeline is not bundled in this checkout")
    plans = m.plans_dir() / "w8a8-te-w8"
    components = sorted(p.parent.name for p in plans.glob("*/plan.json"))
    pipe = DiffusionPipeline.from_pretrained(m.pipeline_path(), quantization_config=PipelineQuantizationConfig(
        quant_backend="mixdq", quant_kwargs={"plan": str(plans)}, components_to_quantize=components))
    assert "text_encoder" in components and len(components) == 2
    assert all(quantized(getattr(pipe, c)) for c in components)
    te = pipe.text_encoder.config.quantization_config.plan
    assert te.summary().avg_weight_bits == 8.0 and te.target["class_name"] == type(pipe.text_encoder).__name__
