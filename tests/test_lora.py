"""LoRA on a MixDQ-quantized denoiser: load, set_adapters, unload work; fusing is refused with a MixDQError."""

from __future__ import annotations

import pytest
import torch

import diffusers_mixdq  # noqa: F401  (registers the backend)
from diffusers_mixdq import MixDQConfig, MixDQError
from diffusers_mixdq.apply.qmodule import is_mixdq_module

peft = pytest.importorskip("peft")

W8 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8", "activations": "none"}}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A small LoRA for the test pipeline's UNet, made with peft (non-zero B, so it changes the output)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from conftest import make_pipeline

    unet = make_pipeline().unet
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    return path


def run(pipe):
    out = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


def test_lora_on_a_quantized_unet(pipeline_dir, lora_dir):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline_dir, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=W8)}))
    base = run(pipe)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    wrapped = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert wrapped and all(is_mixdq_module(m.get_base_layer()) for m in wrapped)
    assert all(p.dtype == torch.float32 for m in wrapped for p in m.lora_A.parameters())  # LoRA in floating point
    with_lora = run(pipe)
    assert (with_lora - base).abs().max() > 1e-3

    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.allclose(run(pipe), base, atol=1e-6)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert torch.allclose(run(pipe), with_lora, atol=1e-6)

    with pytest.raises(MixDQError, match="fuse_lora is not supported"):
        pipe.fuse_lora()
    assert torch.allclose(run(pipe), with_lora, atol=1e-6)  # nothing was changed

    pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert torch.allclose(run(pipe), base, atol=1e-6)
