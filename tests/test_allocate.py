"""The bit-width allocation ILP (diffusers_mixdq.builder.allocate): optimality, budgets, groups, errors."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from diffusers_mixdq.builder.allocate import (
    Allocation,
    AllocationError,
    AllocationProblem,
    BudgetInfeasibleError,
    FixedLayer,
    LayerChoice,
    achievable_range,
    budget_for_size,
    group_budgets,
    pick,
    solve,
    solve_groups,
    sweep,
)
from diffusers_mixdq.errors import MixDQError

FEAS = 1e-9  # slack when brute force checks a budget


def brute_force(problem: AllocationProblem) -> tuple[float, dict[str, int]] | None:
    """Best total score over every combination of candidates that meets the budget, or None if none does."""
    total = problem.total_size
    fixed_bits = sum(f.size * f.bits for f in problem.fixed)
    options = [sorted(l.scores) for l in problem.layers]
    best = None
    for combo in itertools.product(*options):
        avg = (fixed_bits + sum(b * l.size for b, l in zip(combo, problem.layers))) / total
        if problem.mode == "at_most":
            ok = avg <= problem.budget_bits + FEAS
        else:
            ok = problem.budget_bits - problem.tolerance - FEAS <= avg <= problem.budget_bits + problem.tolerance + FEAS
        if not ok:
            continue
        score = sum(l.scores[b] for b, l in zip(combo, problem.layers))
        if best is None or score > best[0]:
            best = (score, {l.name: b for b, l in zip(combo, problem.layers)})
    return best


def check_feasible(problem: AllocationProblem, alloc: Allocation, slack: float = 1e-6) -> None:
    sizes = {l.name: l.size for l in problem.layers} | {f.name: f.size for f in problem.fixed}
    assert set(alloc.choice) == set(sizes)
    for l in problem.layers:
        assert alloc.choice[l.name] in l.scores, "chosen width is not a candidate"
    for f in problem.fixed:
        assert alloc.choice[f.name] == f.bits, "fixed layer moved"
    avg = sum(alloc.choice[n] * s for n, s in sizes.items()) / sum(sizes.values())
    assert avg == pytest.approx(alloc.avg_bits, abs=1e-9)
    assert avg <= alloc.budget_bits + (problem.tolerance if problem.mode == "band" else 0.0) + slack
    if problem.mode == "band":
        assert avg >= alloc.budget_bits - problem.tolerance - slack
    assert alloc.objective == pytest.approx(sum(l.scores[alloc.choice[l.name]] for l in problem.layers), abs=1e-9)


def random_problem(rng: np.random.Generator, mode: str) -> AllocationProblem:
    n = int(rng.integers(2, 8))
    layers = []
    for i in range(n):
        k = int(rng.integers(2, 4))
        widths = sorted(rng.choice([2, 3, 4, 6, 8], size=k, replace=False).tolist())
        scores = {int(b): float(rng.normal()) for b in widths}
        if rng.random() < 0.5:  # half the layers get scores monotone in width, as real sensitivities are
            scores = dict(zip(widths, sorted(scores.values())))
        size = float(np.exp(rng.uniform(np.log(10), np.log(1e6))))
        layers.append(LayerChoice(f"layer{i}", size, "g", scores))
    fixed = []
    if rng.random() < 0.3:
        fixed.append(FixedLayer("fixed0", float(rng.uniform(10, 1e5)), float(rng.choice([8, 16]))))
    tol = float(rng.choice([0.0, 0.02, 0.1, 0.5]))
    probe = AllocationProblem(layers, 4.0, tol, mode, fixed)
    lo, hi = achievable_range(probe)
    if rng.random() < 0.6:  # near a reachable average, so that most instances are feasible
        combo = [rng.choice(sorted(l.scores)) for l in layers]
        total = probe.total_size
        avg = (sum(f.size * f.bits for f in fixed) + sum(b * l.size for b, l in zip(combo, layers))) / total
        budget = avg + float(rng.uniform(-1, 1)) * max(tol, 0.05)
    else:
        budget = float(rng.uniform(lo - 0.3 * (hi - lo), hi + 0.1))
    return AllocationProblem(layers, max(budget, 0.5), tol, mode, fixed)


@pytest.mark.parametrize("mode", ["band", "at_most"])
def test_optimal_against_brute_force(mode):
    rng = np.random.default_rng(1234 if mode == "band" else 4321)
    solved = infeasible = 0
    for _ in range(200):
        problem = random_problem(rng, mode)
        expected = brute_force(problem)
        if expected is None:
            with pytest.raises(BudgetInfeasibleError):
                solve(problem)
            infeasible += 1
            continue
        alloc = solve(problem)
        check_feasible(problem, alloc)
        assert alloc.optimal and alloc.status == "Optimal"
        cold = solve(problem, warm_start=False)  # the greedy warm start must not change the optimum
        assert cold.objective == pytest.approx(alloc.objective, abs=1e-5)
        # the default mip_abs_gap is 1e-6 in score units; nothing feasible can beat the enumeration
        assert alloc.objective == pytest.approx(expected[0], abs=1e-5), (problem, alloc.choice, expected)
        assert alloc.objective <= expected[0] + 1e-9
        solved += 1
    # the generator must exercise both outcomes
    assert solved >= 80 and infeasible >= 10, (solved, infeasible)


def mixdq_like() -> AllocationProblem:
    """Content layers with {2, 4, 8}, quality layers with {4, 8}, and one FP16 layer, as in MixDQ."""
    layers = [
        LayerChoice("attn2.to_k", 1000, "content", {2: 0.90, 4: 0.97, 8: 0.999}),
        LayerChoice("attn2.to_v", 1000, "content", {2: 0.80, 4: 0.95, 8: 0.998}),
        LayerChoice("ff.net.0", 4000, "content", {2: 0.85, 4: 0.96, 8: 0.997}),
        LayerChoice("conv1", 2000, "quality", {4: 20.0, 8: 38.0}),
        LayerChoice("conv2", 2000, "quality", {4: 25.0, 8: 40.0}),
    ]
    fixed = [FixedLayer("conv_in", 1000, 16, "quality")]
    return AllocationProblem(layers, 4.0, 0.02, "band", fixed)


def test_achievable_range_counts_fixed_layers():
    problem = mixdq_like()
    lo, hi = achievable_range(problem)
    # W = 11000; smallest: content 6000 * 2 + quality 4000 * 4 + 1000 * 16 = 44000 -> 4.0
    assert lo == pytest.approx(44000 / 11000)
    assert hi == pytest.approx((10000 * 8 + 16000) / 11000)


def test_infeasible_low_budget_names_smallest_and_largest():
    problem = mixdq_like()
    lo, hi = 44000 / 11000, 96000 / 11000
    for mode in ("band", "at_most"):
        with pytest.raises(BudgetInfeasibleError) as info:
            solve(AllocationProblem(problem.layers, 3.5, 0.02, mode, problem.fixed))
        e = info.value
        assert isinstance(e, MixDQError) and isinstance(e, ValueError)
        assert e.smallest == pytest.approx(lo) and e.largest == pytest.approx(hi) and e.budget == 3.5
        msg = str(e)
        assert "3.5-bit average" in msg and "not reachable" in msg
        assert f"smallest is {lo:.2f} bits" in msg and f"largest {hi:.2f}" in msg
        assert "Raise the budget" in msg


def test_infeasible_high_budget_in_band_mode_names_largest():
    problem = mixdq_like()
    with pytest.raises(BudgetInfeasibleError) as info:
        solve(AllocationProblem(problem.layers, 9.0, 0.02, "band", problem.fixed))
    assert f"largest is {96000 / 11000:.2f} bits" in str(info.value)
    assert "Lower the budget" in str(info.value)
    # a size budget above the maximum is simply met by the widest choice
    alloc = solve(AllocationProblem(problem.layers, 9.0, 0.02, "at_most", problem.fixed))
    assert all(alloc.choice[l.name] == 8 for l in problem.layers)


def test_budget_at_the_edge_is_feasible():
    problem = mixdq_like()
    alloc = solve(AllocationProblem(problem.layers, 44000 / 11000, 0.0, "at_most", problem.fixed))
    assert alloc.counts() == {2: 3, 4: 2}
    alloc = solve(AllocationProblem(problem.layers, 44000 / 11000, 0.0, "band", problem.fixed))
    assert alloc.counts() == {2: 3, 4: 2}


def test_discrete_gap_inside_range_is_reported():
    # one huge layer: averages near 2 or near 8 only, so 5 +- 0.02 is unreachable although 2 <= 5 <= 8
    layers = [LayerChoice("big", 1e6, "g", {2: 0.0, 8: 1.0}), LayerChoice("small", 10, "g", {2: 0.0, 8: 1.0})]
    with pytest.raises(BudgetInfeasibleError) as info:
        solve(AllocationProblem(layers, 5.0, 0.02, "band"))
    assert "discrete" in str(info.value) and "Widen the tolerance" in str(info.value)
    assert info.value.smallest == pytest.approx(2.0) and info.value.largest == pytest.approx(8.0)


def test_fixed_layers_are_respected_and_counted():
    layers = [LayerChoice(f"l{i}", 1000, "g", {2: 0.0, 4: 1.0, 8: 2.0}) for i in range(4)]
    free = solve(AllocationProblem(layers, 4.0, 0.0, "at_most"))
    assert free.choice == {l.name: 4 for l in layers}  # 4+4+4+4 scores 4; any mix with 2s and 8s scores less
    # a 16-bit layer as large as the rest: even all-2-bit free layers average 9 bits overall -> infeasible
    with pytest.raises(BudgetInfeasibleError) as info:
        solve(AllocationProblem(layers, 4.0, 0.0, "at_most", [FixedLayer("conv_in", 4000, 16)]))
    assert info.value.smallest == pytest.approx((4000 * 2 + 4000 * 16) / 8000)
    # at B = 10 the free layers get (10 * 8000 - 64000) / 4000 = 4 bits on average
    alloc = solve(AllocationProblem(layers, 10.0, 0.0, "at_most", [FixedLayer("conv_in", 4000, 16)]))
    assert alloc.choice["conv_in"] == 16 and alloc.fixed == frozenset({"conv_in"})
    assert alloc.avg_bits <= 10.0 + 1e-9
    assert sum(alloc.choice[l.name] for l in layers) / 4 <= 4.0
    assert alloc.choice == {**{l.name: 4 for l in layers}, "conv_in": 16}
    assert alloc.counts() == {4: 4}
    assert alloc.counts(include_fixed=True)[16] == 1


def test_group_budgets_split_by_k():
    problem = mixdq_like()
    for k in (0.6, 0.8, 1.0):
        budgets = group_budgets(problem, k)
        assert budgets["content"] == pytest.approx(k * budgets["quality"])
        # sizes: content 6000, quality 4000 + the FP16 conv_in 1000 (fixed in the quality group)
        assert (6000 * budgets["content"] + 5000 * budgets["quality"]) / 11000 == pytest.approx(problem.budget_bits)


def grouped_problem(mode: str = "band", budget: float = 5.0) -> AllocationProblem:
    """40 layers: content (SSIM-like scores, widths {2, 4, 8}) and quality (dB-like scores, {4, 8}), plus an FP16
    layer in the quality group and one outside every group."""
    rng = np.random.default_rng(7)
    layers = []
    for i in range(40):
        group = "content" if i % 2 else "quality"
        widths = (2, 4, 8) if group == "content" else (4, 8)
        base = rng.uniform(0.5, 0.9) if group == "content" else rng.uniform(5, 20)
        step = 0.05 if group == "content" else 6.0
        scores = {b: float(base + step * math.log2(b) + rng.normal(0, step / 10)) for b in widths}
        layers.append(LayerChoice(f"{group}{i}", float(np.exp(rng.uniform(np.log(1e3), np.log(1e6)))), group, scores))
    fixed = [FixedLayer("conv_in", 5e4, 16, "quality"), FixedLayer("time_embedding", 2e4, 16)]
    return AllocationProblem(layers, budget, 0.02, mode, fixed)


@pytest.mark.parametrize("mode", ["band", "at_most"])
def test_solve_groups_holds_the_budget_and_is_optimal_per_group(mode):
    problem = grouped_problem(mode)
    layers, fixed = problem.layers, problem.fixed
    for k in (0.6, 0.75, 0.9):
        alloc = solve_groups(problem, k)
        check_feasible(problem, alloc)
        assert alloc.k == k and alloc.ratios == {"content": k, "quality": 1.0}
        b = alloc.group_budgets
        assert b["content"] == pytest.approx(k * b["quality"])
        for g in ("content", "quality"):
            if mode == "band":
                assert abs(alloc.group_bits[g] - b[g]) <= problem.tolerance + 1e-6
            else:
                assert alloc.group_bits[g] <= b[g] + 1e-6
            # each group's part is the optimum of that group's own problem at its budget
            sub = AllocationProblem(
                [l for l in layers if l.group == g], b[g], problem.tolerance, mode, [f for f in fixed if f.group == g]
            )
            ref = solve(sub)
            assert alloc.group_objectives[g] == pytest.approx(ref.objective, abs=1e-5)
        # the size-weighted average of the groups (plus the ungrouped fixed layer) is B within the tolerance
        if mode == "band":
            assert abs(alloc.avg_bits - problem.budget_bits) <= problem.tolerance + 1e-6
        else:
            assert alloc.avg_bits <= problem.budget_bits + 1e-6
        assert alloc.objective == pytest.approx(sum(alloc.group_objectives.values()))


def test_solve_groups_infeasible_group_is_named():
    problem = mixdq_like()
    # k = 3: content would need 3x the quality width; quality cannot go below 4 bits, so content needs > 8
    with pytest.raises(BudgetInfeasibleError) as info:
        solve_groups(AllocationProblem(problem.layers, 6.0, 0.02, "band", problem.fixed), 3.0)
    assert info.value.group is not None and "k=3" in str(info.value)


def test_group_ratio_mapping_and_errors():
    problem = grouped_problem()
    a = solve_groups(problem, {"content": 0.8, "quality": 1.0})
    b = solve_groups(problem, 0.8)
    assert a.choice == b.choice and a.k is None and b.k == 0.8
    with pytest.raises(AllocationError, match="missing"):
        solve_groups(problem, {"content": 1.0})
    with pytest.raises(AllocationError, match="content_group"):
        solve_groups(problem, 0.8, content_group="text")


def test_sweep_and_pick():
    problem = grouped_problem()
    cands = sweep(problem, ks=(0.5, 0.75, 1.0, 3.0), budgets=(4.5, 6.0, 20.0), unique=False)
    # out of reach, so skipped: every k at 20 bits; k = 3 (quality would get < 2.6 bits, its narrowest is 4); and
    # (6, 0.5) (quality would need 8.9 bits). The rest come back in sweep order, labelled with budget and k.
    labels = [(c.budget_bits, c.k) for c in cands]
    assert labels == [(4.5, 0.5), (4.5, 0.75), (4.5, 1.0), (6.0, 0.75), (6.0, 1.0)]
    for c in cands:
        check_feasible(AllocationProblem(problem.layers, c.budget_bits, 0.02, "band", problem.fixed), c)
    unique = sweep(problem, ks=(0.5, 0.75, 1.0, 3.0), budgets=(4.5, 6.0, 20.0))
    assert len({tuple(sorted(c.choice.items())) for c in unique}) == len(unique) <= len(cands)

    calls = []

    def evaluate(alloc: Allocation) -> float:  # a stand-in image metric: prefers the average closest to 5.3
        calls.append(alloc)
        return abs(alloc.avg_bits - 5.3)

    best = pick(cands, evaluate)
    assert len(calls) == len(cands)
    assert best is min(cands, key=lambda c: abs(c.avg_bits - 5.3))
    # ties go to the first; NaN never wins; no candidates is an error
    assert pick(cands, lambda c: 1.0) is cands[0]
    assert pick(cands, lambda c: math.nan if c is cands[0] else 2.0) is cands[1]
    with pytest.raises(AllocationError):
        pick([], lambda c: 0.0)
    with pytest.raises(AllocationError, match="NaN"):
        pick(cands, lambda c: math.nan)
    with pytest.raises(BudgetInfeasibleError, match="None of the 2"):
        sweep(problem, ks=(1.0,), budgets=(1.0, 20.0))
    with pytest.raises(BudgetInfeasibleError):
        sweep(problem, ks=(1.0, 3.0), budgets=(6.0,), skip_infeasible=False)


def test_budget_for_size():
    problem = mixdq_like()  # 11000 parameters, 1000 of them fixed at 16 bits
    b = budget_for_size(problem, 0.0055, "MB")  # 5500 bytes -> 44000 bits -> 4 bits on average
    assert b == pytest.approx(4.0)
    assert budget_for_size(problem.layers, 0.0055, fixed=problem.fixed) == pytest.approx(4.0)
    assert budget_for_size(problem, 6000 / 2**20, "MiB", other_bytes=500) == pytest.approx(4.0)
    target_mb = 0.008
    alloc = solve(AllocationProblem(problem.layers, budget_for_size(problem, target_mb), mode="at_most",
                                    fixed=problem.fixed))
    assert alloc.size("MB") <= target_mb + 1e-12
    assert alloc.total_bits == pytest.approx(alloc.avg_bits * problem.total_size)
    with pytest.raises(AllocationError, match="unit"):
        budget_for_size(problem, 1.0, "megabytes")
    with pytest.raises(AllocationError, match="leaves nothing"):
        budget_for_size(problem, 0.001, other_bytes=2000)


def test_determinism():
    rng = np.random.default_rng(0)
    layers = [
        LayerChoice(f"l{i}", float(rng.integers(1e3, 1e6)), "g", {2: 0.0, 4: 1.0, 8: 2.0})  # many exact ties
        for i in range(300)
    ]
    problem = AllocationProblem(layers, 4.5, 0.02)
    first = solve(problem)
    for _ in range(3):
        again = solve(problem)
        assert again.choice == first.choice
        assert list(again.choice) == list(first.choice)
        assert again.objective == first.objective and again.avg_bits == first.avg_bits
    g1 = solve_groups(grouped_problem(), 0.8)
    g2 = solve_groups(grouped_problem(), 0.8)
    names = [l.name for l in grouped_problem().layers] + ["conv_in", "time_embedding"]
    assert g1.choice == g2.choice and list(g1.choice) == names


def test_solver_settings_do_not_change_the_optimum():
    rng = np.random.default_rng(11)
    layers = []
    for i in range(150):
        scores = sorted(rng.normal(size=3).tolist())
        layers.append(LayerChoice(f"l{i}", float(rng.uniform(1e3, 1e6)), "g", dict(zip((2, 4, 8), scores))))
    for mode in ("band", "at_most"):
        problem = AllocationProblem(layers, 4.2, 0.02, mode)
        a = solve(problem)
        b = solve(problem, sub_mip_heuristics=True, time_limit=None, warm_start=False)
        assert a.optimal and b.optimal
        assert a.objective == pytest.approx(b.objective, abs=1e-5)
        # a loose gap may stop early, but never above the optimum and never infeasible
        c = solve(problem, mip_rel_gap=0.5)
        check_feasible(problem, c)
        assert c.objective <= a.objective + 1e-9


def test_result_reports_status_objective_and_time():
    alloc = solve(mixdq_like())
    assert alloc.status == "Optimal" and alloc.optimal and alloc.mip_gap == pytest.approx(0.0, abs=1e-6)
    assert alloc.seconds >= alloc.solver_seconds > 0
    assert math.isfinite(alloc.objective)
    assert "avg" in alloc.summary() and "Optimal" in alloc.summary()


def test_time_limit_yields_a_feasible_or_a_clear_error():
    rng = np.random.default_rng(3)
    layers = []
    for i in range(400):
        scores = sorted(rng.normal(size=3).tolist())
        layers.append(LayerChoice(f"l{i}", float(rng.uniform(1e3, 1e6)), "g", dict(zip((2, 4, 8), scores))))
    problem = AllocationProblem(layers, 4.3, 0.0, "at_most")
    best = solve(problem)
    assert best.optimal
    # no time at all: with the greedy warm start HiGHS still holds a feasible allocation, returned as not optimal
    with pytest.warns(RuntimeWarning, match="before proving optimality"):
        alloc = solve(problem, time_limit=1e-9)
    check_feasible(problem, alloc)
    assert not alloc.optimal and alloc.status == "Time limit reached" and alloc.mip_gap > 0
    assert alloc.objective <= best.objective + 1e-9
    # without it there is no allocation to return: a clear error naming the setting, not an infeasible budget
    with pytest.raises(AllocationError, match="time_limit") as info:
        solve(problem, time_limit=1e-9, warm_start=False)
    assert not isinstance(info.value, BudgetInfeasibleError) and "Time limit reached" in str(info.value)


@pytest.mark.parametrize(
    "problem, match",
    [
        (AllocationProblem([LayerChoice("a", 1, "g", {2: 0.0})] * 2, 4), "more than once"),
        (AllocationProblem([LayerChoice("a", 0, "g", {2: 0.0})], 4), "sizes must be positive"),
        (AllocationProblem([LayerChoice("a", 1, "g", {})], 4), "no candidate widths"),
        (AllocationProblem([LayerChoice("a", 1, "g", {2: math.nan})], 4), "scores must be finite"),
        (AllocationProblem([LayerChoice("a", 1, "g", {2: 0.0})], 4, mode="within"), "Unknown allocation mode"),
        (AllocationProblem([LayerChoice("a", 1, "g", {2: 0.0})], -1), "positive number of bits"),
        (AllocationProblem([LayerChoice("a", 1, "g", {2: 0.0})], 4, tolerance=-0.1), "non-negative"),
        (AllocationProblem([LayerChoice("a", 1, "g", {2: 0.0})], 4, fixed=[FixedLayer("a", 1, 16)]), "more than once"),
        (AllocationProblem([], 4), "no layers"),
    ],
)
def test_bad_input_is_reported(problem, match):
    with pytest.raises(AllocationError, match=match):
        solve(problem)


@pytest.mark.parametrize(
    "options, match",
    [({"time_limit": 0}, "time_limit"), ({"mip_rel_gap": -1}, "mip_rel_gap"), ({"mip_abs_gap": math.nan}, "mip_abs")],
)
def test_bad_solver_settings_are_reported(options, match):
    with pytest.raises(AllocationError, match=match):
        solve(mixdq_like(), **options)
    with pytest.raises(AllocationError, match=match):
        sweep(mixdq_like(), **options)


def test_only_fixed_layers():
    alloc = solve(AllocationProblem([], 16.0, 0.0, "at_most", [FixedLayer("conv_in", 10, 16)]))
    assert alloc.choice == {"conv_in": 16} and alloc.avg_bits == 16 and alloc.status == "Optimal"
    with pytest.raises(BudgetInfeasibleError):
        solve(AllocationProblem([], 8.0, 0.0, "at_most", [FixedLayer("conv_in", 10, 16)]))


def test_allocators_are_looked_up_by_name(monkeypatch):
    from diffusers_mixdq.builder.allocate import ALLOCATORS, GroupProblem, SolverOptions, Solved

    assert "highs" in ALLOCATORS
    calls = []

    def widest(problem: GroupProblem, options: SolverOptions) -> Solved:
        calls.append((problem.group, problem.mode))
        choice = {l.name: max(l.scores) for l in problem.layers}
        return Solved(choice, "Optimal", sum(l.scores[choice[l.name]] for l in problem.layers), 0.0, 0.0, True)

    monkeypatch.setitem(ALLOCATORS._entries, "widest", widest)
    base = mixdq_like()
    problem = AllocationProblem(base.layers, 10.0, 0.02, "at_most", base.fixed)  # all at 8 bits fits
    alloc = solve_groups(problem, 1.0, allocator="widest")
    assert calls == [("content", "at_most"), ("quality", "at_most")]
    assert alloc.choice == {**{l.name: 8 for l in base.layers}, "conv_in": 16}
    assert alloc.choice == solve_groups(problem, 1.0).choice  # scores rise with width: the ILP agrees
    # the reachability check runs before any allocator: an unreachable budget never reaches it
    with pytest.raises(BudgetInfeasibleError):
        solve(AllocationProblem(base.layers, 3.5, 0.02, "at_most", base.fixed), allocator="widest")
    assert len(calls) == 2
    with pytest.raises(MixDQError, match="Unknown allocator 'nope'"):
        sweep(problem, allocator="nope")
