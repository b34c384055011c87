"""Evaluate plans on a pipeline: size, peak memory, latency, PSNR / SSIM vs full precision, text alignment.

Used by ``mixdq eval`` and ``mixdq demo``. Every variant (full precision, then each plan) generates the same
prompts with the same seeds; image metrics compare each quantized variant with the full-precision images.
Alignment accuracy and a Fréchet distance need a scorer (the demo model ships one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import MixDQError
from .families import DENOISER_COMPONENTS, denoiser_of
from .plan import BitPlan, resolve_plan_source


@dataclass
class VariantResult:
    """Measurements of one variant (``plan is None``: the full-precision pipeline)."""

    name: str
    denoiser_bytes: int
    seconds_per_batch: float
    peak_rss_bytes: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    alignment: dict[str, float] | None = None
    frechet: float | None = None
    avg_weight_bits: float | None = None
    images: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        return d


def denoiser_name(pipe) -> str:
    """Name of the pipeline component holding the denoiser (``unet`` or ``transformer``)."""
    return denoiser_of(pipe)[0]


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the module's state dict (quantized weights as stored)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def load_pipeline(path: str | os.PathLike, plan=None, torch_dtype: torch.dtype = torch.float32):
    """The pipeline at ``path``, its denoiser quantized with ``plan`` (None: full precision)."""
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from .bos import verify_text_encoder
    from .config import MixDQConfig

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if plan is not None:
        index = json.loads((Path(path) / "model_index.json").read_text())
        component = next((c for c in DENOISER_COMPONENTS if c in index), DENOISER_COMPONENTS[-1])
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={component: MixDQConfig(plan=plan)}
        )
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if plan is not None:
        verify_text_encoder(pipe)
    return pipe


def generate_timed(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float, batch_size: int = 16,
                   height: int | None = None, width: int | None = None,
                   inference_mode: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Images ``(N, 3, H, W)`` in [0, 1] (prompt ``i`` always uses seed ``seed + i``) and the seconds of each batch.
    ``inference_mode=False`` generates under ``no_grad`` instead (some peers' layers fail in inference mode)."""
    from .sampling import generate as run

    seeds = [seed + i for i in range(len(prompts))]
    return run(pipe, prompts, seeds, steps, guidance, batch_size=batch_size, height=height, width=width,
               grad_mode="inference" if inference_mode else "no_grad")


def generate(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float, batch_size: int = 16,
             height: int | None = None, width: int | None = None) -> tuple[torch.Tensor, float]:
    """Images ``(N, 3, H, W)`` in [0, 1] (prompt ``i`` always uses seed ``seed + i``) and the median seconds per
    batch (the first batch, which includes one-time set-up, is left out when there are several)."""
    images, times = generate_timed(pipe, prompts, seed, steps, guidance, batch_size, height, width)
    timed = times[1:] or times
    return images, sorted(timed)[len(timed) // 2]


def image_metrics(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of ``images`` against ``reference``, both ``(N, 3, H, W)`` in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = float(peak_signal_noise_ratio(images, reference, data_range=1.0))
    ssim = float(structural_similarity_index_measure(images, reference, data_range=1.0))
    return psnr, ssim


def measure_peak_rss(path: str, plan_path: str | None, prompts: Sequence[str], steps: int, guidance: float,
                     seed: int) -> int | None:
    """Peak RSS of a fresh Python process that loads the pipeline (with the plan) and generates ``prompts``."""
    if not Path("/proc/self/status").exists():
        return None
    args = {"path": str(path), "plan": plan_path, "prompts": list(prompts), "steps": steps, "guidance": guidance,
            "seed": seed}
    cmd = [sys.executable, "-m", "diffusers_mixdq.evaluate", json.dumps(args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MixDQError(f"measuring memory failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _run_variant(path, name: str, plan: BitPlan | None, prompts: Sequence[str], seed: int, steps: int,
                 guidance: float, batch_size: int) -> VariantResult:
    """Load the pipeline with ``plan``, generate ``prompts``: the images, size, speed and average weight bits."""
    pipe = load_pipeline(path, plan)
    _, denoiser = denoiser_of(pipe)
    images, seconds = generate(pipe, prompts, seed, steps, guidance, batch_size)
    result = VariantResult(name=name, denoiser_bytes=tensor_bytes(denoiser), seconds_per_batch=seconds,
                           images=images)
    if plan is not None:
        result.avg_weight_bits = denoiser.config.quantization_config.plan.summary().avg_weight_bits
    return result


def _score(result: VariantResult, prompts: Sequence[str], scorer, real_features: torch.Tensor | None) -> None:
    """Text alignment of the variant's images and the Fréchet distance of their features to ``real_features``."""
    if scorer is None:
        return
    result.alignment = scorer.score(result.images, list(prompts))
    if real_features is not None:
        from .demo.scorer import frechet_distance

        result.frechet = frechet_distance(scorer.features(result.images), real_features)


def _saved_plan(plan: BitPlan | None, directory: str, name: str) -> str | None:
    """Path of ``plan`` saved under ``directory`` for a measuring process (None: full precision)."""
    return None if plan is None else str(plan.save(Path(directory) / name.replace("/", "_")))


def evaluate(
    path: str | os.PathLike,
    plans: dict[str, Any],
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = 8,
    guidance: float = 4.0,
    batch_size: int = 16,
    scorer=None,
    real_features: torch.Tensor | None = None,
    measure_memory: bool = True,
    progress: bool = True,
) -> list[VariantResult]:
    """Full precision plus one variant per plan (``{name: plan source}``), same prompts and seeds for all."""
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    diffusers_logging.disable_progress_bar()
    variants: list[tuple[str, BitPlan | None]] = [("FP32", None)]
    variants += [(name, resolve_plan_source(p)) for name, p in plans.items()]
    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in tqdm(variants, desc="variants", disable=not progress):
            res = _run_variant(path, name, plan, prompts, seed, steps, guidance, batch_size)
            if results:  # the first variant, full precision, is the reference
                res.psnr, res.ssim = image_metrics(res.images, results[0].images)
            _score(res, prompts, scorer, real_features)
            if measure_memory:
                res.peak_rss_bytes = measure_peak_rss(str(path), _saved_plan(plan, tmp, name), prompts[:batch_size],
                                                      steps, guidance, seed)
            results.append(res)
    return results


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[VariantResult]) -> list[list[str]]:
    """Rows (header first) for printing: one per variant."""
    header = ["variant", "W bits", "denoiser MB", "smaller", "peak RSS MB", "s/batch", "PSNR dB", "SSIM",
              "aligned (all)", "colour", "shape", "Fréchet"]
    fp = results[0]
    rows = [header]
    for r in results:
        al = r.alignment or {}
        rows.append([
            r.name,
            "32" if r.avg_weight_bits is None else f"{r.avg_weight_bits:.2f}",
            f"{r.denoiser_bytes / 2**20:.2f}",
            f"{fp.denoiser_bytes / r.denoiser_bytes:.2f}x",
            _cell(None if r.peak_rss_bytes is None else r.peak_rss_bytes / 2**20, ".0f"),
            f"{r.seconds_per_batch:.2f}",
            _cell(r.psnr, ".2f"),
            _cell(r.ssim, ".4f"),
            *(_cell(al.get(key, float("nan")) if al else None, ".1%") for key in ("all", "colour", "shape")),
            _cell(r.frechet, ".2f"),
        ])
    return rows


def save_grid(results: Sequence[VariantResult], path: str | os.PathLike, columns: int | None = None) -> Path:
    """A PNG with one row per variant (first ``columns`` images of each), labelled on the left."""
    from PIL import Image, ImageDraw

    columns = columns or min(8, results[0].images.shape[0])
    h, w = results[0].images.shape[-2:]
    scale = max(1, 96 // max(h, w))
    cell_h, cell_w = h * scale, w * scale
    label_w = 110
    grid = Image.new("RGB", (label_w + columns * (cell_w + 2), len(results) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, r in enumerate(results):
        y = row * (cell_h + 2)
        draw.text((4, y + cell_h // 2 - 6), r.name, fill="black")
        for col in range(columns):
            arr = (r.images[col].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            img = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(img, (label_w + col * (cell_w + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _peak_main(args_json: str) -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    args = json.loads(args_json)
    from .apply.memory import PeakMemory

    with PeakMemory() as peak:
        pipe = load_pipeline(args["path"], args["plan"])
        generate(pipe, args["prompts"], args["seed"], args["steps"], args["guidance"], len(args["prompts"]))
    print(peak.peak_rss)


if __name__ == "__main__":
    _peak_main(sys.argv[1])
