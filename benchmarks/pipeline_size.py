"""Whole-pipeline size of a W4-average MixDQ plan set against FP16 / BF16, on real configs (meta device).

    python benchmarks/pipeline_size.py        # writes benchmarks/results/pipeline_size.json

Pipelines, built from their published config numbers (``benchmarks/configs/``) on the meta device, so no weight is
allocated (sizes depend on shapes only):

* SDXL: UNet (``sdxl-base-unet.json``) + CLIP ViT-L/14 text encoder (``clip-vit-l14-text.json``) + OpenCLIP
  ViT-bigG/14 text encoder with projection (``clip-vit-bigg14-text.json``);
* PixArt-Σ: transformer (``pixart-sigma-transformer.json``) + T5-v1.1-XXL encoder (``t5-v1_1-xxl-encoder.json``).

Plan set: every component int4 weight-only (a W4 average), the denoiser's first and last layers (its family's
``first_last``) kept in 16 bit; measured twice, without and with the plan key ``embeddings: {"weights": "int8"}``
(the embedding tables no other module shares at int8, one 16-bit scale per row; T5's tied ``shared`` table stays
16 bit). Sizes are the plan summaries' (``BitPlan.summary(model)``): each layer as the weight backend stores it
(optimum-quanto int4: groups of up to 128 with a 16-bit scale and shift each), the int8 tables at 8 bits per
element plus their row scales, every other parameter outside the planned layers (norms, biases, the tables without
the key) at 16 bit; FP16 / BF16 is 2 bytes per parameter. The VAE
(84M parameters in SDXL) is not part of either sum. Loaded in float16, transformers keeps T5's ``wo`` layers in
float32 and MixDQ leaves them unquantized (``_keep_in_fp32_modules``); the T5 row is for a bfloat16 load. The T5
config leaves out T5-v1.1's ``tie_word_embeddings: false`` (which concerns the LM head, absent here): with it,
transformers 5 builds the encoder's token table apart from ``shared``, counting a 132M-parameter table twice, while
the published encoder checkpoints hold one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
W4 = {"weights": "int4", "activations": "none"}
INT8_TABLES = {"weights": "int8"}
PIPELINES = {
    "SDXL": [
        ("unet", "diffusers", "UNet2DConditionModel", "sdxl-base-unet.json"),
        ("text_encoder", "transformers", "CLIPTextModel", "clip-vit-l14-text.json"),
        ("text_encoder_2", "transformers", "CLIPTextModelWithProjection", "clip-vit-bigg14-text.json"),
    ],
    "PixArt-Sigma": [
        ("transformer", "diffusers", "PixArtTransformer2DModel", "pixart-sigma-transformer.json"),
        ("text_encoder", "transformers", "T5EncoderModel", "t5-v1_1-xxl-encoder.json"),
    ],
}


def build_on_meta(library: str, class_name: str, config_file: str):
    """The model with its published config, every tensor on the meta device."""
    import diffusers
    import transformers

    config = json.loads((HERE / "configs" / config_file).read_text())
    with torch.device("meta"):
        if library == "diffusers":
            return getattr(diffusers, class_name).from_config(config)
        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**{k: v for k, v in config.items() if k != "architectures"}))


def component_row(component: str, library: str, class_name: str, config_file: str) -> dict:
    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.families import family_of

    model = build_on_meta(library, class_name, config_file)
    ignore = list(family_of(model).first_last) if library == "diffusers" else []
    summary = BitPlan(defaults=W4, ignore=ignore).summary(model)
    tables = BitPlan(defaults=W4, ignore=ignore, embeddings=INT8_TABLES).summary(model)
    return {"component": component, "class": class_name, "config": config_file,
            "params": summary.params + summary.other_params, "quantized_layers": summary.num_layers,
            "avg_weight_bits": round(summary.avg_weight_bits, 3), "fp16_bytes": summary.fp16_bytes,
            "w4_bytes": summary.size_bytes, "ratio": summary.ratio_vs_fp16,
            "int8_table_params": tables.int8_embedding_params, "w4_int8_tables_bytes": tables.size_bytes,
            "ratio_int8_tables": tables.ratio_vs_fp16}


def main() -> None:
    out = {"plan": {"defaults": W4, "denoiser_first_last": "16 bit", "embeddings (second measurement)": INT8_TABLES},
           "pipelines": {}}
    for name, components in PIPELINES.items():
        rows = [component_row(*c) for c in components]
        fp16, w4, w4t = (sum(r[k] for r in rows) for k in ("fp16_bytes", "w4_bytes", "w4_int8_tables_bytes"))
        out["pipelines"][name] = {"components": rows, "fp16_bytes": fp16, "w4_bytes": w4, "ratio": fp16 / w4,
                                  "w4_int8_tables_bytes": w4t, "ratio_int8_tables": fp16 / w4t}
        print(f"{name}:")
        for r in rows:
            print(f"  {r['component']:<15} {r['class']:<28} {r['params'] / 1e6:8.0f}M params  "
                  f"FP16 {r['fp16_bytes'] / 2**30:6.2f} GiB  W4 {r['w4_bytes'] / 2**30:6.2f} GiB  {r['ratio']:.2f}x"
                  f"  int8 tables {r['w4_int8_tables_bytes'] / 2**30:6.2f} GiB  {r['ratio_int8_tables']:.2f}x")
        print(f"  {'total':<44} FP16 {fp16 / 2**30:6.2f} GiB  W4 {w4 / 2**30:6.2f} GiB  {fp16 / w4:.2f}x"
              f"  int8 tables {w4t / 2**30:6.2f} GiB  {fp16 / w4t:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_size.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
