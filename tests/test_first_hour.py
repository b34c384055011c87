"""Issue #18, "the first hour of a new user": each thing that got in the way, checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


# --- mixdq --help without torch / diffusers; import diffusers_mixdq still registers --------------------------------


def test_help_imports_neither_torch_nor_diffusers():
    r = _python(
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from diffusers_mixdq.cli import app\n"
        "for args in ([], ['--help'], ['build', '--help'], ['inspect', '--help'], ['eval', '--help']):\n"
        "    out = CliRunner().invoke(app, args)\n"
        "    assert 'Usage' in out.output, out.output\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


def test_plain_import_registers_with_diffusers():
    r = _python(
        "import sys, diffusers_mixdq\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "from diffusers_mixdq.plan import sources\n"
        "print(AUTO_QUANTIZER_MAPPING['mixdq'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['mixdq'].__name__,\n"
        "      [r.__name__ for r in sources._RESOLVERS])\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["MixDQQuantizer", "MixDQConfig", "['hub_plan_source']"]


@pytest.mark.parametrize("first", [
    "from diffusers_mixdq import MixDQConfig",
    "from diffusers_mixdq.apply.quantizer import MixDQQuantizer",
    "from diffusers import DiffusionPipeline; import diffusers_mixdq",
    "import diffusers_mixdq.hub",
    "from diffusers_mixdq import BitPlan",
    "from diffusers_mixdq.registry import WEIGHT_BACKENDS",
])
def test_registration_whatever_is_imported_first(first):
    """diffusers' tables, the Hub plan source and the weight backends (which plan sizes need) are registered
    whichever part of the package is imported first, as they were when ``import diffusers_mixdq`` imported all."""
    r = _python(
        f"{first}\n"
        "from diffusers_mixdq.registry import WEIGHT_BACKENDS\n"
        "print(type(WEIGHT_BACKENDS.get('quanto')).__name__)\n"
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "from diffusers_mixdq.plan import sources\n"
        "print(AUTO_QUANTIZER_MAPPING['mixdq'].__name__, len(sources._RESOLVERS))\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["QuantoBackend", "MixDQQuantizer", "1"]


def test_lazy_public_names():
    import diffusers_mixdq
    from diffusers_mixdq.config import MixDQConfig
    from diffusers_mixdq.plan import BitPlan

    assert diffusers_mixdq.MixDQConfig is MixDQConfig and diffusers_mixdq.BitPlan is BitPlan
    assert {"MixDQConfig", "BitPlan", "LayerSpec", "PlanSummary"} <= set(dir(diffusers_mixdq))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_mixdq.nope  # noqa: B018


# --- plans in component folders: mixdq inspect / build output ----------------------------------------------------


def _save(plan, path):
    return plan.save(path)


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def unet_plan():
    from conftest import make_unet

    from diffusers_mixdq import BitPlan

    return BitPlan.uniform("int8").resolve(make_unet())


def test_inspect_finds_the_only_component_folder(tmp_path, unet_plan):
    from typer.testing import CliRunner

    from diffusers_mixdq.cli import app

    _save(unet_plan, tmp_path / "repo" / "unet")
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "repo")])
    assert shown.exit_code == 0, shown.output
    assert "the plan of its only component folder, unet/" in _flat(shown.output) and "int8: 83" in shown.output
    explicit = CliRunner().invoke(app, ["inspect", str(tmp_path / "repo"), "--subfolder", "unet"])
    assert explicit.exit_code == 0, explicit.output
    assert "int8: 83" in explicit.output and "only component folder" not in explicit.output


def test_inspect_names_the_component_folders_when_there_are_several(tmp_path, unet_plan):
    from typer.testing import CliRunner

    from diffusers_mixdq.cli import app

    _save(unet_plan, tmp_path / "repo" / "unet")
    _save(unet_plan, tmp_path / "repo" / "transformer")
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "repo")])
    assert shown.exit_code == 2
    assert "several components (transformer, unet)" in _flat(shown.output) and "--subfolder" in shown.output
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "repo"), "--subfolder", "text_encoder"])
    assert missing.exit_code == 2
    assert "no text_encoder/plan.json; it has plans in: transformer, unet" in _flat(missing.output)


# --- mixdq build: its output loads, progress, honest counts on a cached rerun, threads -----------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, pipeline_dir):
    """``mixdq build`` run twice on one recipe (the second run takes everything from its cache): (out, outputs)."""
    import os

    import torch
    import yaml
    from typer.testing import CliRunner

    from diffusers_mixdq.cli import app

    tmp = tmp_path_factory.mktemp("built")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "pipeline": str(pipeline_dir), "prompts": ["a red circle", "a blue square"], "steps": 2, "guidance": 3.0,
        "resolution": 32, "weights": {"budget_bits": 6.0, "candidates": {"content": [4, 8], "quality": [4, 8]}},
        "split_ratios": [1.0], "protected": ["conv_in", "conv_out"], "description": "first-hour test",
    }))
    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    try:
        runs = [CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp / "out"), "--threads", "1"])
                for _ in range(2)]
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
    for run in runs:
        assert run.exit_code == 0, run.output
    return tmp / "out", [_flat(r.output) for r in runs]


@pytest.mark.slow
def test_build_output_is_loadable_as_printed(built):
    from diffusers_mixdq import MixDQConfig
    from diffusers_mixdq.cli import app
    from typer.testing import CliRunner

    out, (first, _) = built
    assert (out / "unet" / "plan.json").is_file()
    assert f'use it: MixDQConfig(plan="{out}", subfolder="unet")' in first
    config = MixDQConfig(plan=str(out), subfolder="unet")
    assert config.plan.is_resolved and config.plan.target["class_name"] == "UNet2DConditionModel"
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "only component folder, unet/" in _flat(shown.output)


@pytest.mark.slow
def test_build_output_is_loadable_without_subfolder(built):
    from diffusers_mixdq import MixDQConfig

    out, _ = built
    assert MixDQConfig(plan=str(out)).plan.target["class_name"] == "UNet2DConditionModel"


@pytest.mark.slow
def test_build_shows_progress_and_threads(built):
    _, (first, second) = built
    assert "torch CPU threads: 1 (--threads; change with --threads)" in first
    assert "calibration (full precision)" in first and "weights sensitivity" in first
    # (the first-step note is shown only if the bar redraws before the second step: timing, so not asserted here;
    # test_sweep_eta_leaves_out_the_first_job checks the ETA itself on a fake clock)
    assert "scores from the cache" in second  # the rerun's sweep starts complete


@pytest.mark.slow
def test_cached_rerun_counts_reused_work_honestly(built):
    import re

    from diffusers_mixdq import BitPlan

    out, (first, second) = built
    ratio = [re.search(r"\((\d+\.\d)x fewer\)", text).group(1) for text in (first, second)]
    assert ratio[0] == ratio[1]  # the method's saving, the same whether or not this run took results from its cache
    assert "taken from the cache" not in first and "taken from the cache (measured by an earlier run)" in second
    prov = BitPlan.load(out / "unet").provenance  # the rerun's
    assert prov["sample_evaluations"]["sensitivity"] == 0 and prov["sample_evaluations"]["calibrate"] == 0
    reused = prov["reused_from_cache"]["sample_evaluations"]
    assert reused["sensitivity"] > 0 and reused["calibrate"] > 0


def test_sweep_eta_leaves_out_the_first_job():
    """The first job pays one-time costs (a kernel compiled for 50 s); nine more take 0.5 s each: 152 jobs left at
    0.5 s is 01:16, where tqdm's own estimate (every job at the first ones' rate) read hours."""
    import io

    from tqdm import tqdm

    from diffusers_mixdq.builder.progress import SteadyRateBar

    def meters(cls):
        clock, out = [0.0], []
        bar = cls(total=162, file=io.StringIO(), mininterval=0, miniters=1)
        bar._time = lambda: clock[0]
        bar.start_t = bar.last_print_t = 0.0
        out.append(bar.format_meter(**bar.format_dict))
        clock[0] = 50.0
        bar.update(1)
        out.append(bar.format_meter(**bar.format_dict))
        for _ in range(9):
            clock[0] += 0.5
            bar.update(1)
        out.append(bar.format_meter(**bar.format_dict))
        bar.close()
        return out

    start, after_first, steady = meters(SteadyRateBar)
    assert "<?," in start and "<?," in after_first and "one-time setup, not in the ETA" in after_first
    assert "10/162 [00:54<01:16" in steady
    assert "10/162 [00:54<" in meters(tqdm)[2] and "<01:16" not in meters(tqdm)[2]


def test_thread_defaults(monkeypatch):
    from diffusers_mixdq.cli.app import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # accelerate launch --num_processes 2
    assert default_threads() == (2, "4 usable cores / 2 local processes")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_threads() == (4, "4 usable cores")


# --- the model card of a plan built from a local base --------------------------------------------------------------


@pytest.mark.slow
def test_card_of_a_plan_built_from_a_local_base(built, pipeline_dir):
    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.hub import plan_card

    out, _ = built
    plan = BitPlan.load(out / "unet")
    assert plan.target["base_model"] == str(pipeline_dir)  # the builder records where it came from ...
    card = plan_card({"unet": plan}, "you/shapes-mixdq")
    text = str(card)
    # ... but a local directory is no Hub base model: not in the metadata, never a huggingface.co link or path
    assert card.data.base_model is None and "base_model_relation" not in text
    assert "huggingface.co/" + str(pipeline_dir) not in text and "huggingface.co//" not in text
    body = text.split("<details>")[0]  # the readable part; the raw record is folded away below it
    assert str(pipeline_dir) not in body and f"a local pipeline directory (`{pipeline_dir.name}`)" in body
    # a table of widths, the budget, the metrics, how it was built
    specs = plan.layer_specs()
    int4 = sum(1 for s in specs.values() if s.weights == "int4")
    assert "| weights | layers | parameters | share of parameters |" in body and f"| int4 | {int4} |" in body
    assert "| budget | 6.00 average weight bits (at_most) |" in body
    assert "| sensitivity (weights) | content layers: SSIM of the images; quality layers: SQNR (dB)" in body
    assert "| recipe | recipe.yaml: first-hour test |" in body and "| weight allocation | highs: Optimal" in body
    assert "| calibration | 2 prompts" in body and "taken from its cache" in body
    assert body.count("\n") < text.count("\n") - 60  # the raw JSON record is below, in <details>
    assert "torch_dtype" not in text and "dtype=torch.float16" in text


def test_card_base_model_only_for_hub_ids(unet_plan):
    from diffusers_mixdq.hub import plan_card

    hub = unet_plan.copy()
    hub.target["base_model"] = "stabilityai/sd-turbo"
    card = plan_card({"unet": hub}, "you/r")
    assert card.data.base_model == "stabilityai/sd-turbo" and "(https://huggingface.co/stabilityai/sd-turbo)" in str(card)
    for local in ("/data/models/sd-turbo", "./sd-turbo", "models/sd/turbo", "~/sd-turbo"):
        plan = unet_plan.copy()
        plan.target["base_model"] = local
        card = plan_card({"unet": plan}, "you/r")
        assert card.data.base_model is None and "huggingface.co/" + local.lstrip("/") not in str(card), local
    # built by mixdq build from a local directory that happens to look like a repo id
    plan = unet_plan.copy()
    plan.target["base_model"] = "models/sd-turbo"
    plan.provenance = {"tool": "diffusers-mixdq build", "recipe": {"pipeline": "models/sd-turbo",
                                                                   "pipeline_is_local": True}}
    assert plan_card({"unet": plan}, "you/r").data.base_model is None


# --- warnings a user cannot act on; the error of a load without `import diffusers_mixdq` -------------------------


def test_commands_filter_the_torchvision_fallback_warning_only():
    code = (
        "import logging, sys\n"
        "{prepare}\n"
        "log = logging.getLogger('transformers.utils.import_utils')\n"
        "log.addHandler(logging.StreamHandler(sys.stdout))\n"
        "log.warning('`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`')\n"
        "log.warning('something else')\n"
    )
    plain = _python(code.format(prepare=""))
    quiet = _python(code.format(prepare="from diffusers_mixdq.cli.app import prepare_run; prepare_run(1)"))
    assert "requires torchvision" in plain.stdout and "something else" in plain.stdout
    assert "requires torchvision" not in quiet.stdout and "something else" in quiet.stdout
    assert "torch CPU threads: 1 (--threads" in quiet.stdout


def test_readme_quotes_the_error_of_a_load_without_the_import(tmp_path):
    """diffusers has no plug-in discovery for quantizers: the README names its exact error and the fix (the error a
    user meets when the startup file is missing or turned off, as here; tests/test_startup_file.py: when it acts)."""
    import re

    config = {"_class_name": "UNet2DConditionModel", "quantization_config": {"quant_method": "mixdq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = _python(f"from diffusers import UNet2DConditionModel\nUNet2DConditionModel.from_pretrained({str(tmp_path)!r})",
                DIFFUSERS_MIXDQ_NO_AUTOLOAD="1")
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("ValueError: Unknown quantization type, got mixdq - supported types are: ['"), error
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"\*\*`(ValueError: Unknown quantization type[^`]*)`\*\*", readme).group(1)
    assert error.startswith(quoted.split("...")[0]) and "import diffusers_mixdq" in readme


def test_provenance_rows_of_the_bundled_plans():
    """The shipped plans were built before the provenance had activation metrics: still readable."""
    from diffusers_mixdq import BitPlan, demo
    from diffusers_mixdq.hub.provenance import provenance_rows

    for name, path in demo.plans_in(demo.plans_dir()).items():
        plan = BitPlan.load(path)
        rows = dict(provenance_rows(plan.provenance, plan.target, public=True))
        assert rows["built with"].startswith("diffusers-mixdq"), name
        if "sensitivity_metric" in plan.provenance:
            assert "SSIM of the images" in rows["sensitivity (weights)"], name
