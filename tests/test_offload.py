"""diffusers' offloading with MixDQ-quantized components: group offloading (CPU here, CUDA where it exists), model
CPU offload on CUDA, and clear messages where the machine lacks the device."""

from __future__ import annotations

import pytest
import torch

import diffusers_mixdq  # noqa: F401  (registers the backend)
from diffusers_mixdq import MixDQError

W8 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8", "activations": "none"}}
W4 = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int4", "activations": "none"}}
CUDA = torch.cuda.is_available()


def load(pipeline_dir, plan=W8):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=PipelineQuantizationConfig(
        quant_backend="mixdq", quant_kwargs={"plan": plan}, components_to_quantize=["unet", "text_encoder"]))


def run(pipe):
    out = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("plan", [W8, W4], ids=["w8", "w4"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_of_quantized_components_on_cpu(pipeline_dir, plan, offload_type):
    from diffusers.hooks import apply_group_offloading

    pipe = load(pipeline_dir, plan)
    ref = run(pipe)
    cpu = torch.device("cpu")
    pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                                   num_blocks_per_group=1)
    apply_group_offloading(pipe.text_encoder, onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    assert torch.equal(run(pipe), ref)


@pytest.mark.skipif(CUDA, reason="checks the messages of a machine without CUDA")
def test_offloading_to_a_missing_device_is_a_clear_error(pipeline_dir):
    pipe = load(pipeline_dir)
    with pytest.raises(MixDQError, match="does not have"):
        pipe.unet.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                                       num_blocks_per_group=1)
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())  # nothing was changed
    with pytest.raises(RuntimeError, match="requires accelerator"):  # diffusers' own message
        pipe.enable_model_cpu_offload()


@pytest.mark.skipif(CUDA, reason="checks the messages of a machine without CUDA")
def test_pipeline_offloading_on_a_cpu_only_machine_changes_nothing_before_refusing(pipeline_dir):
    """A pipeline's enable_group_offload hooks its components one by one: it checks the device before the first."""
    pipe = load(pipeline_dir)
    ref = run(pipe)
    with pytest.raises(MixDQError, match="does not have"):
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_type="leaf_level")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert not any(hasattr(m, "_diffusers_hook") for m in component.modules()), name
    with pytest.raises(RuntimeError, match="requires accelerator"):  # diffusers' own message, nothing changed
        pipe.enable_sequential_cpu_offload()
    assert torch.equal(run(pipe), ref)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("plan", [W8, W4], ids=["w8", "w4"])
def test_offloading_on_cuda(pipeline_dir, plan):
    from diffusers.hooks import apply_group_offloading

    ref = run(load(pipeline_dir, plan).to("cuda"))
    pipe = load(pipeline_dir, plan)
    pipe.enable_model_cpu_offload()
    assert torch.allclose(run(pipe), ref, atol=2e-3)

    pipe = load(pipeline_dir, plan)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    pipe.unet.enable_group_offload(onload_device=cuda, offload_device=cpu, offload_type="block_level",
                                   num_blocks_per_group=1)
    apply_group_offloading(pipe.text_encoder, onload_device=cuda, offload_device=cpu, offload_type="leaf_level")
    pipe.vae.to(cuda)
    assert torch.allclose(run(pipe), ref, atol=2e-3)
