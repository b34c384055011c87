"""Shared fixtures: tiny diffusers models with random weights, saved to real directories."""

from __future__ import annotations

import json
import string
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import diffusers_mixdq  # noqa: F401  (registers the backend)

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

#: one resolution level, no mid block: the smallest UNet that still has every kind of layer
SMALLEST_UNET = dict(
    block_out_channels=(32,),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    mid_block_type=None,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

TINY_PIXART = dict(
    sample_size=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=16,
    caption_channels=24,
    patch_size=2,
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    use_additional_conditions=False,
)


def make_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def make_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**TINY_PIXART).eval()


def unet_inputs(seed: int = 1, batch: int = 2, seq: int = 7, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        torch.randn(batch, seq, dim, generator=g),
    )


def pixart_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
        timestep=torch.tensor([10, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@contextmanager
def cpu_int8_gemm(enabled: bool):
    """The native backend's CPU int8 GEMM (``torch._int_mm`` for W8A8 layers) forced on / off in the block."""
    from diffusers_mixdq.apply.backends.native import real_gemm

    previous = real_gemm.use_cpu_int8_gemm(enabled)
    try:
        yield
    finally:
        real_gemm.use_cpu_int8_gemm(previous)


def write_tiny_clip_tokenizer(directory: Path) -> None:
    """A character-level CLIP tokenizer (vocab.json + merges.txt), built here because nothing can be downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over 10 s; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet")
    make_unet().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def unet_fp16_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet16")
    make_unet().half().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pixart_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pixart")
    make_pixart().save_pretrained(path)
    return path


def make_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline: random UNet, VAE and causal CLIP text encoder, char-level tokenizer."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = make_unet(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tiny_clip_tokenizer(Path(tok_dir))
        tokenizer = CLIPTokenizer(
            str(Path(tok_dir) / "vocab.json"), str(Path(tok_dir) / "merges.txt"), model_max_length=16
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe")
    make_pipeline().save_pretrained(path)
    return path


def dir_snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
