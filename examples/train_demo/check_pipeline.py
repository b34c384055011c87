"""Sanity checks for the bundled demo pipeline.

* loads with ``DiffusionPipeline.from_pretrained`` and reports any logged
  warnings (e.g. missing / unexpected weights),
* the causal text encoder's BOS (token 0) hidden state is identical for
  every prompt, including the empty prompt, with ``padding="max_length"``,
* every caption fits ``model_max_length`` and each caption word is one token,
* time to generate a batch of 8 with the default steps / guidance.

    python examples/train_demo/check_pipeline.py
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from diffusers_mixdq import demo  # noqa: E402
from diffusers_mixdq.demo import data  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    for lib in (diffusers, transformers):
        lib.utils.logging.get_logger().addHandler(handler)
    pipe = DiffusionPipeline.from_pretrained(demo.pipeline_path())
    logged = stream.getvalue().strip()
    print(f"pipeline class: {type(pipe).__name__}; load-time log: {logged or '(none)'}")

    tok, te = pipe.tokenizer, pipe.text_encoder
    captions = [s.caption for s in data.all_combinations()]
    lengths = [len(tok(c).input_ids) for c in captions]
    print(f"tokens per caption incl. BOS/EOS: {min(lengths)}..{max(lengths)} (model_max_length {tok.model_max_length})")
    assert max(lengths) <= tok.model_max_length
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in data.CAPTION_WORDS)

    ids = tok([""] + captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    assert (ids[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        h = te(ids).last_hidden_state
    bos_diff = (h[:, 0] - h[:1, 0]).abs().max().item()
    other_diff = (h[:, 1] - h[:1, 1]).abs().max().item()
    print(f"BOS hidden state max |diff| over {len(ids)} prompts: {bos_diff:.3e} (token 1 for contrast: {other_diff:.3f})")
    assert bos_diff < 1e-5

    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    pipe(demo.DEMO_PROMPTS, num_inference_steps=demo.NUM_INFERENCE_STEPS, guidance_scale=demo.GUIDANCE_SCALE,
         generator=gen)  # warm-up  # fmt: skip
    t0 = time.time()
    images = pipe(demo.DEMO_PROMPTS, num_inference_steps=demo.NUM_INFERENCE_STEPS,
                  guidance_scale=demo.GUIDANCE_SCALE, generator=gen).images  # fmt: skip
    print(f"batch of 8, {demo.NUM_INFERENCE_STEPS} steps, guidance {demo.GUIDANCE_SCALE}: "
          f"{time.time() - t0:.2f}s with {torch.get_num_threads()} thread(s); image size {images[0].size}")  # fmt: skip


if __name__ == "__main__":
    main()
