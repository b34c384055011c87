"""Evaluating plans on a pipeline: what ``mixdq eval`` and ``mixdq demo`` measure and how they compare variants.

* :mod:`.generation` - loading a pipeline with a plan, generating with fixed seeds (:class:`Generation`);
* :mod:`.run` - full precision, then each plan, on the same prompts and seeds (:func:`evaluate`);
* :mod:`.images` - per-image PSNR to full precision, diverged images, SSIM, the PNG grid;
* :mod:`.stats` - percentiles, bootstrap intervals, McNemar's and Wilcoxon's paired tests (pure, numpy only);
* :mod:`.results` - one variant's result, its summary (the fields of ``--json``), the table;
* :mod:`.compare` - ``--compare A B``: paired tests between two variants;
* :mod:`.peak` - peak memory of a variant in a fresh process.
"""

from .compare import Comparison, compare, describe
from .images import DIVERGED_DB, diverged_count, image_metrics, per_image_psnr, save_grid, ssim
from .peak import measure_peak_rss
from .results import SUMMARY_FIELDS, VariantResult, dumps, format_table, summary, write_json
from .generation import Generation, denoiser_name, generate, generate_timed, load_pipeline, tensor_bytes
from .run import evaluate, score_variant
from .stats import McNemar, Wilcoxon, bootstrap_ci, mcnemar_exact, percentile, wilcoxon_signed_rank

__all__ = [
    "DIVERGED_DB", "SUMMARY_FIELDS", "Comparison", "Generation", "McNemar", "VariantResult", "Wilcoxon",
    "bootstrap_ci", "compare", "denoiser_name", "describe", "diverged_count", "dumps", "evaluate", "format_table",
    "generate", "generate_timed", "image_metrics", "load_pipeline", "mcnemar_exact", "measure_peak_rss",
    "per_image_psnr", "percentile", "save_grid", "score_variant", "ssim", "summary", "tensor_bytes",
    "wilcoxon_signed_rank", "write_json",
]
