"""Convert the MixDQ authors' published SDXL-Turbo plans into hub_recipes/sdxl-turbo-mixdq/ (plan + model card).

    git clone https://github.com/thu-nics/MixDQ && git -C MixDQ checkout 4f6b32ad20d980494bcfecae50bfde5d17ed805c
    python examples/convert_mixdq_published.py --mixdq MixDQ

Each variant is one `mixdq import mixdq` run (the command is printed and written into the card) checked against the
SDXL UNet layer table (benchmarks/configs/sdxl-base-unet.json, built on the meta device: SDXL-Turbo's UNet has the
same layers), so every plan is resolved and fingerprinted for it. The published files are not copied: their git
blob ids and sha256 go into the plan's provenance, and the tests check that exporting each plan gives files with
those ids.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import yaml
from typer.testing import CliRunner

from diffusers_mixdq import BitPlan
from diffusers_mixdq.cli import app

REPO = Path(__file__).resolve().parents[1]
SOURCE = "https://github.com/thu-nics/MixDQ"
COMMIT = "4f6b32ad20d980494bcfecae50bfde5d17ed805c"
FINAL = "mixed_precision_scripts/mixed_percision_config/sdxl_turbo/final_config"
RATIOS = "mixed_precision_scripts/optimize/tensor_ratio/sdxl_turbo"
PROTECT = f"{FINAL}/act/act_sensitivie_a8_1%.pt"
PAPER = "MixDQ (Zhao et al., ECCV 2024, arXiv:2405.17873)"
FP16 = "FP16 SDXL-Turbo: FID 17.15, CLIP score 0.2722"
#: variant -> (weight map, activation map or None, what the paper reports for it or None)
VARIANTS = {
    "w3.66a16": ("weight_3.66", None, "W3.66A16 (weight-only): reported in the paper as having negligible quality "
                 "and text-alignment loss; its FID / CLIP / ImageReward numbers were not available to this "
                 "conversion and are not quoted"),
    "w3.66a8": ("weight_3.66", "act_7.77", None),
    "w4a8": ("weight_4.00", "act_7.77", "W4A8: reported in the paper (abstract) as having negligible quality and "
             "text-alignment loss; its FID / CLIP / ImageReward numbers were not available to this conversion and "
             "are not quoted"),
    "w4.08a8": ("weight_4.08", "act_7.77", None),
    "w5a8": ("weight_5.02", "act_7.77", f"W5A8: FID 17.23, CLIP score 0.2697 ({FP16})"),
    "w8a8": ("weight_8.00", "act_7.77", f"W8A8: FID 17.03, CLIP score 0.2703 ({FP16})"),
}


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (`git ls-tree COMMIT PATH` shows it)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def source_files(variant: str) -> dict[str, str]:
    """``{role: path in the MixDQ repository}`` of a variant's published files."""
    weights, acts, _ = VARIANTS[variant]
    files = {"weights": f"{FINAL}/weight/{weights}.yaml"}
    if acts:
        files.update(activations=f"{FINAL}/act/{acts}.yaml", keep_fp=PROTECT)
    return files


def convert(mixdq: Path, variant: str, base: Path, out: Path) -> tuple[BitPlan, list[str]]:
    """Run `mixdq import mixdq` for one variant; the plan and the command (paths relative to the checkout)."""
    files = source_files(variant)
    args = ["import", "mixdq"]
    for role, path in files.items():
        args += [{"weights": "--weights", "activations": "--acts", "keep_fp": "--keep-fp"}[role], str(mixdq / path)]
    notes = {"source_repo": SOURCE, "source_commit": COMMIT, "variant": variant}
    for role, path in files.items():
        data = (mixdq / path).read_bytes()
        notes.update({f"{role}_path": path, f"{role}_git_blob": git_blob_id(data),
                      f"{role}_sha256": hashlib.sha256(data).hexdigest()})
    args += ["--base", str(base), "--base-model", "stabilityai/sdxl-turbo", "--out", str(out / variant)]
    args += [a for k, v in notes.items() for a in ("--provenance", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"{variant}: mixdq import failed:\n{result.output}")
    shown = ["mixdq", *args[:args.index("--base")]]
    shown = [a.replace(str(mixdq), "MixDQ") for a in shown]
    shown += ["--base", "SDXL_UNET_DIR", "--base-model", "stabilityai/sdxl-turbo", "--out", f"{variant}"]
    return BitPlan.load(out / variant), shown


def published_average(mixdq: Path, path: str, kind: str) -> float:
    """The average width of a published map weighted by the authors' own tensor-size table (what its name says)."""
    bits = yaml.safe_load((mixdq / path).read_text())
    size = yaml.safe_load((mixdq / f"{RATIOS}/{kind}_ratio_config.yaml").read_text())
    return sum(b * size[n] for n, b in bits.items()) / sum(size[n] for n in bits)


def _quote(cmd: list[str]) -> str:
    return " ".join(f'"{a}"' if "%" in a else a for a in cmd)


CARD = """---
base_model: stabilityai/sdxl-turbo
library_name: diffusers
tags: [mixdq, quantization, mixed-precision, diffusers-mixdq]
---

# SDXL-Turbo, MixDQ {label}: the authors' published plan as a diffusers-mixdq plan

`plan.json` is the mixed-precision plan that the MixDQ authors published for SDXL-Turbo's UNet, converted to the
diffusers-mixdq plan format (explicit per-layer entries, resolved and fingerprinted for the SDXL-Turbo UNet, 794
`Linear` / `Conv2d` layers). No weights are stored here: the plan quantizes the real `stabilityai/sdxl-turbo` UNet
as it loads.

## Source

- Repository: {source} at commit `{commit}`
{files}
- {pairing}
- Converted with diffusers-mixdq's importer (`examples/convert_mixdq_published.py` runs it for every variant;
  `SDXL_UNET_DIR` is a directory holding the SDXL UNet `config.json`, e.g. `benchmarks/configs/sdxl-base-unet.json`
  copied there):

  ```
  {command}
  ```

- License: the MixDQ repository has no license file (no LICENSE/COPYING, no license statement in its README) at
  that commit. The bit-width allocation is the authors' work: it is reproduced here only as converted data, with
  this attribution, and the raw files are not redistributed. `mixdq export mixdq hub_recipes/sdxl-turbo-mixdq/{variant}
  {export}` writes the YAML maps back byte for byte (their git blob ids are in `plan.json`'s provenance; the act-protect
  list comes back as a YAML list of the same names). Cite the paper if you use it:
  Zhao, Ning, Fang, Liu, Huang, Lin, Yan, Dai, Wang, *MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion
  Models with Metric-Decoupled Mixed Precision Quantization*, ECCV 2024 (arXiv:2405.17873).

## What it does

{table}

Weights: MixDQ's 8 bits are `int8` per output channel (as MixDQ); 4 and 2 bits are `int4` / `int2` in the weight
backend's grouped layout (MixDQ simulates them per channel, so the numbers differ slightly). Activations are
per-tensor with a range computed from each input (`"dynamic"`); MixDQ calibrated static ranges on 32 COCO captions,
which needs the real model, so results need not match the paper's exactly.

## Reported quality

{metrics}

## Load it

BOS-aware quantization (MixDQ's `bos_aware: True`: the K/V row of the text encoders' begin-of-sentence token is
computed in full precision) is turned on by attaching the BOS hidden state of SDXL-Turbo's text encoders to the
plan. That state comes from the real CLIP weights, so it is not shipped here; attach it once (this loads only the
pipeline's two text encoders and tokenizers, not its UNet or VAE, and checks that the state is the same for
every prompt):

```bash
mixdq attach-bos hub_recipes/sdxl-turbo-mixdq/{variant} --pipeline stabilityai/sdxl-turbo --out sdxl-turbo-mixdq-{variant}-bos
```

(in Python: `diffusers_mixdq.bos.attach_bos(plan, bos_hidden_state(pipe))` with the pipeline loaded with
`unet=None, vae=None`; the result is `plan.json` plus the state in a safetensors sidecar).

Then load SDXL-Turbo with it (the plan without the BOS state, `hub_recipes/sdxl-turbo-mixdq/{variant}`, loads the
same way, with token 0 quantized like every other token):

```python
import torch
import diffusers_mixdq
from diffusers import AutoPipelineForText2Image, UNet2DConditionModel
from diffusers_mixdq import MixDQConfig

unet = UNet2DConditionModel.from_pretrained(
    "stabilityai/sdxl-turbo", subfolder="unet", dtype=torch.float16,
    quantization_config=MixDQConfig(plan="sdxl-turbo-mixdq-{variant}-bos"),
)
pipe = AutoPipelineForText2Image.from_pretrained("stabilityai/sdxl-turbo", unet=unet, dtype=torch.float16)
image = pipe("a vanilla and chocolate mixing icecream cone, ice background", num_inference_steps=1,
             guidance_scale=0.0).images[0]
```

`mixdq inspect hub_recipes/sdxl-turbo-mixdq/{variant} --layers` lists every layer's widths.
"""


def _table(plan: BitPlan, avgs: dict[str, float]) -> str:
    s = plan.summary()
    act = f"{s.avg_activation_bits_by_inputs:.2f}" if s.avg_activation_bits_by_inputs is not None else "none (FP16)"
    rows = [
        ("layers by weight width", ", ".join(f"{k}: {v}" for k, v in sorted(s.weight_layers.items()))),
        ("layers by activation width", ", ".join(f"{k}: {v}" for k, v in sorted(s.activation_layers.items()))),
        ("average weight bits, this package (parameter-weighted, FP layers at 16)", f"{s.avg_weight_bits:.2f}"),
        ("average activation bits, this package (input-feature-weighted, quantized inputs)", act),
        *((f"published average {k} bits (the authors' tensor-size table, their map only)", f"{v:.2f}")
          for k, v in avgs.items()),
        ("estimated UNet size", f"{s.size_bytes / 2**30:.2f} GiB ({s.ratio_vs_fp16:.2f}x smaller than FP16)"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def write_card(path: Path, variant: str, plan: BitPlan, command: str, avgs: dict[str, float], metrics) -> None:
    files = source_files(variant)
    prov = plan.provenance
    listed = "\n".join(f"- {role.replace('_', '-')}: `{p}` (git blob `{prov[role + '_git_blob']}`)"
                       for role, p in files.items())
    weights, acts, _ = VARIANTS[variant]
    pairing = (f"Pairing: `{weights}` with `{acts}` and the act-protect list (9 layers kept fully in FP16, weights "
               "included), as MixDQ's README and `main_quant_infer.sh` run their W*A8 plans; the activation budget "
               "7.7 leaves room for those FP16 layers (`integer_program.sh`)" if acts else
               f"Weight-only: `{weights}` alone, activations stay in floating point (the paper's W3.66A16)")
    text = metrics or ("The paper reports no result for exactly this pairing; it is shipped as one more point "
                       "between the published ones.")
    export = "--weights w.yaml" + (" --acts a.yaml --keep-fp protect.yaml" if acts else "")
    path.write_text(CARD.format(export=export, label=variant.upper(), source=SOURCE, commit=COMMIT, files=listed, pairing=pairing,
                                command=command, table=_table(plan, avgs), metrics=f"{PAPER}, SDXL-Turbo, 1 step, "
                                f"COCO captions. {text}.", variant=variant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixdq", type=Path, required=True, help="checkout of thu-nics/MixDQ at " + COMMIT[:7])
    parser.add_argument("--out", type=Path, default=REPO / "hub_recipes" / "sdxl-turbo-mixdq")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        shutil.copy(REPO / "benchmarks/configs/sdxl-base-unet.json", base / "config.json")
        for variant in VARIANTS:
            plan, cmd = convert(opts.mixdq, variant, base, opts.out)
            files = source_files(variant)
            avgs = {kind: published_average(opts.mixdq, files[role], kind)
                    for role, kind in (("weights", "weight"), ("activations", "act")) if role in files}
            write_card(opts.out / variant / "README.md", variant, plan, _quote(cmd), avgs, VARIANTS[variant][2])
            s = plan.summary()
            print(f"{variant}: W {s.avg_weight_bits:.2f} / A {s.avg_activation_bits_by_inputs or 16:.2f} bits "
                  f"(published {', '.join(f'{k} {v:.2f}' for k, v in avgs.items())})")


if __name__ == "__main__":
    main()
