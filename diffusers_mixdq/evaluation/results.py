"""One variant's measurements, its summary (the fields of ``--json``), the printed table and the JSON files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .images import DIVERGED_DB, diverged_count
from .stats import bootstrap_ci, percentile

#: the fields of every object ``mixdq eval --json`` writes, in order
SUMMARY_FIELDS = ("name", "avg_weight_bits", "denoiser_bytes", "psnr_median_db", "psnr_p10_db", "diverged", "ssim",
                  "aligned", "aligned_ci", "seconds_per_image", "text_encoder_bytes")


@dataclass
class VariantResult:
    """Measurements of one variant. The reference (full precision) has no image metrics (``psnr_per_image`` is
    None); without a scorer there is no alignment (``aligned`` is None). ``psnr`` is the PSNR pooled over all
    images (one MSE), kept for older readers; ``psnr_per_image`` (``inf`` where an image equals its reference)
    is what the summary uses. ``aligned``: per image, whether the scorer read back everything its prompt asks.
    ``text_encoder_bytes``: the tensors of every text encoder of the pipeline (a plan set may quantize them)."""

    name: str
    denoiser_bytes: int
    seconds_per_image: float
    avg_weight_bits: float | None = None
    peak_rss_bytes: int | None = None
    psnr: float | None = None
    psnr_per_image: list[float] | None = None
    ssim: float | None = None
    aligned: list[bool] | None = None
    alignment: dict[str, float] | None = None
    frechet: float | None = None
    text_encoder_bytes: int | None = None
    images: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        return d


def summary(result: VariantResult, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The :data:`SUMMARY_FIELDS` of ``result``: median and 10th-percentile per-image PSNR (dB), images below
    :data:`~.images.DIVERGED_DB`, SSIM, alignment in percent with its 95% bootstrap interval (``resamples``
    resamples, ``seed``); None where a metric does not apply (image metrics of the reference, alignment without a
    scorer)."""
    psnr = result.psnr_per_image
    aligned = result.aligned
    ci = None
    if aligned:
        lo, hi = bootstrap_ci(aligned, resamples=resamples, seed=seed)
        ci = [100 * lo, 100 * hi]
    return {
        "name": result.name,
        "avg_weight_bits": result.avg_weight_bits,
        "denoiser_bytes": result.denoiser_bytes,
        "psnr_median_db": None if psnr is None else percentile(psnr, 50),
        "psnr_p10_db": None if psnr is None else percentile(psnr, 10),
        "diverged": None if psnr is None else diverged_count(psnr),
        "ssim": result.ssim,
        "aligned": 100 * sum(aligned) / len(aligned) if aligned else None,
        "aligned_ci": ci,
        "seconds_per_image": result.seconds_per_image,
        "text_encoder_bytes": result.text_encoder_bytes,
    }


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    return "∞" if isinstance(value, float) and math.isinf(value) else format(value, spec)


def format_table(results: Sequence[VariantResult], summaries: Sequence[dict] | None = None) -> list[list[str]]:
    """Rows (header first) for printing: one per variant (``summaries``: their :func:`summary`, computed if None)."""
    summaries = summaries or [summary(r) for r in results]
    header = ["variant", "W bits", "denoiser MiB", "FP / this", "text enc MiB", "peak RSS MiB", "s / image", "PSNR dB median",
              "PSNR dB p10", f"diverged (<{DIVERGED_DB:g} dB)", "SSIM", "aligned % [95% CI]", "Fréchet"]
    rows = [header]
    fp_bytes = results[0].denoiser_bytes
    for r, s in zip(results, summaries):
        ci = s["aligned_ci"]
        rows.append([
            r.name,
            _cell(s["avg_weight_bits"], ".2f"),
            f"{r.denoiser_bytes / 2**20:.2f}",
            f"{fp_bytes / r.denoiser_bytes:.2f}x",
            _cell(None if r.text_encoder_bytes is None else r.text_encoder_bytes / 2**20, ".2f"),
            _cell(None if r.peak_rss_bytes is None else r.peak_rss_bytes / 2**20, ".0f"),
            f"{r.seconds_per_image:.3f}",
            _cell(s["psnr_median_db"], ".2f"),
            _cell(s["psnr_p10_db"], ".2f"),
            _cell(s["diverged"], "d"),
            _cell(s["ssim"], ".4f"),
            "-" if s["aligned"] is None else f"{s['aligned']:.1f} [{ci[0]:.1f}-{ci[1]:.1f}]",
            _cell(r.frechet, ".2f"),
        ])
    return rows


_INF = "__mixdq_infinity__"


def _finite_json(value):
    """``value`` with infinite floats replaced by a marker that :func:`dumps` writes as ``1e999``, NaN by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return _INF if value > 0 else "-" + _INF
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def dumps(value) -> str:
    """Standard JSON (no ``Infinity``/``NaN`` tokens): an infinite PSNR, where images equal their reference, is
    written as the number ``1e999``, which JSON readers (Python's, JavaScript's) read back as infinity; a NaN (an
    undefined value) as ``null``."""
    text = json.dumps(_finite_json(value), indent=2, allow_nan=False)
    return text.replace(f'"-{_INF}"', "-1e999").replace(f'"{_INF}"', "1e999") + "\n"


def write_json(path: str | os.PathLike, summaries: Sequence[dict]) -> Path:
    """Write the list of summaries (:func:`summary`) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(list(summaries)))
    return path
