"""Component builders for the demo text-to-image pipeline (training-time only).

Everything here is plain diffusers / transformers classes with small configs,
so the trained result is an ordinary ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_mixdq.demo.data import CAPTION_WORDS, IMAGE_SIZE

#: Longest caption is 8 words (+ BOS + EOS = 10 tokens); pad everything to 16.
MODEL_MAX_LENGTH = 16
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 4  # 32x32x3 images <-> 8x8x4 latents
LATENT_SIZE = IMAGE_SIZE // VAE_DOWNSAMPLE

#: Training noise schedule (Stable Diffusion 1.x values).
SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
)
PREDICTION_TYPE = "epsilon"


# --------------------------------------------------------------------------- #
# Tokenizer: a CLIP byte-level BPE whose merges spell every caption word.
# --------------------------------------------------------------------------- #
def _bytes_to_unicode() -> List[str]:
    """CLIP/GPT-2 byte -> printable unicode table (index = byte value)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _apply_bpe(word: str, merges: List[Tuple[str, str]]) -> List[str]:
    """Reference CLIP BPE of one (ASCII) word with the given ranked merges."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = {m: i for i, m in enumerate(merges)}
    while len(parts) > 1:
        rank, i = min((ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:])))
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_vocab_and_merges(words=CAPTION_WORDS) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Build a CLIP-style BPE vocabulary in which every word in ``words`` is one token.

    The vocabulary holds the 256 byte symbols, their ``</w>`` (end-of-word)
    variants, the merged tokens and the two special tokens, so any text can
    still be tokenized (unknown words fall back to characters).  Merges are
    added word by word; because each new merge has the lowest priority, it can
    never change how an earlier word is segmented.
    """
    chars = _bytes_to_unicode()
    vocab: Dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for word in words:
        parts = _apply_bpe(word, merges)
        cur = parts[0]
        for p in parts[1:]:
            merges.append((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))
        assert _apply_bpe(word, merges) == [word + "</w>"], word
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tokenizer(directory: str) -> CLIPTokenizer:
    """Write vocab.json / merges.txt to ``directory`` and return a CLIPTokenizer.

    Padding uses ``<|endoftext|>`` up to ``MODEL_MAX_LENGTH`` like SD 1.x.
    """
    os.makedirs(directory, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=MODEL_MAX_LENGTH)
    for w in CAPTION_WORDS:  # one token per caption word
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    tok.save_pretrained(directory)  # adds tokenizer.json / tokenizer_config.json
    return tok


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 3-layer, 64-wide causal CLIP text transformer."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    """A small KL autoencoder: 32x32x3 <-> 8x8x4."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    """A ~4M-parameter 2-level cross-attention UNet on 8x8x4 latents."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=32,
    )


def build_train_scheduler() -> DDPMScheduler:
    """The DDPM noise schedule used for training."""
    return DDPMScheduler(**SCHEDULE, prediction_type=PREDICTION_TYPE)


def build_sample_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) with the training schedule, used for few-step sampling."""
    return DPMSolverMultistepScheduler(
        **SCHEDULE, prediction_type=PREDICTION_TYPE,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",  # start from t=999: better for few steps
    )
