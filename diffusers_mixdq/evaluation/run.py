"""Running the variants: full precision, then each plan, on the same prompts with the same seeds.

Every variant generates every prompt (prompt ``i`` with seed ``seed + i``) with the same settings; each quantized
variant's images are compared image by image with the full-precision ones, and a scorer (a bundled demo model's)
reads the text alignment of every image.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..families import denoiser_of
from ..plan import BitPlan, resolve_plan_source
from ..plan.components import component_plans
from .generation import Generation, generate, load_pipeline, tensor_bytes
from .images import image_metrics, per_image_psnr
from .peak import measure_peak_rss
from .results import VariantResult


def _run_variant(path, name: str, plan, prompts: Sequence[str], gen: Generation) -> VariantResult:
    """Load the pipeline with ``plan``, generate ``prompts``: the images, size, speed and average weight bits."""
    pipe = load_pipeline(path, plan)
    _, denoiser = denoiser_of(pipe)
    images, seconds = generate(pipe, prompts, gen.seed, gen.steps, gen.guidance, gen.batch_size, gen.height,
                               gen.width, gen.pipe_kwargs)
    bits = 8.0 * next(denoiser.parameters()).element_size()
    config = getattr(denoiser.config, "quantization_config", None)
    if config is not None:  # (a plan set may quantize only other components)
        bits = config.plan.summary().avg_weight_bits
    encoders = [m for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None]
    return VariantResult(name=name, denoiser_bytes=tensor_bytes(denoiser), seconds_per_image=seconds,
                         avg_weight_bits=bits, images=images,
                         text_encoder_bytes=sum(tensor_bytes(m) for m in encoders) if encoders else None)


def score_variant(result: VariantResult, reference: VariantResult | None, prompts: Sequence[str], scorer=None,
                  real_features: torch.Tensor | None = None) -> None:
    """Fill in ``result``'s image metrics against ``reference`` (None: it is the reference) and, with a scorer, its
    per-image alignment (``scorer.aligned``), per-attribute accuracies (``scorer.score``) and Fréchet distance."""
    if reference is not None:
        result.psnr, result.ssim = image_metrics(result.images, reference.images)
        result.psnr_per_image = per_image_psnr(result.images, reference.images).tolist()
    if scorer is None:
        return
    result.aligned = [bool(a) for a in scorer.aligned(result.images, list(prompts))]
    scores = scorer.score(result.images, list(prompts))
    result.alignment = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if real_features is not None:
        from ..demo.scorer import frechet_distance

        result.frechet = frechet_distance(scorer.features(result.images), real_features)


def evaluate(
    path: str | os.PathLike,
    plans: dict[str, Any],
    prompts: Sequence[str],
    *,
    generation: Generation | None = None,
    scorer=None,
    real_features: torch.Tensor | None = None,
    measure_memory: bool = True,
    progress: bool = True,
    **settings: Any,
) -> list[VariantResult]:
    """Full precision plus one variant per plan (``{name: plan source}``), same prompts and seeds for all.

    ``generation`` (or its fields as keywords: ``seed``, ``steps``, ``guidance``, ``batch_size``, ``height``,
    ``width``, ``pipe_kwargs``) says how every variant generates."""
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    gen = generation or Generation(**settings)
    diffusers_logging.disable_progress_bar()
    variants: list[tuple[str, Any]] = [("FP32", None)]
    variants += [(name, component_plans(p, minimum=1) or resolve_plan_source(p)) for name, p in plans.items()]
    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in tqdm(variants, desc="variants", disable=not progress):
            res = _run_variant(path, name, plan, prompts, gen)
            score_variant(res, results[0] if results else None, prompts, scorer, real_features)
            if measure_memory:
                saved = None if plan is None else _save(plan, Path(tmp) / name.replace("/", "_"))
                res.peak_rss_bytes = measure_peak_rss(str(path), saved, prompts[: gen.batch_size], gen)
            results.append(res)
    return results


def _save(plan, folder: Path) -> str:
    """Save a plan (or ``{component: plan}`` into component folders) for a fresh process to load."""
    if isinstance(plan, BitPlan):
        return str(plan.save(folder))
    for component, p in plan.items():
        p.save(folder / component)
    return str(folder)
