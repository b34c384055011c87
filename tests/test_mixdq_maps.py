"""MixDQ's published plan maps: import, export, round trip, and the errors for what the format cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch

from diffusers_mixdq import BitPlan, MixDQError
from diffusers_mixdq.plan import layer_table

from conftest import make_unet


def _maps_for(unet, seed: int = 0):
    """A weight map over every layer and an activation map that leaves some layers out (MixDQ's shape)."""
    gen = torch.Generator().manual_seed(seed)
    names = list(layer_table(unet))
    weights = {f"model.{n}": [2, 4, 8][int(torch.randint(0, 3, (1,), generator=gen))] for n in names}
    acts = {f"model.{n}": [4, 8][int(torch.randint(0, 2, (1,), generator=gen))] for n in names[1:-1]}
    return weights, acts


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in data.items()))
    return path


def test_import_gives_every_layer_its_published_widths(tmp_path):
    unet = make_unet()
    weights, acts = _maps_for(unet)
    plan = BitPlan.from_mixdq(_write_yaml(tmp_path / "w.yaml", weights), _write_yaml(tmp_path / "a.yaml", acts))
    specs = plan.resolve(unet).layer_specs()
    assert set(specs) == set(layer_table(unet))
    for name, spec in specs.items():
        assert spec.weights == f"int{weights['model.' + name]}"
        expected_act = f"int{acts['model.' + name]}" if f"model.{name}" in acts else "none"
        assert spec.activations == expected_act
        assert spec.act_range == ("dynamic" if expected_act != "none" else None)


def test_round_trip_import_export_gives_the_same_maps(tmp_path):
    unet = make_unet()
    weights, acts = _maps_for(unet, seed=3)
    plan = BitPlan.from_mixdq(weights, acts)
    again = BitPlan.from_json(plan.to_json())
    w_out, a_out = again.to_mixdq()
    assert w_out == weights and a_out == acts
    files = again.to_mixdq(weights=tmp_path / "w.yaml", activations=tmp_path / "a.yaml")
    assert files == (w_out, a_out)
    back = BitPlan.from_mixdq(tmp_path / "w.yaml", tmp_path / "a.yaml")
    assert back.to_mixdq() == (weights, acts)


def test_widths_the_format_cannot_express_are_named(tmp_path):
    bad = _write_yaml(tmp_path / "w.yaml", {"model.conv_in": 8, "model.conv_out": 3, "model.x": 6})
    with pytest.raises(MixDQError, match=r"model\.conv_out: 3.*model\.x: 6.*2, 4, 8"):
        BitPlan.from_mixdq(bad)
    with pytest.raises(MixDQError, match="activation map.*16"):
        BitPlan.from_mixdq({"model.conv_in": 8}, {"model.conv_in": 16})


def test_unreadable_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(MixDQError, match="No MixDQ weight file"):
        BitPlan.from_mixdq(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MixDQError, match="mapping of layer names"):
        BitPlan.from_mixdq(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(MixDQError, match="not valid YAML"):
        BitPlan.from_mixdq(tmp_path / "broken.yaml")


def test_export_refuses_float8_and_leaves_fp_layers_out():
    unet = make_unet()
    names = list(layer_table(unet))
    plan = BitPlan(defaults={"weights": "int8", "activations": "none"},
                   layers={names[0]: {"weights": "none", "activations": "none"}})
    weights, acts = plan.to_mixdq(model=unet)
    assert f"model.{names[0]}" not in weights and len(weights) == len(names) - 1 and acts == {}
    with pytest.raises(MixDQError, match="float8"):
        BitPlan(defaults={"weights": "float8", "activations": "none"}).to_mixdq(model=unet)


def test_imported_plan_loads_with_from_pretrained(tmp_path):
    from diffusers import UNet2DConditionModel

    from diffusers_mixdq import MixDQConfig
    from diffusers_mixdq.apply import quantized_layers

    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    weights = {f"model.{n}": 8 for n in layer_table(unet)}
    acts = {f"model.{n}": 8 for n in list(layer_table(unet))[:3]}
    plan = BitPlan.from_mixdq(weights, acts)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet", quantization_config=MixDQConfig(plan=plan))
    held = quantized_layers(loaded)
    assert all(w == "int8" for w, _ in held.values())
    assert sum(a == "int8" for _, a in held.values()) == 3
    assert json.loads(plan.to_json())["provenance"]["tool"] == "mixdq import"


def test_cli_import_checks_against_the_model_and_export_round_trips(tmp_path):
    from typer.testing import CliRunner

    from diffusers_mixdq.cli import app

    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    weights, acts = _maps_for(unet, seed=5)
    w_file, a_file = _write_yaml(tmp_path / "w.yaml", weights), _write_yaml(tmp_path / "a.yaml", acts)
    run = CliRunner().invoke
    result = run(app, ["import", "mixdq", "--weights", str(w_file), "--acts", str(a_file), "--out",
                       str(tmp_path / "plan"), "--base", str(tmp_path / "unet")])
    assert result.exit_code == 0, result.output
    plan = BitPlan.load(tmp_path / "plan")
    assert plan.is_resolved and plan.target["fingerprint"].startswith("sha256:")
    result = run(app, ["export", "mixdq", str(tmp_path / "plan"), "--weights", str(tmp_path / "w2.yaml"),
                       "--acts", str(tmp_path / "a2.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w2.yaml").read_text() == "".join(f"{k}: {v}\n" for k, v in sorted(weights.items()))
    assert BitPlan.from_mixdq(tmp_path / "w2.yaml", tmp_path / "a2.yaml").to_mixdq() == (weights, acts)

    typo = dict(weights, **{"model.down_blocks.9.conv": 8})
    result = run(app, ["import", "mixdq", "--weights", str(_write_yaml(tmp_path / "t.yaml", typo)), "--out",
                       str(tmp_path / "bad"), "--base", str(tmp_path / "unet")])
    assert result.exit_code == 2 and "down_blocks.9.conv" in result.output
    assert not (tmp_path / "bad").exists()


def test_full_size_sdxl_map_gives_all_794_layers_their_widths():
    """A map over every layer of the SDXL UNet (real config, built on the meta device: the layout MixDQ's
    SDXL-Turbo plans cover) resolves layer for layer, and averages what the maps say."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads((Path(__file__).parents[1] / "benchmarks/configs/sdxl-base-unet.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    table = layer_table(unet)
    weights, acts = _maps_for(unet, seed=11)
    specs = BitPlan.from_mixdq(weights, acts).resolve(unet).layer_specs()
    assert len(specs) == len(table) == 794
    assert all(specs[n].weights == f"int{weights['model.' + n]}" for n in table)
    expected_bits = sum(weights["model." + n] * i.numel for n, i in table.items()) / sum(i.numel for i in table.values())
    assert BitPlan.from_mixdq(weights, acts).resolve(unet).summary().avg_weight_bits == pytest.approx(expected_bits)


def test_keep_fp_list_keeps_layers_fully_fp_and_export_gives_the_files_back(tmp_path):
    """MixDQ's W*A8 runs keep an "act protect" list (a saved list of names) fully in FP, weights included; the
    weight map still gives those layers widths, which export writes back so the files round-trip byte for byte."""
    unet = make_unet()
    names = list(layer_table(unet))
    weights, acts = _maps_for(unet, seed=7)  # acts leave out the first and last layer ...
    protect = [f"model.{names[-1]}", f"model.{names[0]}"]  # ... which the protect list names (MixDQ's order)
    torch.save(protect, tmp_path / "act_sensitivie_a8_1%.pt")
    w_file = _write_yaml(tmp_path / "w.yaml", dict(sorted(weights.items())))
    a_file = _write_yaml(tmp_path / "a.yaml", dict(sorted(acts.items())))
    for keep in (tmp_path / "act_sensitivie_a8_1%.pt", _write_yaml_list(tmp_path / "p.yaml", protect), protect):
        plan = BitPlan.from_mixdq(w_file, a_file, keep_fp=keep)
        specs = plan.resolve(unet).layer_specs()
        assert {n for n, s in specs.items() if not s.is_quantized} == {names[0], names[-1]}
        assert all(specs[n].weights == f"int{weights['model.' + n]}" for n in names[1:-1])
        assert plan.provenance["keep_fp"][names[0]] == {"weights": weights[f"model.{names[0]}"], "activations": None}
    assert plan.to_mixdq() == ({k: v for k, v in weights.items() if k not in protect}, acts)  # no list: FP is FP
    again = BitPlan.from_json(plan.resolve(unet).to_json())
    again.to_mixdq(weights=tmp_path / "w2.yaml", activations=tmp_path / "a2.yaml", keep_fp=tmp_path / "p2.yaml")
    assert (tmp_path / "w2.yaml").read_bytes() == w_file.read_bytes()
    assert (tmp_path / "a2.yaml").read_bytes() == a_file.read_bytes()
    assert yaml.safe_load((tmp_path / "p2.yaml").read_text()) == sorted(protect)


def _write_yaml_list(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"- {n}\n" for n in names))
    return path


def test_unreadable_keep_fp_lists_raise_one_clear_error(tmp_path):
    weights = {"model.conv_in": 8}
    torch.save({"a": torch.zeros(2)}, tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "map.yaml").write_text("model.conv_in: 8\n")
    for path, match in (("dict.pt", "list of layer names"), ("junk.pt", "Could not read the MixDQ keep-FP"),
                        ("map.yaml", "list of layer names"), ("missing.pt", "No MixDQ keep-FP file")):
        with pytest.raises(MixDQError, match=match):
            BitPlan.from_mixdq(weights, keep_fp=tmp_path / path)


def test_cli_import_keep_fp_provenance_and_base_model_then_export_round_trips(tmp_path):
    from typer.testing import CliRunner

    from diffusers_mixdq.cli import app

    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    names = list(layer_table(unet))
    weights, acts = _maps_for(unet, seed=9)
    w_file = _write_yaml(tmp_path / "w.yaml", dict(sorted(weights.items())))
    a_file = _write_yaml(tmp_path / "a.yaml", dict(sorted(acts.items())))
    keep = _write_yaml_list(tmp_path / "keep.yaml", [f"model.{names[0]}"])
    run = CliRunner().invoke
    result = run(app, ["import", "mixdq", "--weights", str(w_file), "--acts", str(a_file), "--keep-fp", str(keep),
                       "--out", str(tmp_path / "plan"), "--base", str(tmp_path / "unet"), "--base-model", "me/tiny",
                       "--provenance", "commit=abc123", "--provenance", "url=https://x/y?a=b"])
    assert result.exit_code == 0, result.output
    plan = BitPlan.load(tmp_path / "plan")
    assert plan.target["base_model"] == "me/tiny" and plan.provenance["commit"] == "abc123"
    assert plan.provenance["url"] == "https://x/y?a=b" and plan.provenance["keep_fp_file"] == "keep.yaml"
    assert not plan.layer_specs()[names[0]].is_quantized
    result = run(app, ["export", "mixdq", str(tmp_path / "plan"), "--weights", str(tmp_path / "w2.yaml"), "--acts",
                       str(tmp_path / "a2.yaml"), "--keep-fp", str(tmp_path / "k2.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w2.yaml").read_bytes() == w_file.read_bytes()
    assert (tmp_path / "a2.yaml").read_bytes() == a_file.read_bytes()
    assert (tmp_path / "k2.yaml").read_text() == keep.read_text()
    result = run(app, ["import", "mixdq", "--weights", str(w_file), "--out", str(tmp_path / "bad"),
                       "--provenance", "no-equals-sign"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output and not (tmp_path / "bad").exists()
