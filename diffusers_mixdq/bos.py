"""BOS-aware quantization of the text-embedding path (MixDQ's first contribution).

In CLIP text embeddings token 0 (BOS) is a large outlier, which ruins a per-tensor activation scale for the
cross-attention K/V projections that read the text encoder's hidden states. CLIP's text transformer is causal, so
the BOS hidden state is the same for every prompt: the K/V output row for it can be computed once, in full
precision, and only tokens 1..n go through the quantized path.

This module finds and checks that hidden state (:func:`check_bos_invariance`, :func:`bos_hidden_state`), attaches
it to a plan (:func:`attach_bos`), and checks that a pipeline's text encoder matches a quantized denoiser
(:func:`verify_text_encoder`). The per-layer rows themselves are computed when the plan is applied, from the
layer's original full-precision weights, and are saved inside pre-quantized checkpoints.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import MixDQError
from .families import denoiser_of
from .plan import BOS_DEFAULT_PATTERNS as DEFAULT_PATTERNS  # noqa: F401  (re-exported)
from .plan import BOS_MATCH_TOLERANCE as MATCH_TOLERANCE
from .plan import BOS_STATE_KEY as STATE_KEY
from .plan import BitPlan, check_tensors, state_sha256  # noqa: F401  (state_sha256 re-exported)

PROBE_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "",
    "a red circle",
    "an oil painting of a lighthouse at dusk, dramatic clouds, highly detailed",
    "0 1 2 3",
)


class NonCausalEncoderError(MixDQError):
    """The text encoder's token-0 state depends on the prompt, so BOS rows cannot be precomputed."""


def _token0_states(encode, prompts: Sequence[str]) -> torch.Tensor:
    states = []
    with torch.no_grad():
        for p in prompts:
            states.append(encode(p)[0, 0].float().cpu())
    return torch.stack(states)


def _check_invariant(states: torch.Tensor, what: str) -> torch.Tensor:
    scale = states.abs().max().clamp_min(1e-6)
    spread = (states - states[0]).abs().max()
    if spread > 1e-4 * scale:
        raise NonCausalEncoderError(
            f"{what}: its token-0 hidden state changes with the prompt (max abs difference {spread:.3g}, "
            f"{spread / scale:.1%} of its magnitude), so the encoder is not causal (e.g. T5 or a BERT-style "
            "encoder) and BOS rows cannot be precomputed. Turn BOS-aware quantization off for this model "
            "(flags: {\"bos_aware\": false}) or use a causal CLIP text encoder."
        )
    return states[0]


def check_bos_invariance(text_encoder, tokenizer, prompts: Sequence[str] = PROBE_PROMPTS) -> torch.Tensor:
    """Show that ``text_encoder``'s token-0 state does not depend on the prompt and return it.

    Encodes several different prompts (different lengths, the empty one included) and compares their token-0
    hidden states (``last_hidden_state``). Raises :class:`NonCausalEncoderError` for a bidirectional encoder.
    """
    device = next(text_encoder.parameters()).device
    max_length = prompt_length(text_encoder, tokenizer)

    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return text_encoder(ids)[0]

    return _check_invariant(_token0_states(encode, prompts), type(text_encoder).__name__)


#: transformers' placeholder ``model_max_length`` of tokenizers that do not know theirs (int(1e30))
_NO_MAX_LENGTH = 10**20


def prompt_length(text_encoder, tokenizer) -> int:
    """The padded prompt length: the tokenizer's ``model_max_length``, else (missing, or transformers' huge
    placeholder) the text encoder's ``max_position_embeddings``."""
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and not isinstance(length, bool) and 0 < length < _NO_MAX_LENGTH:
        return length
    config = getattr(text_encoder, "config", None)
    fallback = getattr(config, "max_position_embeddings", None)
    if fallback is None:
        fallback = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    if not isinstance(fallback, int) or fallback <= 0:
        raise MixDQError(
            f"The tokenizer has no usable model_max_length ({length!r}) and the text encoder's config has no "
            "max_position_embeddings, so the prompt length is unknown. Set tokenizer.model_max_length to the "
            "encoder's context length (77 for CLIP)."
        )
    return fallback


def bos_hidden_state(pipe, prompts: Sequence[str] = PROBE_PROMPTS) -> torch.Tensor:
    """The token-0 row of the embeddings ``pipe`` feeds its denoiser (``pipe.encode_prompt``), checked to be the
    same for several prompts. Works whatever the pipeline does to the encoder output (clip skip, SDXL's two
    concatenated encoders)."""
    if not hasattr(pipe, "encode_prompt"):
        raise MixDQError(f"{type(pipe).__name__} has no encode_prompt(); pass its text encoder and tokenizer to "
                         "check_bos_invariance() instead.")

    def encode(prompt: str) -> torch.Tensor:
        out = pipe.encode_prompt(_fit(prompt, getattr(pipe, "tokenizer", None)), device=pipe.device,
                                 num_images_per_prompt=1, do_classifier_free_guidance=False)
        return out[0]

    return _check_invariant(_token0_states(encode, prompts), f"The text encoder of {type(pipe).__name__}")


def _fit(prompt: str, tokenizer) -> str:
    """``prompt`` cut to what the tokenizer keeps, so probing a short-context encoder warns about no truncation
    (silencing transformers' warning instead would also hide it for the user's own long prompts)."""
    if tokenizer is None or not getattr(tokenizer, "model_max_length", None):
        return prompt
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def attach_bos(plan: BitPlan, state: torch.Tensor, text_encoder: str | None = None) -> BitPlan:
    """A copy of ``plan`` carrying the BOS hidden state ``state``: its cross-attention K/V layers become
    BOS-aware by default when the plan is applied."""
    state = state.detach().to(torch.float32).cpu().reshape(-1)
    check_tensors({"bos": {"sha256": state_sha256(state), "dim": state.numel()}}, {STATE_KEY: state})
    new = plan.copy()
    new.tensors[STATE_KEY] = state
    new.target["bos"] = {
        "sha256": state_sha256(state),
        "dim": int(state.numel()),
        "text_encoder": text_encoder,
        "norm": float(state.norm()),
    }
    new.validate()
    return new


def bos_layers(model) -> dict[str, Any]:
    """The BOS-aware modules of a quantized model, by name."""
    return {n: m for n, m in model.named_modules() if getattr(m, "bos_aware", False)}


def verify_text_encoder(pipe, denoiser: str | None = None) -> None:
    """Raise :class:`MixDQError` when the pipeline's text encoder does not give the BOS state the denoiser's
    BOS rows were computed for (e.g. a quantized UNet paired with another model's text encoder)."""
    try:
        name, model = denoiser_of(pipe, denoiser)
    except MixDQError:
        if denoiser:
            raise
        return  # no denoiser, so no BOS rows to check
    layers = bos_layers(model)
    if not layers:
        return
    expected = next(iter(layers.values())).bos_input.detach().float().cpu()
    try:
        actual = bos_hidden_state(pipe)
    except NonCausalEncoderError as e:
        raise MixDQError(
            f"The {name} has BOS-aware layers, but this pipeline's text encoder is not causal: {e}"
        ) from None
    if actual.shape != expected.shape:
        raise MixDQError(
            f"The pipeline's text encoder gives {actual.numel()}-dim embeddings, but the {name}'s BOS rows were "
            f"computed for {expected.numel()}-dim ones. Use the text encoder the plan was built with."
        )
    rel = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
    if rel > MATCH_TOLERANCE:
        raise MixDQError(
            f"This pipeline's text encoder does not match the one the {name}'s BOS rows were computed for: its "
            f"BOS hidden state differs by {rel:.1%} (tolerance {MATCH_TOLERANCE:.0%}). Load the pipeline with "
            "the text encoder of the model the plan was built for, or rebuild the plan for this one."
        )
