"""The bundled ``scenes`` demo model (two objects + a relation, PixArt-Sigma DiT): data, prompt sets,
pipeline and scorer.  Fast (CPU, a few seconds)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from diffusers_mixdq.demo import scenes_data as sd


def test_captions_round_trip_and_grammar():
    caps = sd.all_captions()
    assert len(caps) == len(set(caps)) == 1440
    for c in caps[::37]:
        assert sd.format_caption(**sd.parse_caption(c)) == c
    assert sd.parse_caption("a red circle to the left of a blue square") == {
        "colour1": "red", "shape1": "circle", "relation": "left of", "colour2": "blue", "shape2": "square"}
    for bad in ("a red circle left of a blue square", "a red circle above a red square", "a red circle"):
        with pytest.raises(ValueError):
            sd.parse_caption(bad)


def test_canonical_layout_of_equivalent_captions():
    a = sd.canonical(sd.parse_caption("a red circle to the left of a blue square"))
    b = sd.canonical(sd.parse_caption("a blue square to the right of a red circle"))
    assert a == b == {"axis": "horizontal", "colour_a": "red", "shape_a": "circle", "colour_b": "blue",
                      "shape_b": "square"}


def test_rendered_scene_matches_its_relation():
    rng = np.random.default_rng(0)
    for cap in ("a red circle to the left of a blue square", "a green cross below a white triangle"):
        scene = sd.scene_from_caption(cap, rng)
        img = sd.render(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.float32
        red = (img[..., 0] > 0.7) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
        if "left" in cap:
            assert scene.xy1[0] + 10 < scene.xy2[0]
            assert np.nonzero(red)[1].mean() < 16
        else:
            assert scene.xy1[1] > scene.xy2[1] + 10
    # deterministic
    assert np.array_equal(sd.render_batch(sd.sample_scenes(8, seed=3)), sd.render_batch(sd.sample_scenes(8, seed=3)))


def test_prompt_sets_disjoint_balanced_and_deterministic():
    sets = sd.prompt_sets()
    assert sets == sd.prompt_sets()
    assert {k: len(v) for k, v in sets.items()} == {"calibration": 256, "validation": 256, "test": 256}
    names = list(sets)
    for i in range(3):
        assert len(set(sets[names[i]])) == 256
        for j in range(i + 1, 3):
            assert not set(sets[names[i]]) & set(sets[names[j]])
    # disjoint even up to re-phrasing (same canonical layout)
    keys = {k: {tuple(sd.canonical(sd.parse_caption(c)).values()) for c in v} for k, v in sets.items()}
    assert not keys["test"] & (keys["calibration"] | keys["validation"])
    rel = [sd.parse_caption(c)["relation"] for c in sets["test"]]
    assert min(rel.count(r) for r in sd.RELATION_NAMES) >= 50
    assert sd.test_prompts(256) == sets["test"]


def test_scorer_reads_rendered_scenes():
    from diffusers_mixdq.demo.scenes_scorer import load_scorer

    scorer = load_scorer()
    scenes = sd.sample_scenes(256, seed=4242)
    images = torch.from_numpy(sd.render_batch(scenes))
    prompts = [s.caption for s in scenes]
    result = scorer.score(images, prompts)
    assert result["all"] >= 0.95 and len(result["aligned"]) == 256
    # a prompt with the two objects swapped is not aligned, but the objects are right
    swapped = [sd.format_caption(s.colour2, s.shape2, s.relation, s.colour1, s.shape1) for s in scenes[:32]]
    per = scorer.per_image(images[:32], swapped)
    assert per["aligned"].float().mean() <= 0.05 and per["colour"].float().mean() >= 0.9
    assert scorer.features(images[:4]).shape[0] == 4


def test_bundled_pipeline_generates():
    from diffusers import DiffusionPipeline, PixArtSigmaPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = DiffusionPipeline.from_pretrained(sd.pipeline_path())
    assert isinstance(pipe, PixArtSigmaPipeline)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sd.pipeline_kwargs()
    out = pipe(sd.DEMO_PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sd.SCENES_DIR) for f in fs)
    assert size <= 40 * 2**20


def test_tokenizer_marks_the_second_object():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(sd.pipeline_path(), "tokenizer"))
    a = tok("a red circle to the left of a blue square").input_ids
    b = tok("a blue square to the left of a red circle").input_ids
    assert len(a) == 11 and a[-1] == tok.eos_token_id
    assert sorted(a) != sorted(b)  # not a bag of words: the roles have their own ids
    assert tok("").input_ids == [tok.eos_token_id]


def test_bundled_pipeline_quantizes_with_mixdq():
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel

    from diffusers_mixdq import BitPlan, MixDQConfig

    plan = BitPlan.uniform(weights="int8", activations="int8", act_range="dynamic",
                           ignore=["pos_embed.proj", "proj_out"])
    tr = PixArtTransformer2DModel.from_pretrained(sd.pipeline_path(), subfolder="transformer",
                                                  quantization_config=MixDQConfig(plan=plan))
    q = DiffusionPipeline.from_pretrained(sd.pipeline_path(), transformer=tr)
    fp = DiffusionPipeline.from_pretrained(sd.pipeline_path())
    kwargs = dict(sd.pipeline_kwargs(), output_type="pt")
    outs = []
    for pipe in (fp, q):
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(sd.DEMO_PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kwargs).images)
    mse = (outs[0] - outs[1]).pow(2).mean().item()
    assert 0 < mse and 10 * np.log10(1 / mse) > 25
