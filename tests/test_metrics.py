"""The metric functions behind ``mixdq eval`` against cases with known answers, and the held-out prompt sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffusers_mixdq import demo
from diffusers_mixdq.errors import MixDQError
from diffusers_mixdq.evaluation import (
    SUMMARY_FIELDS,
    VariantResult,
    bootstrap_ci,
    compare,
    describe,
    diverged_count,
    dumps,
    mcnemar_exact,
    per_image_psnr,
    percentile,
    summary,
    wilcoxon_signed_rank,
)
from diffusers_mixdq.demo import prompt_sets
from diffusers_mixdq.evaluation import stats
from diffusers_mixdq.sampling import seconds_per_image

# scipy.stats.wilcoxon's documented example: W = 24, exact two-sided p = 0.041259765625
SCIPY_EXAMPLE = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]


def test_per_image_psnr_known_values_identical_is_inf_and_a_diverged_image_counts():
    ref = torch.full((4, 3, 8, 8), 0.5, dtype=torch.float64)
    images = ref.clone()
    images[1] += 0.1  # MSE 0.01: exactly 20 dB
    images[2] += 0.01  # MSE 1e-4: 40 dB
    images[3] = 1.0 - torch.zeros_like(ref[3])  # another scene: MSE 0.25, about 6 dB
    psnr = per_image_psnr(images, ref)
    assert math.isinf(psnr[0]) and psnr[0] > 0
    assert psnr[1] == pytest.approx(20.0, abs=1e-6) and psnr[2] == pytest.approx(40.0, abs=1e-5)
    assert psnr[3] == pytest.approx(10 * math.log10(4), abs=1e-6)
    assert diverged_count(psnr) == 1  # 20 dB itself is not below the threshold
    assert diverged_count([19.99, 25.0, math.inf]) == 1


def test_percentiles_are_sane_with_infinite_values():
    assert percentile([30.0, math.inf, math.inf], 50) == math.inf
    assert percentile([30.0, 40.0, math.inf, math.inf], 50) == math.inf  # between 40 and inf: inf, not NaN
    assert percentile([10.0, 20.0, 30.0, math.inf], 10) == pytest.approx(13.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(np.median([1, 2, 3, 4]))
    assert percentile(np.arange(101.0), 10) == pytest.approx(10.0)
    assert math.isnan(percentile([], 50))


def test_bootstrap_interval_covers_the_proportion_shrinks_with_n_and_is_seeded():
    small = [True] * 40 + [False] * 10
    large = small * 16
    lo_s, hi_s = bootstrap_ci(small, seed=0)
    lo_l, hi_l = bootstrap_ci(large, seed=0)
    assert lo_s < 0.8 < hi_s and lo_l < 0.8 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # about 1/sqrt(16) as wide
    assert bootstrap_ci(small, seed=0) == (lo_s, hi_s)
    values = np.random.default_rng(0).random(37)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=0)
    assert bootstrap_ci([True] * 30) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_exact_binomial_and_mcnemar_known_values():
    assert stats.binomial_two_sided(1, 10) == pytest.approx(22 / 1024)
    assert stats.binomial_two_sided(5, 10) == 1.0 and stats.binomial_two_sided(0, 0) == 1.0
    a = [True] * 50 + [True] * 9 + [False]
    b = [True] * 50 + [False] * 9 + [True]
    m = mcnemar_exact(a, b)
    assert (m.only_a, m.only_b) == (9, 1) and m.p_value == pytest.approx(22 / 1024)


def test_mcnemar_flags_a_planted_difference_and_not_an_identical_pair():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.9
    worse = base.copy()
    worse[np.flatnonzero(base)[:20]] = False  # 20 images the second variant no longer aligns
    assert mcnemar_exact(base, worse).p_value < 1e-4
    assert mcnemar_exact(base, base).p_value == 1.0


def test_wilcoxon_matches_scipy_exact_and_normal_approximation(monkeypatch):
    w = wilcoxon_signed_rank(SCIPY_EXAMPLE, [0] * len(SCIPY_EXAMPLE))
    assert w.exact and w.statistic == 24 and w.p_value == pytest.approx(0.041259765625, abs=1e-12)
    assert w.rank_biserial == pytest.approx((96 - 24) / 120)
    monkeypatch.setattr(stats, "EXACT_MAX_N", 0)  # the normal approximation: z = (96 - 60) / sqrt(310)
    approx = wilcoxon_signed_rank(SCIPY_EXAMPLE, [0] * len(SCIPY_EXAMPLE))
    assert not approx.exact and approx.p_value == pytest.approx(math.erfc(36 / math.sqrt(310) / math.sqrt(2)))
    assert approx.p_value == pytest.approx(0.0408881329, abs=1e-8)


def test_wilcoxon_with_ties_uses_average_ranks_and_the_tie_correction():
    d = [1, 1, 1, -1, 2, 2, 3]  # |d| ranks: 2.5 x4, 5.5 x2, 7; W- = 2.5
    w = wilcoxon_signed_rank(d, [0] * 7)
    assert not w.exact and w.statistic == 2.5
    var = 7 * 8 * 15 / 24 - ((4**3 - 4) + (2**3 - 2)) / 48
    assert w.p_value == pytest.approx(math.erfc(abs(25.5 - 14) / math.sqrt(var) / math.sqrt(2)))


def test_wilcoxon_flags_a_planted_difference_not_an_identical_pair_and_handles_inf():
    rng = np.random.default_rng(1)
    y = rng.normal(35, 3, 80)
    x = y + 1.0 + rng.normal(0, 0.5, 80)  # 1 dB better, image by image
    w = wilcoxon_signed_rank(x, y)
    assert w.p_value < 1e-6 and w.rank_biserial > 0.9 and w.median_difference == pytest.approx(1.0, abs=0.2)
    same = wilcoxon_signed_rank(y, y)
    assert same.p_value == 1.0 and same.n == 0
    both_inf = wilcoxon_signed_rank([math.inf, 30.0, 31.0], [math.inf, 29.0, 30.0])
    assert both_inf.n == 2 and both_inf.median_difference == 1.0
    assert wilcoxon_signed_rank([math.inf, 30.0], [40.0, 30.0]).rank_biserial == 1.0
    noisy = rng.normal(0, 1, 60)
    assert wilcoxon_signed_rank(noisy, noisy[::-1]).p_value > 0.05


def _result(name, psnr=None, aligned=None, n=8):
    return VariantResult(name=name, denoiser_bytes=1000, seconds_per_image=0.5, avg_weight_bits=4.0,
                         psnr_per_image=psnr, aligned=aligned, ssim=None if psnr is None else 0.9,
                         images=torch.zeros(n, 3, 2, 2))


def test_summary_has_exactly_the_fields_and_null_where_a_metric_does_not_apply():
    fp = summary(_result("FP32"))
    assert tuple(fp) == SUMMARY_FIELDS
    assert fp["psnr_median_db"] is None and fp["diverged"] is None and fp["aligned"] is None
    q = summary(_result("q", psnr=[10.0, 30, 30, 30, 40, 40, 50, math.inf], aligned=[True] * 6 + [False] * 2))
    assert q["psnr_median_db"] == 35.0 and q["diverged"] == 1 and q["aligned"] == 75.0
    lo, hi = q["aligned_ci"]
    assert 0 <= lo < 75 < hi <= 100
    text = dumps([q, {"psnr_median_db": math.inf, "x": [-math.inf, math.nan]}])
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)[1] == {"psnr_median_db": math.inf, "x": [-math.inf, None]}


def test_compare_says_which_is_better_and_how_sure():
    n = 40
    good = _result("mixed", psnr=list(np.linspace(30, 40, n) + 2), aligned=[True] * n, n=n)
    bad = _result("uniform", psnr=list(np.linspace(30, 40, n)), aligned=[True] * 28 + [False] * 12, n=n)
    c = compare(good, bad)
    assert c.mcnemar.only_a == 12 and c.mcnemar.p_value < 0.001 and c.alignment_diff == pytest.approx(30.0)
    assert c.alignment_ci[0] > 0 and c.psnr.p_value < 1e-6
    text = "\n".join(describe(c))
    assert text.count("mixed is better") == 2
    same = "\n".join(describe(compare(good, good)))
    assert "better" not in same and same.count("no significant difference") == 2
    vs_fp = "\n".join(describe(compare(_result("FP32", n=n), bad)))
    assert "does not apply" in vs_fp


def test_seconds_per_image_leaves_out_the_first_batch():
    assert seconds_per_image([5.0, 2.0, 1.0], 40, 16) == pytest.approx(3.0 / 24)
    assert seconds_per_image([4.0], 8, None) == 0.5
    with pytest.raises(ValueError):
        seconds_per_image([1.0], 40, 16)


def test_shapes_prompt_sets_are_disjoint_balanced_seeded_and_documented():
    from diffusers_mixdq.demo.data import SPLIT_SEED, caption_pools, parse_caption

    pools = caption_pools()
    assert [len(p) for p in pools] == [48, 48, 144] and len(set().union(*map(set, pools))) == 240
    assert caption_pools(SPLIT_SEED) == pools and caption_pools(SPLIT_SEED + 1) != pools
    sets = {s: demo.prompt_set("shapes", s, len(p)) for s, p in zip(("calibration", "validation", "test"), pools)}
    assert all(set(sets[s]) == set(p) for s, p in zip(sets, pools))
    test = demo.prompt_set("shapes", "test", 24, seed=0)
    assert test == sets["test"][:24] and test != demo.prompt_set("shapes", "test", 24, seed=1)
    colours = [parse_caption(c)["colour"] for c in test]
    assert sorted(colours.count(c) for c in set(colours)) == [4] * 6  # every prefix is balanced
    many = demo.prompt_set("shapes", "test", 200)
    assert many[144:] == many[:56]  # past the pool, captions come back (with other image seeds)
    with pytest.raises(MixDQError, match="Unknown prompt set 'train'"):
        demo.prompt_set("shapes", "train", 4)
    assert prompt_sets.pool_size("shapes", "test") == 144 and prompt_sets.is_caption("shapes", test[0])
    assert not prompt_sets.is_caption("shapes", "a photo of a cat")


def test_models_by_name():
    assert demo.pipeline_path() == demo.pipeline_path("shapes") == str(demo.get_model("shapes").pipeline_dir)
    assert "shapes" in demo.available_models()
    assert demo.get_model("shapes").generation_settings() == {"steps": 8, "guidance": 3.0, "height": 32,
                                                              "width": 32, "pipe_kwargs": {}}
    if not demo.get_model("scenes").available():
        with pytest.raises(MixDQError, match="scenes/pipeline"):
            demo.pipeline_path("scenes")
    with pytest.raises(MixDQError, match="Unknown demo model"):
        demo.pipeline_path("nope")
    assert demo.model_of_pipeline(demo.pipeline_path()).name == "shapes"
    assert demo.bundled_plan("shapes", "w3a8-mixed") == demo.plans_dir("shapes-extra") / "w3a8-mixed"
    assert demo.bundled_plan("shapes", "nope") is None
