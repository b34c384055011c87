"""The names ``diffusers_mixdq.evaluate`` has always offered; the code lives in :mod:`diffusers_mixdq.evaluation`."""

from .evaluation import (  # noqa: F401
    Generation,
    VariantResult,
    denoiser_name,
    evaluate,
    format_table,
    generate,
    generate_timed,
    image_metrics,
    load_pipeline,
    measure_peak_rss,
    per_image_psnr,
    save_grid,
    summary,
    tensor_bytes,
)
