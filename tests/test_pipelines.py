"""DiTs, whole pipelines, PipelineQuantizationConfig, registration and the CLI."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from conftest import make_pipeline, pixart_inputs, rel_err
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from typer.testing import CliRunner

import diffusers_mixdq
from diffusers_mixdq import BitPlan, MixDQConfig
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.cli import app
from diffusers_mixdq.plan import layer_table

DIT_PLAN = BitPlan(
    defaults={"weights": "int8", "activations": "int8", "act_range": "dynamic"},
    rules=[{"targets": ["*.ff.*"], "weights": "int4"}, {"targets": ["*.attn2.to_[kv]"], "weights": "int2"}],
    ignore=["pos_embed.proj", "proj_out"],
)


def run_dit(model):
    with torch.no_grad():
        return model(**pixart_inputs()).sample


def test_dit_quantizes_and_reloads_bit_identically(pixart_dir, tmp_path):
    ref = run_dit(PixArtTransformer2DModel.from_pretrained(pixart_dir))
    model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=MixDQConfig(plan=DIT_PLAN))
    layers = quantized_layers(model)
    assert layers["transformer_blocks.0.ff.net.0.proj"] == ("int4", "int8")
    assert layers["transformer_blocks.1.attn2.to_v"] == ("int2", "int8")
    assert layers["proj_out"] == ("none", "none")
    out = run_dit(model)
    assert 0 < rel_err(out, ref) < 0.5
    int8 = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=MixDQConfig(plan=BitPlan.uniform()))
    assert rel_err(run_dit(int8), ref) < 2e-2
    model.save_pretrained(tmp_path)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(run_dit(reloaded), out)


def generate(pipe, prompt="a red circle", **kw):
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    return out.images


def test_pipeline_quant_mapping_save_reload_bit_identical(pipeline_dir, tmp_path):
    plan = BitPlan.uniform("int4", activations="int8", ignore=["conv_in", "conv_out"])
    qconfig = PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=plan)})
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=qconfig)
    pipe.set_progress_bar_config(disable=True)
    assert quantized_layers(pipe.unet)["down_blocks.0.resnets.0.conv1"] == ("int4", "int8")
    assert quantized_layers(pipe.unet)["conv_in"] == ("none", "none")
    images = generate(pipe)
    fp = DiffusionPipeline.from_pretrained(pipeline_dir)
    fp.set_progress_bar_config(disable=True)
    fp_images = generate(fp)
    assert images.shape == fp_images.shape and not np.array_equal(images, fp_images)

    pipe.save_pretrained(tmp_path)
    unet_cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet_cfg["quantization_config"]["quant_method"] == "mixdq"
    # each component's save_pretrained writes its plan file beside its weights; config.json refers to it
    assert unet_cfg["quantization_config"]["plan"]["file"] == "mixdq_plan.json"
    assert BitPlan.load(tmp_path / "unet" / "mixdq_plan.json") == pipe.unet.config.quantization_config.plan
    again = DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(again), images)
    with torch.inference_mode():
        assert np.array_equal(generate(again), images)


def test_pipeline_with_cfg_and_batches(pipeline_dir):
    plan = BitPlan.uniform("int8", activations="int8")
    pipe = DiffusionPipeline.from_pretrained(
        pipeline_dir, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=plan)})
    )
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, ["a red circle", "a blue square"], guidance_scale=3.0)
    assert images.shape[0] == 2 and np.isfinite(images).all()


def test_registration_is_idempotent():
    from diffusers.quantizers import auto
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    from diffusers_mixdq._registration import is_registered
    from diffusers_mixdq.apply.quantizer import MixDQQuantizer

    tables = (auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    saved = [table.pop("mixdq") for table in tables]
    try:
        assert not is_registered()  # the check can fail: registering is what puts the entries there
        diffusers_mixdq._register()
        assert is_registered()
    finally:
        for table, entry in zip(tables, saved):
            table.setdefault("mixdq", entry)
    before = [dict(table) for table in tables]
    for _ in range(3):
        importlib.reload(diffusers_mixdq)
        diffusers_mixdq._register()
    # same names, each still pointing at the very same classes
    assert [dict(table) for table in tables] == before
    assert auto.AUTO_QUANTIZER_MAPPING["mixdq"] is MixDQQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["mixdq"] is MixDQConfig
    # a config from the reloaded module still resolves through diffusers, to our config and quantizer
    plan = BitPlan.uniform("int4")
    cfg = DiffusersAutoQuantizer.from_dict(MixDQConfig(plan=plan).to_dict())
    assert isinstance(cfg, MixDQConfig) and cfg.plan == plan
    assert isinstance(DiffusersAutoQuantizer.from_config(cfg), MixDQQuantizer)


def test_cli_inspect(tmp_path, unet_dir):
    plan_path = BitPlan(defaults={"weights": "int4"}, ignore=["conv_in"]).save(tmp_path / "plan")
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(plan_path), "--model", str(unet_dir)])
    assert result.exit_code == 0, result.output
    from diffusers import UNet2DConditionModel

    quantizable = len(layer_table(UNet2DConditionModel.from_pretrained(unet_dir)))  # every layer but conv_in: int4
    assert "average weight bits" in result.output and f"int4: {quantizable - 1}" in result.output
    result = runner.invoke(app, ["inspect", str(plan_path), "--model", str(unet_dir), "--json"])
    data = json.loads(result.output)
    assert data["weight_layers"] == {"int4": quantizable - 1, "none": 1}
    assert 3.5 < data["ratio_vs_fp16"] < 4.0
    result = runner.invoke(app, ["inspect", str(plan_path)])
    assert result.exit_code == 2 and "--model" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "No plan found" in result.output


def test_cli_inspect_pipeline_dir(pipeline_dir, tmp_path):
    plan_path = BitPlan.uniform("int8").save(tmp_path / "p.json")
    result = CliRunner().invoke(app, ["inspect", str(plan_path), "--model", str(pipeline_dir), "--layers"])
    assert result.exit_code == 0, result.output
    assert "conv_in" in result.output and "UNet2DConditionModel" in result.output


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "mixdq"]
    assert ep.value == "diffusers_mixdq.cli:main"


@pytest.mark.parametrize("bad", ["{", '{"format": "diffusers-mixdq-plan", "version": 2}'])
def test_cli_reports_bad_plans(tmp_path, bad):
    path = tmp_path / "plan.json"
    path.write_text(bad)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2 and "error:" in result.output
