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

from ..plan.format import LayerSpec

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


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


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
    stopped. Keys are ``"<layer>|<width>"``; the file is replaced atomically."""

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

    def get(self, name: str, bits: int) -> float | None:
        return self.scores.get(f"{name}|{bits}")

    def put(self, name: str, bits: int, score: float) -> None:
        self.scores[f"{name}|{bits}"] = score
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.scores))
            os.replace(tmp, self.path)


@dataclass
class SensitivityResult:
    """``scores[layer][width] = score`` (higher is better) and how many denoiser evaluations it cost."""

    kind: str
    metric: dict[str, str]
    scores: dict[str, dict[int, float]]
    denoiser_evaluations: int


def weight_sensitivity(
    denoiser: nn.Module,
    layers: Iterable[str],
    widths: dict[str, Sequence[int]],
    quality_rec: Recording,
    content_score: Callable[[], float] | None,
    content_calls: int,
    groups: dict[str, str],
    act_spec: Callable[[str], LayerSpec] | None = None,
    bos_state: torch.Tensor | None = None,
    progress: bool = True,
    cache: ScoreCache | None = None,
    shard: tuple[int, int] = (0, 1),
) -> SensitivityResult:
    """Score every layer at every candidate weight width, one layer quantized at a time.

    Args:
        widths: candidate bits per group (e.g. ``{"content": [2, 4, 8], "quality": [4, 8]}``).
        quality_rec: the recorded full-precision run whose denoiser calls are replayed for quality layers.
        content_score: runs the pipeline and returns the SSIM of its images vs full precision (content layers);
            ``None`` scores content layers by SQNR too.
        content_calls: denoiser evaluations one ``content_score()`` costs.
        act_spec: the activation part of each layer's spec during the sweep (default: weights only).
        cache: scores already measured are taken from it and new ones written to it (resumable sweeps).
        shard: ``(index, count)``: measure only every ``count``-th job starting at ``index`` (the others are left
            to other processes; their scores are missing from the result until the parts are merged).
    """
    from tqdm.auto import tqdm

    from ..apply.backend import quantize_module

    bits_name = {8: "int8", 4: "int4", 2: "int2"}
    layers = list(layers)
    jobs = [(n, b) for n in layers for b in widths[groups[n]]]
    scores: dict[str, dict[int, float]] = {n: {} for n in layers}
    evaluations = 0
    cache = cache or ScoreCache(None)
    index, count = shard
    jobs = jobs[index::count]
    for name, bits in tqdm(jobs, desc="weight sensitivity", disable=not progress, unit="layer×width"):
        cached = cache.get(name, bits)
        if cached is not None:
            scores[name][bits] = cached
            continue
        original = denoiser.get_submodule(name)
        act = act_spec(name) if act_spec else LayerSpec()
        spec = LayerSpec(bits_name[bits], act.activations, act.act_range, act.flags)
        qmodule = quantize_module(original, spec, bos_state=bos_state)
        with swapped(denoiser, name, qmodule):
            if groups[name] == "content" and content_score is not None:
                scores[name][bits] = content_score()
                evaluations += content_calls
            else:
                scores[name][bits] = replay_sqnr(denoiser, quality_rec)
                evaluations += quality_rec.num_calls
        cache.put(name, bits, scores[name][bits])
    metric = {"quality": "sqnr_db", "content": "ssim" if content_score is not None else "sqnr_db"}
    return SensitivityResult("weights", metric, scores, evaluations)
