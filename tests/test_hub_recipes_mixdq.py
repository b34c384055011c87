"""The MixDQ authors' published SDXL-Turbo plans, converted into hub_recipes/: each validates, resolves on the SDXL
UNet layer table (real config, meta device) with its fingerprint, and exports back to the published files (same git
blob ids as in the authors' repository), so every layer has the published widths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from diffusers_mixdq import BitPlan

REPO = Path(__file__).resolve().parent.parent
PLANS = sorted((REPO / "hub_recipes").glob("*/*/plan.json"))
SDXL_CONFIG = REPO / "benchmarks" / "configs" / "sdxl-base-unet.json"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def sdxl_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(json.loads(SDXL_CONFIG.read_text()))


def test_the_published_sdxl_turbo_plans_are_there_with_cards():
    have = {p.parent.name for p in PLANS if p.parent.parent.name == "sdxl-turbo-mixdq"}
    assert {"w3.66a16", "w3.66a8", "w4a8", "w4.08a8", "w5a8", "w8a8"} <= have
    index = (REPO / "hub_recipes" / "README.md").read_text()
    for path in PLANS:
        card = (path.parent / "README.md").read_text()
        prov = json.loads(path.read_text())["provenance"]
        assert prov["source_commit"] in card and prov["weights_path"] in card and "License" in card
        assert f'MixDQConfig(plan="{path.parent.name}' in card.replace("sdxl-turbo-mixdq-", "")
        assert f"hub_recipes/{path.parent.parent.name}/{path.parent.name}" in index


@pytest.mark.parametrize("path", PLANS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_converted_plan_gives_every_sdxl_layer_the_published_widths(path, sdxl_unet, tmp_path):
    plan = BitPlan.load(path.parent)
    prov = plan.provenance
    assert plan.is_resolved and plan.target["base_model"] == "stabilityai/sdxl-turbo"
    resolved = plan.resolve(sdxl_unet)  # refuses another layer table (fingerprint) or unknown layers
    specs = resolved.layer_specs()
    assert len(specs) == 794 and specs == plan.layer_specs()
    out = {role: tmp_path / f"{role}.yaml" for role in ("weights", "activations", "keep_fp") if f"{role}_path" in prov}
    plan.to_mixdq(weights=out["weights"], activations=out.get("activations"), keep_fp=out.get("keep_fp"))
    for role in ("weights", "activations"):
        if role in out:
            assert _git_blob_id(out[role].read_bytes()) == prov[f"{role}_git_blob"], role
    kept = sorted(yaml.safe_load(out["keep_fp"].read_text())) if "keep_fp" in out else []
    assert kept == sorted(f"model.{n}" for n in prov.get("keep_fp", {}))
    assert all(not specs[n[len("model."):]].is_quantized for n in kept)
    published = yaml.safe_load(out["weights"].read_text())
    for name, spec in specs.items():
        assert spec.weights == ("none" if f"model.{name}" in kept else f"int{published['model.' + name]}")


def test_attach_bos_from_a_pipeline_loaded_without_its_denoiser_makes_kv_layers_bos_aware(tmp_path):
    """What the cards tell users to run, on the bundled demo pipeline (causal CLIP): `mixdq attach-bos` loads only
    the text side, attaches the same state bos_hidden_state gives on the full pipeline, and the plan then makes the
    K/V layers BOS-aware on load; a T5 pipeline (scenes) is refused with the reason."""
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from typer.testing import CliRunner

    from diffusers_mixdq import MixDQConfig, demo
    from diffusers_mixdq.bos import bos_hidden_state, bos_layers
    from diffusers_mixdq.cli import app
    from diffusers_mixdq.plan import layer_table

    shapes = demo.get_model("shapes").pipeline_path()
    with init_empty_weights():
        names = list(layer_table(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shapes, subfolder="unet"))))
    BitPlan.from_mixdq({f"model.{n}": 8 for n in names}, {f"model.{n}": 8 for n in names}).save(tmp_path / "plan")
    run = CliRunner().invoke
    result = run(app, ["attach-bos", str(tmp_path / "plan"), "--pipeline", shapes, "--out", str(tmp_path / "bos")])
    assert result.exit_code == 0, result.output
    plan = BitPlan.load(tmp_path / "bos")
    full = DiffusionPipeline.from_pretrained(shapes)
    assert plan.tensors["bos.hidden_state"].equal(bos_hidden_state(full)) and plan.target["bos"]["text_encoder"] == shapes
    unet = UNet2DConditionModel.from_pretrained(shapes, subfolder="unet",
                                                quantization_config=MixDQConfig(plan=str(tmp_path / "bos")))
    kv = {n for n in names if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert kv and set(bos_layers(unet)) == kv
    scenes = demo.get_model("scenes").pipeline_path()
    refused = run(app, ["attach-bos", str(tmp_path / "plan"), "--pipeline", scenes, "--out", str(tmp_path / "t5")])
    assert refused.exit_code == 2 and "not causal" in refused.output and not (tmp_path / "t5").exists()
    missing = run(app, ["attach-bos", str(tmp_path / "plan"), "--pipeline", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "x")])
    assert missing.exit_code == 2 and "Could not load the text encoder" in missing.output
