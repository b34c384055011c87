"""Builds that take their weight sensitivities from files (MixDQ's published logs, an earlier build's score cache)
instead of measuring them (issue #19)."""

from __future__ import annotations

import json

import pytest
from test_build import SETTINGS, pipe  # noqa: F401  (the same tiny pipeline and settings as the builder tests)

from diffusers_mixdq import MixDQError
from diffusers_mixdq.builder import BuildSettings, build_plan, load_recipe
from diffusers_mixdq.builder.sensitivity import layer_group
from diffusers_mixdq.plan import layer_table



def _log(pipe, fragile: str) -> dict[str, list[float]]:
    """A MixDQ-layout log (``model.<layer>: [s2, s4, s8]``): every layer robust except ``fragile``."""
    out = {}
    for name in layer_table(pipe.unet):
        if layer_group(name) == "content":
            scores = [0.2, 0.3, 0.99] if name == fragile else [0.98, 0.995, 0.999]
        else:
            scores = [-20.0, -10.0, 45.0] if name == fragile else [20.0, 32.0, 45.0]
        out[f"model.{name}"] = scores
    return out


def _write(path, log: dict) -> str:
    path.write_text("".join(f"{k}:\n" + "".join(f"- {v}\n" for v in vals) for k, vals in log.items()))
    return str(path)


def test_build_on_published_scores_measures_nothing_and_follows_them(pipe, tmp_path):
    names = list(layer_table(pipe.unet))
    fragile = next(n for n in names if layer_group(n) == "content")
    files = [{"path": _write(tmp_path / "sensitivity.yaml", _log(pipe, fragile)), "widths": [2, 4, 8]}]
    # refine off: it judges whole plans by measured images and would (rightly) overrule this test's made-up scores
    s = BuildSettings(**SETTINGS, weight_bits=4.0, split_ratios=(1.0,), sensitivity_files=files, refine_evaluations=0)
    plan, report = build_plan(pipe, s, progress=False)
    assert report.sample_evaluations.get("sensitivity", 0) == 0  # nothing measured: every score was given
    specs = plan.layer_specs()
    assert specs[fragile].weights == "int8"  # the one layer the log says breaks below 8 bits
    assert plan.summary().avg_weight_bits <= 4.0 + 1e-9
    record = plan.provenance["sensitivity_files"]
    assert record[0]["file"] == "sensitivity.yaml" and len(record[0]["sha256"]) == 64
    assert str(tmp_path) not in json.dumps(plan.provenance)  # names and hashes travel, never local paths


def test_an_earlier_builds_score_cache_is_read_too(pipe, tmp_path):
    names = list(layer_table(pipe.unet))
    fragile = [n for n in names if layer_group(n) == "content"][-1]  # content layers can trade 2 bits for 8
    log = _log(pipe, fragile)
    cache = {f"{k[len('model.'):]}|{w}": v for k, vals in log.items() for w, v in zip((2, 4, 8), vals)}
    (tmp_path / "sensitivity-earlier.json").write_text(json.dumps(cache))
    s = BuildSettings(**SETTINGS, weight_bits=4.0, split_ratios=(1.0,), refine_evaluations=0,  # (as above)
                      sensitivity_files=[{"path": str(tmp_path / "sensitivity-earlier.json")}])
    plan, report = build_plan(pipe, s, progress=False)
    assert report.sample_evaluations.get("sensitivity", 0) == 0
    assert plan.layer_specs()[fragile].weights == "int8"


def test_files_for_another_model_or_layout_are_one_clear_error(pipe, tmp_path):
    bad_layer = _write(tmp_path / "other.yaml", {"model.down_blocks.9.conv": [0.1, 0.2, 0.3]})
    with pytest.raises(MixDQError, match=r"down_blocks\.9\.conv.*prefix"):
        build_plan(pipe, BuildSettings(**SETTINGS, sensitivity_files=[{"path": bad_layer}]), progress=False)
    name = next(iter(layer_table(pipe.unet)))
    short = _write(tmp_path / "short.yaml", {f"model.{name}": [0.1, 0.2]})
    with pytest.raises(MixDQError, match="one number per width"):
        build_plan(pipe, BuildSettings(**SETTINGS, sensitivity_files=[{"path": short}]), progress=False)
    with pytest.raises(MixDQError, match="No sensitivity file"):
        build_plan(pipe, BuildSettings(**SETTINGS, sensitivity_files=[{"path": str(tmp_path / "nope.yaml")}]),
                   progress=False)
    with pytest.raises(MixDQError, match="sensitivity_files"):
        BuildSettings(**SETTINGS, sensitivity_files=[{"file": "x.yaml"}]).validate()


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "w.yaml").write_text("model.conv_in:\n- 1.0\n- 2.0\n- 3.0\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: some/pipe\nprompts: [a red circle]\nweights: {budget_bits: 4.0}\n"
                      "sensitivity_files: [{path: logs/w.yaml}]\n")
    settings = load_recipe(recipe).settings()
    assert settings.sensitivity_files[0]["path"] == str(tmp_path / "logs" / "w.yaml")
    assert settings.sensitivity_files[0]["widths"] == [2, 4, 8]
