"""Text-encoder layers in a build (issue #16): which components, their sensitivities, their BOS-safe widths, their
plans. :mod:`.plan_set` allocates them with the denoiser's layers.

**What a text-encoder layer is scored by.** One text-encoder ``Linear`` at a time is quantized at a candidate width
(weights only: text-encoder plans keep activations in floating point), everything else in full precision, and the
pipeline generates the content-layer prompts with their seeds (the same ``content_fraction`` of the calibration
prompts the denoiser's content layers are scored on); the score is the content metric (SSIM of the final images,
or minus their mean per-image MSE) against the calibration run's full-precision images. A text encoder acts only
through the conditioning, i.e. on *what* the image shows, which is what the content group measures; scoring its
layers with the same metric on the same prompts puts them on the denoiser's content layers' scale, so one
content-group ILP compares them with the denoiser's cross-attention and feed-forward layers (a joint budget). The
alternative, replaying the recorded denoiser calls on changed prompt embeddings, would need each pipeline's way of
turning encoder outputs into denoiser inputs (classifier-free guidance batches, negative prompts, pooled
embeddings, SDXL's two encoders); the pipeline run does that itself. The cost is one content job per layer and
measured width (text encoders have few layers: 18 on the shapes demo model, 72 in CLIP-L).

**BOS rows stay the full-precision ones.** The denoiser's BOS-aware layers serve token 0 from the row computed with
their full-precision weights on the full-precision encoder's BOS state (recorded by the calibration run, before
anything is quantized), whenever input row 0 is within ``BOS_MATCH_TOLERANCE`` (2 %) of that state; otherwise row 0
takes the quantized path, whose calibrated range left token 0 out. A quantized text encoder moves its BOS state
(shapes: 0.3 % at W8, 4.2 % at W4 everywhere), so before measuring, :func:`~.bos_floors.bos_safe_widths` raises
the narrowest allowed width of the layers that move it most per bit until the encoder at its narrowest allowed
widths keeps the state within ``BOS_MARGIN`` of the tolerance; every allocation is at least that wide. The final
plans' drift is measured again and recorded (``provenance.components.bos_drift``).

**Cache.** Component ``c``'s scores go to ``sensitivity-<c>-<key>.json`` beside the denoiser's
``sensitivity-<key>.json``, keyed by the denoiser sweep's key, the component and the encoder (structure and a
sample of its weights); entries are the encoder's own layer names. The denoiser's cache reads
``sensitivity-<key>*.json``, which a component's file never matches, so the two never mix.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from torch import nn

from ..errors import MixDQError
from ..plan import BitPlan, LayerSpec, layer_table
from .calibration import calibration_key
from .context import BuildContext
from .measure import PERFECT, content_scorer, extrapolate_ssim, sweep_key
from .recording import Calibration
from .scores import ScoreCache, merged
from .sensitivity import Cost, applied, layer_sensitivity

#: the group text-encoder layers join: they are scored like the denoiser's content layers
GROUP = "content"
WIDTH_DTYPE = {8: "int8", 4: "int4", 2: "int2", 16: "none"}


@dataclass
class TextEncoderPart:
    """One text-encoder component of a build: its layers, each layer's allowed widths and its scores."""

    component: str
    module: nn.Module
    table: dict
    widths: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, dict[int, float]] = field(default_factory=dict)

    def key(self, name: str) -> str:
        """The layer's name in an allocation over several components (never a denoiser layer's name)."""
        return f"{self.component}/{name}"


def text_encoder_parts(pipe, components: Sequence[str], denoiser: str) -> list[TextEncoderPart]:
    """The text encoders among ``components`` (which must include the ``denoiser``); a MixDQError for a component
    the pipeline lacks or one that is not a text encoder."""
    from transformers import PreTrainedModel

    if denoiser not in components:
        raise MixDQError(f"'components' {list(components)} must include the denoiser, '{denoiser}' (a build "
                         "measures text-encoder layers by the images the denoiser makes).")
    have = sorted(k for k, v in getattr(pipe, "components", {}).items() if isinstance(v, nn.Module))
    parts = []
    for name in components:
        if name == denoiser:
            continue
        module = getattr(pipe, name, None)
        if module is None:
            raise MixDQError(f"'components' lists '{name}', which {type(pipe).__name__} does not have (its models: "
                             f"{', '.join(have)}).")
        if not isinstance(module, PreTrainedModel) or not layer_table(module):
            raise MixDQError(f"'components' lists '{name}', a {type(module).__name__}: a build makes plans for the "
                             f"denoiser ('{denoiser}') and text encoders (transformers models) only.")
        parts.append(TextEncoderPart(name, module, layer_table(module)))
    return parts


def _cache(ctx: BuildContext, part: TextEncoderPart) -> ScoreCache:
    s = ctx.settings
    if not s.cache_dir:
        return ScoreCache(None)
    h = hashlib.sha256(f"{sweep_key(ctx.denoiser, s)}|{part.component}|{calibration_key(part.module, s)}".encode())
    return ctx.score_cache(Path(s.cache_dir) / f"sensitivity-{part.component}-{h.hexdigest()[:16]}.json")


def measure_text_encoders(ctx: BuildContext, calib: Calibration, parts: Sequence[TextEncoderPart]) -> int:
    """Fill every part's scores (see the module docstring); the costs go into ``ctx.report`` as
    ``text_encoder_sensitivity``. Returns what the naive protocol would have paid (sample-evaluations)."""
    s, rec = ctx.settings, calib.recording
    scorer = content_scorer(ctx, rec)
    cost, reused, naive = Cost(), Cost(), 0
    for part in parts:
        cache = _cache(ctx, part)
        by_widths: dict[tuple[int, ...], list[str]] = {}
        for name, widths in part.widths.items():
            by_widths.setdefault(tuple(widths), []).append(name)
        for widths, names in by_widths.items():
            if len(widths) == 1:  # nothing to choose, nothing to measure
                part.scores.update({n: {widths[0]: 0.0} for n in names})
                continue
            measured = list(widths[:-1]) if s.extrapolate_widest else list(widths)
            result = layer_sensitivity(part.module, names, {GROUP: measured}, {n: GROUP for n in names},
                                       lambda n, b: LayerSpec(f"int{b}"), rec, scorer,
                                       (rec.num_calls, rec.num_samples), kind="weights", progress=ctx.progress,
                                       cache=cache, shard=ctx.shard)
            if ctx.state is not None:
                result.fill_from(merged(cache))
            for name in names:
                part.scores[name] = _completed(result.scores[name], widths, s.content_metric)
            cost.add(result.cost.calls, result.cost.samples)
            reused.add(result.reused.calls, result.reused.samples)
            naive += rec.num_samples * len(names) * len(widths)
    ctx.report.count("text_encoder_sensitivity", cost.calls, cost.samples, reused=(reused.calls, reused.samples))
    return naive


def _completed(scores: dict[int, float], widths: Sequence[int], metric: str) -> dict[int, float]:
    """A layer's scores at every allowed width: the widest one, when not measured, extrapolated from the next
    (:func:`~.measure.extrapolate_ssim`)."""
    out = dict(scores)
    if widths[-1] not in out:
        out[widths[-1]] = extrapolate_ssim(out[widths[-2]], widths[-2], widths[-1], PERFECT[metric])
    return out


def text_encoder_plan(part: TextEncoderPart, widths: Mapping[str, float], provenance: dict | None = None) -> BitPlan:
    """The resolved weight-only plan of ``part`` with each layer at ``widths[layer]``."""
    layers = {n: {"weights": WIDTH_DTYPE[int(widths[n])], "activations": "none"} for n in part.table}
    return BitPlan(layers=layers, provenance=dict(provenance or {})).resolve(part.module)


@contextmanager
def applied_plans(parts: Sequence[TextEncoderPart], plans: Mapping[str, BitPlan]) -> Iterator[None]:
    """Every part quantized in memory per ``plans[component]`` inside the block (restored on exit)."""
    with ExitStack() as stack:
        for part in parts:
            if part.component in plans:
                stack.enter_context(applied(part.module, plans[part.component]))
        yield
