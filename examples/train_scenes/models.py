"""Component builders for the ``scenes`` demo pipeline (training-time only).

All components are stock diffusers / transformers classes with small
configs, so the result is an ordinary ``PixArtSigmaPipeline``:

* tokenizer: a word-level ``tokenizers`` model (one token per caption word,
  ``</s>`` appended, ``<pad>`` = id 0) saved as a ``PreTrainedTokenizerFast``;
* text encoder: a 2-layer, 64-wide ``T5EncoderModel``;
* transformer: a ``PixArtTransformer2DModel`` (adaLN-single DiT with
  cross-attention) on 8x8x4 latents, patch size 1 (64 tokens);
* VAE: ``AutoencoderKL`` 32x32x3 <-> 8x8x4 (same layout as the shapes model's,
  trained on two-object scenes because the shapes VAE reconstructs them badly);
* scheduler: DPM-Solver++(2M) with SD-1.x ``scaled_linear`` betas, epsilon prediction.
"""

from __future__ import annotations

import json
import os

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from tokenizers import Tokenizer, models as tok_models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from diffusers_mixdq.demo.scenes_data import CAPTION_WORDS, COLOUR_NAMES, IMAGE_SIZE, SHAPES

#: Longest caption is 10 words + ``</s>``; pad to 16.
MAX_SEQUENCE_LENGTH = 16
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 4
LATENT_SIZE = IMAGE_SIZE // VAE_DOWNSAMPLE

SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
)
PREDICTION_TYPE = "epsilon"


#: Words that end a relation phrase; the object named after them is the caption's second object.
_RELATION_ENDS = ("of", "above", "below")
#: Prefix of the role-2 variant of a colour or shape word (``_red``, ``_square``).
ROLE2_PREFIX = "_"


def role2_rules():
    """Literal (pattern, replacement) rules that mark the second object's colour and shape words.

    ``"a red circle to the left of a blue square"`` -> ``"a red circle to the left of a _blue _square"``.
    """
    rules = []
    for end in _RELATION_ENDS:
        for c in COLOUR_NAMES:
            rules.append((f"{end} a {c} ", f"{end} a {ROLE2_PREFIX}{c} "))
    for c in COLOUR_NAMES:
        for s in SHAPES:
            rules.append((f"{ROLE2_PREFIX}{c} {s}", f"{ROLE2_PREFIX}{c} {ROLE2_PREFIX}{s}"))
    return rules


def build_tokenizer(directory: str, role_tokens: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`CAPTION_WORDS`, saved to ``directory``.

    With ``role_tokens`` the tokenizer's normalizer (literal replacements stored in
    ``tokenizer.json``) rewrites the second object's colour and shape words to
    role-2 variants with their own ids (appended after the plain vocabulary, so
    the plain words keep their ids).  T5 has no absolute positions, and without
    this the model never learned which object is named first (relation accuracy
    stayed at chance, see the model card).
    """
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in CAPTION_WORDS:
        vocab[w] = len(vocab)
    if role_tokens:
        for w in COLOUR_NAMES + SHAPES:
            vocab[ROLE2_PREFIX + w] = len(vocab)
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    if role_tokens:
        tok.normalizer = normalizers.Sequence([normalizers.Replace(a, b) for a, b in role2_rules()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH, padding_side="right",
    )  # fmt: skip
    fast.save_pretrained(directory)
    fix_tokenizer_class(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def fix_tokenizer_class(directory: str) -> None:
    """Record the portable class name ``PreTrainedTokenizerFast`` (transformers 5 writes ``TokenizersBackend``)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def build_text_encoder(vocab_size: int, d_model: int = 64, layers: int = 2) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=4 * d_model,
        num_layers=layers,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def build_vae() -> AutoencoderKL:
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


def build_transformer(caption_channels: int = 64, width: int = 128, depth: int = 6, heads: int = 4,
                      patch_size: int = 1) -> PixArtTransformer2DModel:  # fmt: skip
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=depth,
        cross_attention_dim=width,
        sample_size=LATENT_SIZE,
        patch_size=patch_size,
        norm_num_groups=32,
        caption_channels=caption_channels,
        interpolation_scale=1,
        use_additional_conditions=False,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, prediction_type=PREDICTION_TYPE)


def build_sample_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        **SCHEDULE, prediction_type=PREDICTION_TYPE,
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
    )  # fmt: skip
