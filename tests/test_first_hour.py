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
])
def test_registration_whatever_is_imported_first(first):
    r = _python(
        f"{first}\n"
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "from diffusers_mixdq.plan import sources\n"
        "print(AUTO_QUANTIZER_MAPPING['mixdq'].__name__, len(sources._RESOLVERS))\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["MixDQQuantizer", "1"]


def test_lazy_public_names():
    import diffusers_mixdq
    from diffusers_mixdq.config import MixDQConfig
    from diffusers_mixdq.plan import BitPlan

    assert diffusers_mixdq.MixDQConfig is MixDQConfig and diffusers_mixdq.BitPlan is BitPlan
    assert {"MixDQConfig", "BitPlan", "LayerSpec", "PlanSummary"} <= set(dir(diffusers_mixdq))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_mixdq.nope  # noqa: B018
