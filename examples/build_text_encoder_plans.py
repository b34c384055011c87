"""Build the bundled text-encoder plan sets of the demo models (diffusers_mixdq/demo/plans/<model>/):

    python examples/build_text_encoder_plans.py

Per model, two plan sets in the component layout (one folder per pipeline component, docs/plan-format.md):

* ``te-w8/text_encoder/``: the text encoder alone at W8 weight-only (int8 per output channel, activations in
  floating point), to measure what quantizing the text encoder costs;
* ``w8a8-te-w8/``: the model's bundled W8A8 denoiser plan plus that text-encoder plan (the whole pipeline).

Weight-only int8 needs no calibration; each plan is resolved against the bundled text encoder (class, fingerprint
and layer manifest recorded), so it is refused on another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.families import DENOISER_COMPONENTS

W8 = {"weights": "int8", "activations": "none"}


def text_encoder_plan(model) -> BitPlan:
    path = Path(model.pipeline_path())
    library, class_name = json.loads((path / "model_index.json").read_text())["text_encoder"]
    encoder = getattr(transformers, class_name).from_pretrained(path / "text_encoder")
    plan = BitPlan(defaults=W8, provenance={"built_by": "examples/build_text_encoder_plans.py",
                                            "recipe": "text encoder W8 weight-only (uniform)"})
    return plan.resolve(encoder)


def main() -> None:
    for name in ("shapes", "scenes"):
        model = demo.get_model(name)
        out = model.plans_dir()
        te = text_encoder_plan(model)
        te.save(out / "te-w8" / "text_encoder")
        denoiser = next(c for c in DENOISER_COMPONENTS if (Path(model.pipeline_path()) / c).is_dir())
        BitPlan.load(out / "w8a8").save(out / "w8a8-te-w8" / denoiser)
        te.save(out / "w8a8-te-w8" / "text_encoder")
        print(f"{name}: {out / 'te-w8'}, {out / 'w8a8-te-w8'} ({te.summary().avg_weight_bits:.2f} bits/weight)")


if __name__ == "__main__":
    main()
