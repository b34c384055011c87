"""The packages a MixDQ load needs follow the weight backend: without optimum-quanto, native plans load through
diffusers and transformers, and the quanto backend is refused with a MixDQError saying what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from test_transformers_backend import W8, make_text_encoder

from diffusers_mixdq import MixDQConfig

#: what "not installed" looks like to importlib.util.find_spec, the check diffusers and transformers use
#: (``is_optimum_quanto_available``): a None entry in sys.modules (an import of it fails, too)
WITHOUT_QUANTO = """
import sys
sys.modules["optimum.quanto"] = None
import importlib.util
assert importlib.util.find_spec("optimum.quanto") is None
from transformers.utils.import_utils import is_optimum_quanto_available
assert not is_optimum_quanto_available()
"""


def test_declared_packages_follow_the_backend():
    from diffusers_mixdq.apply.quantizer import MixDQQuantizer
    from diffusers_mixdq.apply.transformers_quantizer import MixDQTransformersQuantizer

    for backend, expected in (("quanto", ["optimum-quanto"]), ("native", [])):
        config = MixDQConfig(plan=W8, weight_backend=backend)
        assert MixDQQuantizer(config).required_packages == expected + ["accelerate"]
        assert MixDQTransformersQuantizer(config).required_packages == expected


@pytest.mark.slow
def test_native_plans_load_without_optimum_quanto(tmp_path, unet_dir):
    encoder = make_text_encoder("clip")
    encoder.save_pretrained(tmp_path / "fp")
    type(encoder).from_pretrained(tmp_path / "fp", quantization_config=MixDQConfig(plan=W8)).save_pretrained(
        tmp_path / "saved-with-quanto")
    code = WITHOUT_QUANTO + textwrap.dedent(f"""
        import pytest, torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        from diffusers_mixdq import MixDQConfig, MixDQError, use_weight_backend
        from diffusers_mixdq.apply.qmodule import is_mixdq_module

        plan = {W8!r}
        loads = [(UNet2DConditionModel, {str(unet_dir)!r}, "down_blocks.0.attentions.0.proj_in"),
                 (CLIPTextModel, {str(tmp_path / "fp")!r}, "encoder.layers.0.mlp.fc1")]
        for cls, path, layer in loads:
            model = cls.from_pretrained(path, quantization_config=MixDQConfig(plan=plan, weight_backend="native"))
            assert is_mixdq_module(model.get_submodule(layer)), cls
            with pytest.raises(MixDQError) as error:
                cls.from_pretrained(path, quantization_config=MixDQConfig(plan=plan, weight_backend="quanto"))
            message = str(error.value)
            assert "pip install optimum-quanto" in message and 'weight_backend="native"' in message, message
        # a model saved with the quanto backend: refused as it is, loaded into the native backend on request
        saved = {str(tmp_path / "saved-with-quanto")!r}
        with pytest.raises(MixDQError, match="pip install optimum-quanto"):
            CLIPTextModel.from_pretrained(saved)
        with use_weight_backend("native"):
            model = CLIPTextModel.from_pretrained(saved)
        with torch.no_grad():
            assert model(torch.tensor([[0, 5, 9, 1]])).last_hidden_state.isfinite().all()
        assert "optimum.quanto" not in sys.modules or sys.modules["optimum.quanto"] is None
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
