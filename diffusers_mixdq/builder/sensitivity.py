"""Metric-decoupled layer sensitivity (MixDQ): quantize one layer at a time, everything else in full precision.

* **Quality** layers are scored by the SQNR (dB) of the denoiser output against full precision, replaying the
  denoiser calls recorded during the full-precision run (same latents, timesteps and text embeddings).
* **Content / text-alignment** layers (cross-attention and feed-forward by default) are scored by the SSIM of the
  final images against the full-precision images (same prompts and seeds), which needs a full pipeline run.

Scores are higher-is-better; each group is only ever compared within itself (SSIM and dB live on different
scales), which is why allocation budgets the groups separately.
"""


from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..families import GENERIC, matches
from ..plan import LayerSpec
from .recording import Recording, replay
from .scores import ScoreCache, score_key

#: MixDQ's content / text-alignment group: cross-attention and feed-forward layers (the generic model family's; a
#: build takes its denoiser family's patterns, :data:`diffusers_mixdq.families.FAMILIES`)
CONTENT_PATTERNS = GENERIC.content


def layer_group(name: str, content_patterns: Sequence[str] = CONTENT_PATTERNS) -> str:
    """``"content"`` when ``name`` matches a content pattern (glob, or ``re:`` regex), else ``"quality"``."""
    return "content" if any(matches(p, name) for p in content_patterns) else "quality"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10·log10(Σref² / Σ(out−ref)²) in float64; ``inf`` when identical.

    Not torchmetrics' ``signal_noise_ratio``: it adds ``eps`` to both sums, which changes the last bits of about half
    of the scores (cached scores would no longer match new ones) and gives a finite value for identical tensors."""
    noise = (out.double() - ref.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def replay_sqnr(denoiser: nn.Module, rec: Recording) -> float:
    """SQNR (dB) of the denoiser's outputs on the recorded calls, over all calls together."""
    outs = replay(denoiser, rec)
    return sqnr_db(torch.cat([o.flatten() for o in outs]), torch.cat([r.flatten() for r in rec.outputs]))


@contextmanager
def swapped(denoiser: nn.Module, name: str, replacement: nn.Module):
    """``denoiser.<name>`` replaced by ``replacement`` inside the block, the original put back on exit."""
    original = denoiser.get_submodule(name)
    denoiser.set_submodule(name, replacement)
    try:
        yield replacement
    finally:
        denoiser.set_submodule(name, original)


@contextmanager
def applied(denoiser: nn.Module, plan, bos_state: torch.Tensor | None = None):
    """Temporarily quantize ``denoiser`` in memory per a resolved ``plan`` (restored on exit)."""
    from ..apply import quantize_module

    with ExitStack() as stack:
        for name, spec in plan.layer_specs().items():
            if spec.is_quantized:
                qmodule = quantize_module(denoiser.get_submodule(name), spec, bos_state=bos_state,
                                          tensors=plan.tensors, name=name)
                stack.enter_context(swapped(denoiser, name, qmodule))
        yield denoiser


@dataclass
class Cost:
    """Denoiser work: calls, and sample-evaluations (one sample through the denoiser once; CFG counts twice)."""

    calls: int = 0
    samples: int = 0

    def add(self, calls: int, samples: int) -> None:
        self.calls += calls
        self.samples += samples


@dataclass
class ContentScorer:
    """Scores content layers: ``score()`` runs the pipeline (on a subset of the prompts) and returns the SSIM of
    its images against full precision; ``cost`` is what one call of it costs the denoiser."""

    score: Callable[[], float]
    cost: tuple[int, int]
    metric: str = "ssim"


@dataclass
class SensitivityResult:
    """``scores[layer][width] = score`` (higher is better) and what it cost: ``cost`` what this run measured,
    ``reused`` what the scores taken from the cache cost when they were measured, ``naive`` what the naive protocol
    (every layer x width on all recorded calls, all samples, and a full pipeline run over every prompt per content
    job) costs for the same jobs."""

    kind: str
    metric: dict[str, str]
    scores: dict[str, dict[int, float]]
    cost: Cost
    naive: Cost
    jobs: list[tuple[str, int]] = field(default_factory=list)
    #: what the scores taken from the cache cost when an earlier run measured them (not spent by this run)
    reused: Cost = field(default_factory=Cost)

    def fill_from(self, cache: ScoreCache) -> None:
        """Take every job's score from ``cache`` (after a sharded sweep, from the merged parts)."""
        for name, bits in self.jobs:
            self.scores[name][bits] = cache.get(score_key(name, bits, self.kind))


def layer_sensitivity(
    denoiser: nn.Module,
    layers: Iterable[str],
    widths: dict[str, Sequence[int]],
    groups: dict[str, str],
    spec_for: Callable[[str, int], LayerSpec],
    quality_rec: Recording,
    content: ContentScorer | None,
    naive_cost: tuple[int, int],
    *,
    kind: str = "weights",
    bos_state: torch.Tensor | None = None,
    progress: bool = True,
    cache: ScoreCache | None = None,
    shard: tuple[int, int] = (0, 1),
    module_of: Callable[[str], nn.Module] | None = None,
) -> SensitivityResult:
    """Score every layer at every candidate width, one layer quantized at a time, everything else full precision.

    Args:
        widths: candidate bits per group (e.g. ``{"content": [2, 4, 8], "quality": [4, 8]}``).
        groups: layer -> ``"content"`` or ``"quality"``.
        spec_for: ``(layer, bits) -> LayerSpec`` of the layer under test (weights alone, or activations alone).
        quality_rec: recorded full-precision calls (possibly a :meth:`Recording.subset`) replayed for quality
            layers, scored by SQNR of the denoiser output.
        content: scores content layers by an image metric; ``None`` scores them like quality layers.
        naive_cost: ``(calls, samples)`` one job costs under the naive protocol (for the report).
        kind: ``"weights"`` or ``"activations"`` (names the progress bar and the cache keys).
        cache: scores already measured are taken from it and new ones written to it (resumable sweeps).
        shard: ``(index, count)``: only every ``count``-th job from ``index`` (the rest: other processes' parts).
        module_of: a layer's full-precision module (default: the denoiser's; measuring in a quantized model).
    """
    from ..apply import quantize_module
    from .progress import sweep_bar

    layers = list(layers)
    all_jobs = [(n, b) for n in layers for b in widths[groups[n]]]
    scores: dict[str, dict[int, float]] = {n: {} for n in layers}
    cost, naive, reused = Cost(), Cost(), Cost()
    naive.add(naive_cost[0] * len(all_jobs), naive_cost[1] * len(all_jobs))
    cache = cache or ScoreCache(None)
    mine, todo = all_jobs[shard[0]::shard[1]], []
    for name, bits in mine:
        cached = cache.get(score_key(name, bits, kind))
        if cached is None:
            todo.append((name, bits))
        else:  # measured by an earlier (interrupted or identical) run: what it cost then, not now
            scores[name][bits] = cached
            reused.add(*_job_cost(groups[name], quality_rec, content))
    with sweep_bar(f"{kind} sensitivity", len(mine), len(mine) - len(todo), progress) as bar:
        for name, bits in todo:
            qmodule = quantize_module((module_of or denoiser.get_submodule)(name), spec_for(name, bits),
                                      bos_state=bos_state)
            with swapped(denoiser, name, qmodule):
                scores[name][bits] = _score(denoiser, groups[name], quality_rec, content)
            cost.add(*_job_cost(groups[name], quality_rec, content))
            cache.put(score_key(name, bits, kind), scores[name][bits])
            bar.update(1)
    metric = {"quality": "sqnr_db", "content": content.metric if content is not None else "sqnr_db"}
    return SensitivityResult(kind, metric, scores, cost, naive, all_jobs, reused)


def _job_cost(group: str, quality_rec: Recording, content: ContentScorer | None) -> tuple[int, int]:
    """``(calls, samples)`` one measurement of a layer of ``group`` costs the denoiser."""
    if group == "content" and content is not None:
        return content.cost
    return quality_rec.num_calls, quality_rec.num_samples


def _score(denoiser: nn.Module, group: str, quality_rec: Recording, content: ContentScorer | None) -> float:
    """The score of the denoiser as it is now (one layer quantized): an image metric for a content layer (when there
    is a content scorer), else the SQNR of its output on the recorded calls."""
    if group == "content" and content is not None:
        return content.score()
    return replay_sqnr(denoiser, quality_rec)
