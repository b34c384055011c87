"""The startup file ``diffusers_mixdq_startup.pth``: a saved MixDQ text encoder loads quantized in a program that
never imports diffusers_mixdq (without the file transformers would fill it with random weights, warning only),
and the wheel, the editable wheel and the sdist carry the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from test_transformers_backend import IDS, W8, encode, make_text_encoder

from diffusers_mixdq import MixDQConfig

ROOT = Path(__file__).resolve().parents[1]
PTH = "diffusers_mixdq_startup.pth"


def load_in_a_fresh_process(model_dir: Path, site_dir: Path | None, opt_out: bool = False) -> str:
    """Load ``model_dir`` with plain transformers in a new interpreter; ``site_dir``: a site directory processed
    the way Python processes site-packages at startup (``site.addsitedir``), holding the startup file. The
    interpreter starts with the opt-out set, so an installed startup file does not act before ``site_dir``."""
    code = textwrap.dedent(f"""
        import os, site, sys
        assert "diffusers_mixdq" not in sys.modules
        if not {opt_out!r}:
            del os.environ["DIFFUSERS_MIXDQ_NO_AUTOLOAD"]
        if {str(site_dir) if site_dir else ""!r}:
            site.addsitedir({str(site_dir)!r})
        import torch
        from transformers import CLIPTextModel
        model = CLIPTextModel.from_pretrained({str(model_dir)!r})
        layer = model.get_submodule("encoder.layers.0.mlp.fc1")
        with torch.no_grad():
            out = model(torch.tensor({IDS.tolist()!r})).last_hidden_state
        torch.save(out, {str(model_dir / "out.pt")!r})
        print(type(layer).__module__)
    """)
    env = {**os.environ, "DIFFUSERS_MIXDQ_NO_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup")
    model = make_text_encoder("clip")
    model.save_pretrained(path / "fp")
    quantized = type(model).from_pretrained(path / "fp", quantization_config=MixDQConfig(plan=W8))
    quantized.save_pretrained(path / "q")
    return path / "q", encode(quantized, IDS)


@pytest.mark.slow
def test_saved_text_encoder_loads_without_importing_diffusers_mixdq(saved_encoder, tmp_path):
    model_dir, expected = saved_encoder
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(ROOT / PTH, site_dir / PTH)
    assert load_in_a_fresh_process(model_dir, site_dir).startswith("diffusers_mixdq.")
    assert torch.equal(torch.load(model_dir / "out.pt"), expected)

    # what the file prevents: plain transformers skips the unknown quant_method and loads random weights
    assert load_in_a_fresh_process(model_dir, None) == "torch.nn.modules.linear"
    assert not torch.equal(torch.load(model_dir / "out.pt"), expected)
    # and the opt-out
    assert load_in_a_fresh_process(model_dir, site_dir, opt_out=True) == "torch.nn.modules.linear"


@pytest.mark.slow
def test_wheel_editable_wheel_and_sdist_carry_the_startup_file(tmp_path):
    """Built from a copy of the packaging files with a one-line package (the file's packaging, not the package's)."""
    project = tmp_path / "project"
    (project / "diffusers_mixdq").mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", PTH):
        shutil.copy(ROOT / name, project / name)
    (project / "diffusers_mixdq" / "__init__.py").write_text("")
    out = tmp_path / "out"
    code = ("from setuptools import build_meta as b; import sys; d = sys.argv[1]; "
            "print(b.build_wheel(d)); print(b.build_editable(d)); print(b.build_sdist(d))")
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    built_names = [line for line in result.stdout.splitlines() if line.endswith((".whl", ".tar.gz"))]
    wheel, editable, sdist = (out / name for name in built_names[-3:])
    for built in (wheel, editable):
        with zipfile.ZipFile(built) as z:
            assert z.read(PTH) == (ROOT / PTH).read_bytes()
            record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
            assert f"{PTH}," in record
    with tarfile.open(sdist) as t:
        assert any(n.endswith(f"/{PTH}") for n in t.getnames())
