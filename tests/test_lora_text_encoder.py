"""LoRA on a MixDQ-quantized text encoder in a pipeline: the LoRA runs in floating point beside the quantized
layers, set_adapters / unfuse_lora / unload_lora_weights work, and pipe.fuse_lora() is refused with a MixDQError
before any component (a full-precision denoiser with its own LoRA included) is fused."""

from __future__ import annotations

import pytest
import torch

from diffusers_mixdq import MixDQConfig, MixDQError
from diffusers_mixdq.apply.qmodule import is_mixdq_module

peft = pytest.importorskip("peft")

W8 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8", "activations": "none"}}
IDS = torch.tensor([[0, 5, 9, 17, 3, 1]])


def text_lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                      init_lora_weights=False)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """Small LoRAs made with peft for the test pipeline's text encoder and UNet (non-zero B: they change outputs)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from conftest import make_pipeline

    pipe = make_pipeline()
    torch.manual_seed(5)
    inject_adapter_in_model(text_lora_config(), pipe.text_encoder, adapter_name="default")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    dirs = {name: tmp_path_factory.mktemp(f"lora-{name}") for name in ("text", "unet")}
    StableDiffusionPipeline.save_lora_weights(dirs["text"],
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    StableDiffusionPipeline.save_lora_weights(dirs["unet"], unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return dirs


def load_text_encoder_lora(pipe, path, adapter_name: str) -> None:
    """``pipe.load_lora_weights``; where transformers refuses the installed peft for text encoders (transformers 5
    asks for a peft release newer than the newest published one), the same three steps done with peft itself."""
    try:
        pipe.load_lora_weights(path, adapter_name=adapter_name)
        return
    except ValueError as e:
        if "version of PEFT" not in str(e):
            raise
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(path / "pytorch_lora_weights.safetensors")
    state = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    inject_adapter_in_model(text_lora_config(), pipe.text_encoder, adapter_name=adapter_name)
    assert not set_peft_model_state_dict(pipe.text_encoder, state, adapter_name=adapter_name).unexpected_keys
    pipe.text_encoder.peft_config = {adapter_name: text_lora_config()}  # what transformers' load_adapter records
    pipe.text_encoder._hf_peft_config_loaded = True


def encode(pipe):
    with torch.no_grad():
        return pipe.text_encoder(IDS).last_hidden_state


@pytest.mark.parametrize("backend", ["quanto", "native"])
def test_lora_on_a_quantized_text_encoder(pipeline_dir, lora_dirs, backend):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = PipelineQuantizationConfig(quant_mapping={"text_encoder": MixDQConfig(plan=W8, weight_backend=backend)})
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=config)
    base = encode(pipe)
    load_text_encoder_lora(pipe, lora_dirs["text"], "style")
    pipe.load_lora_weights(lora_dirs["unet"], adapter_name="unet-style")  # the full-precision UNet's own LoRA
    wrapped = [m for m in pipe.text_encoder.modules() if isinstance(m, BaseTunerLayer)]
    assert wrapped and all(is_mixdq_module(m.get_base_layer()) for m in wrapped)
    with_lora = encode(pipe)
    assert (with_lora - base).abs().max() > 1e-3

    pipe.set_adapters(["style", "unet-style"], adapter_weights=[0.0, 1.0])
    assert torch.allclose(encode(pipe), base, atol=1e-6)
    pipe.set_adapters(["style", "unet-style"], adapter_weights=[1.0, 1.0])
    assert torch.allclose(encode(pipe), with_lora, atol=1e-6)

    for components in (["text_encoder"], ["unet", "text_encoder"]):
        with pytest.raises(MixDQError, match=r"fuse_lora is not supported .*text_encoder \(CLIPTextModel\)"):
            pipe.fuse_lora(components=components)
    unet_lora = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert unet_lora and not any(m.merged for m in unet_lora + wrapped)  # nothing was fused, not even the UNet
    assert torch.allclose(encode(pipe), with_lora, atol=1e-6)
    pipe.unfuse_lora(components=["unet", "text_encoder"])  # nothing fused: a no-op, no error
    assert torch.allclose(encode(pipe), with_lora, atol=1e-6)

    pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules())
    assert torch.equal(encode(pipe), base)


def test_fuse_lora_of_full_precision_components_still_works(pipeline_dir, lora_dirs):
    """The wrapped fuse_lora leaves pipelines without MixDQ modules as they were."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(lora_dirs["unet"], adapter_name="unet-style")
    pipe.fuse_lora(components=["unet"])
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(m.merged for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer))
