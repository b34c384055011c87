"""Metric-decoupled layer sensitivity (MixDQ): quantize one layer at a time, everything else in full precision.

* **Quality** layers are scored by the SQNR (dB) of the denoiser output against full precision, replaying the
  denoiser calls recorded during the full-precision run (same latents, timesteps and text embeddings).
* **Content / text-alignment** layers (cross-attention and feed-forward by default) are scored by the SSIM of the
  final images against the full-precision images (same prompts and seeds), which needs a full pipeline run.

Scores are higher-is-better; each group is only ever compared within itself (SSIM and dB live on different
scales), which is why allocation budgets the groups separately.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..plan import LayerSpec

#: MixDQ's content / text-alignment group: cross-attention and feed-forward layers
CONTENT_PATTERNS = ("*attn2.*", "*.ff.*")


def layer_group(name: str, content_patterns: Sequence[str] = CONTENT_PATTERNS) -> str:
    return "content" if any(fnmatch.fnmatchcase(name, p) for p in content_patterns) else "quality"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10·log10(Σref² / Σ(out−ref)²); ``inf`` when identical."""
    noise = (out.double() - ref.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise))


@dataclass
class Recording:
    """What one full-precision pipeline run recorded: the denoiser's calls and outputs, and the images."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    images: torch.Tensor | None = None

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    @property
    def num_samples(self) -> int:
        """Denoiser sample-evaluations one replay costs: every call's batch size, summed (CFG counts twice)."""
        return sum(int(o.shape[0]) for o in self.outputs)

    def subset(self, fraction: float) -> Recording:
        """The same calls on about ``fraction`` of each call's samples. Call ``i`` keeps a window of
        ``max(1, round(fraction * batch))`` samples starting at ``i * window`` (wrapping), so that over the calls
        every sample (prompt, and CFG half) is covered at some timestep. Denoisers compute every sample on its
        own, so a sliced call gives exactly the sliced output (:func:`subset_is_exact` checks it)."""
        if fraction >= 1:
            return self
        sub = Recording(images=self.images)
        for i, ((args, kwargs), out) in enumerate(zip(self.calls, self.outputs)):
            batch = int(out.shape[0])
            take = max(1, round(fraction * batch))
            index = torch.tensor([(i * take + m) % batch for m in range(take)], device=out.device)
            sub.calls.append((_take(args, batch, index), _take(kwargs, batch, index)))
            sub.outputs.append(out.index_select(0, index))
        return sub


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` (tensors, possibly nested in dicts, lists and tuples) with ``fn`` applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _take(value: Any, batch: int, index: torch.Tensor) -> Any:
    """``value`` with every tensor whose first dimension is the batch reduced to the samples in ``index``."""
    return map_tensors(
        value, lambda t: t.index_select(0, index.to(t.device)) if t.dim() >= 1 and t.shape[0] == batch else t
    )


def subset_is_exact(denoiser: nn.Module, sub: Recording, atol: float = 1e-4) -> bool:
    """Whether replaying the sliced calls of ``sub`` in full precision reproduces the recorded outputs (it does for
    diffusers' UNets and DiTs; a denoiser mixing samples, or an argument sliced by mistake, would not)."""
    for out, ref in zip(replay(denoiser, sub), sub.outputs):
        if out.shape != ref.shape or not torch.allclose(out.float(), ref.float(), atol=atol, rtol=1e-3):
            return False
    return True


def _detach(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach().clone())


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def record_run(pipe, denoiser: nn.Module, run: Callable[[], torch.Tensor]) -> Recording:
    """Run ``run()`` (a full-precision pipeline call returning images) and record every denoiser call."""
    rec = Recording()

    def hook(module, args, kwargs, output):
        rec.calls.append((_detach(args), _detach(kwargs)))
        rec.outputs.append(_first_tensor(output).detach().clone())

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            rec.images = run()
    finally:
        handle.remove()
    return rec


def replay(denoiser: nn.Module, rec: Recording) -> list[torch.Tensor]:
    """The denoiser's outputs on the recorded calls."""
    with torch.no_grad():
        return [_first_tensor(denoiser(*args, **kwargs)) for args, kwargs in rec.calls]


def replay_sqnr(denoiser: nn.Module, rec: Recording) -> float:
    """SQNR (dB) of the denoiser's outputs on the recorded calls, over all calls together."""
    outs = replay(denoiser, rec)
    return sqnr_db(torch.cat([o.flatten() for o in outs]), torch.cat([r.flatten() for r in rec.outputs]))


class swapped:
    """Context manager: replace ``denoiser.<name>`` by ``replacement`` and put the original back on exit."""

    def __init__(self, denoiser: nn.Module, name: str, replacement: nn.Module):
        parent_name, _, self.child = name.rpartition(".")
        self.parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        self.replacement = replacement

    def __enter__(self):
        self.original = getattr(self.parent, self.child)
        setattr(self.parent, self.child, self.replacement)
        return self.replacement

    def __exit__(self, *exc):
        setattr(self.parent, self.child, self.original)


class ScoreCache:
    """Sensitivity scores on disk (JSON), written after every measurement, so an interrupted sweep resumes where it
    stopped. Keys are ``"<layer>|<width>"`` for weights and ``"<layer>|a<width>"`` for activations; the file is
    replaced atomically."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.scores: dict[str, float] = {}
        if self.path is not None:
            # this file and the parts other shards wrote beside it (``<stem>.part<i>.json``)
            for part in sorted(self.path.parent.glob(self.path.stem + "*.json")):
                self.scores.update({k: float(v) for k, v in json.loads(part.read_text()).items()})

    def shard(self, index: int) -> ScoreCache:
        """The part file shard ``index`` writes (it still reads every part, so resuming works for all shards)."""
        part = ScoreCache(None)
        part.path = self.path.with_name(f"{self.path.stem}.part{index}.json")
        part.scores = dict(self.scores)
        return part

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def put(self, key: str, score: float) -> None:
        self.scores[key] = score
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.scores))
            os.replace(tmp, self.path)


def score_key(name: str, bits: int, kind: str = "weights") -> str:
    return f"{name}|{bits}" if kind == "weights" else f"{name}|a{bits}"


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
    """``scores[layer][width] = score`` (higher is better) and what it cost: ``cost`` as measured (cached scores
    are free), ``naive`` what the naive protocol (every layer x width on all recorded calls, all samples, and a
    full pipeline run over every prompt per content job) costs for the same jobs."""

    kind: str
    metric: dict[str, str]
    scores: dict[str, dict[int, float]]
    cost: Cost
    naive: Cost
    jobs: list[tuple[str, int]] = field(default_factory=list)

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
        shard: ``(index, count)``: measure only every ``count``-th job starting at ``index`` (the others are left
            to other processes; their scores are missing from the result until the parts are merged).
    """
    from tqdm.auto import tqdm

    from ..apply import quantize_module

    layers = list(layers)
    all_jobs = [(n, b) for n in layers for b in widths[groups[n]]]
    scores: dict[str, dict[int, float]] = {n: {} for n in layers}
    cost, naive = Cost(), Cost()
    naive.add(naive_cost[0] * len(all_jobs), naive_cost[1] * len(all_jobs))
    cache = cache or ScoreCache(None)
    index, count = shard
    jobs = all_jobs[index::count]
    for name, bits in tqdm(jobs, desc=f"{kind} sensitivity", disable=not progress, unit="job"):
        key = score_key(name, bits, kind)
        cached = cache.get(key)
        if cached is not None:
            scores[name][bits] = cached
            continue
        qmodule = quantize_module(denoiser.get_submodule(name), spec_for(name, bits), bos_state=bos_state)
        with swapped(denoiser, name, qmodule):
            if groups[name] == "content" and content is not None:
                scores[name][bits] = content.score()
                cost.add(*content.cost)
            else:
                scores[name][bits] = replay_sqnr(denoiser, quality_rec)
                cost.add(quality_rec.num_calls, quality_rec.num_samples)
        cache.put(key, scores[name][bits])
    metric = {"quality": "sqnr_db", "content": content.metric if content is not None else "sqnr_db"}
    return SensitivityResult(kind, metric, scores, cost, naive, all_jobs)
