"""Generated plans, valid and broken: each either resolves exactly as an independent reading of the format says, or
raises one MixDQError, and never takes more than 2 s (issue #17).

The generator is seeded (no hypothesis shrinking needed: a failure prints the case's seed and the plan), so a run is
reproducible: ``pytest tests/test_fuzz_plans.py -k seed`` and ``FUZZ_CASES=20000`` for a longer soak.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import random
import re
import time
import warnings

import pytest

from diffusers_mixdq import BitPlan, MixDQError
from diffusers_mixdq.plan import layer_table

from conftest import make_unet

CASES = int(os.environ.get("FUZZ_CASES", "5000"))
TIME_LIMIT = 2.0
WEIGHTS = ["int8", "int4", "int2", "float8", "none"]
ACTS = ["int8", "int4", "float8", "none"]
BAD_DTYPES = ["int7", "INT8", "fp8", "", "int16", 8, None, ["int8"]]
#: patterns whose naive backtracking explodes; none of them matches a layer name (no '!' / 'b' / 'y' at the end)
CATASTROPHIC = ["re:(.|.)*!", "re:(a+)+b", "re:(x*)*y", "re:(.*a){25}"]
BAD_REGEX = ["re:(", "re:[a-", "re:*x", "re:(?P<n>a)(?P<n>b)"]


@pytest.fixture(scope="module")
def unet():
    return make_unet()


@pytest.fixture(scope="module")
def names(unet):
    return list(layer_table(unet))


# ---------------------------------------------------------------------- the generator
def _act_range(rng: random.Random):
    good = [0.5, 3.0, 17.25, 1000.0, "dynamic"]
    bad = [0, -1.0, math.nan, math.inf, -math.inf, 1e300, int("9" * 401), "Dynamic", "", True, [1.0]]
    return rng.choice(bad) if rng.random() < 0.15 else rng.choice(good)


def _spec(rng: random.Random) -> dict:
    spec = {}
    if rng.random() < 0.8:
        spec["weights"] = rng.choice(BAD_DTYPES) if rng.random() < 0.05 else rng.choice(WEIGHTS)
    if rng.random() < 0.6:
        spec["activations"] = rng.choice(BAD_DTYPES) if rng.random() < 0.05 else rng.choice(ACTS)
    if rng.random() < 0.6:
        spec["act_range"] = _act_range(rng)
    if rng.random() < 0.02:
        spec[rng.choice(["weight", "bits", "act-range"])] = "int8"
    return spec


def _pattern(rng: random.Random, names: list[str]) -> str:
    name = rng.choice(names)
    parts = name.split(".")
    r = rng.random()
    if r < 0.3:
        return name
    if r < 0.55:
        return "*" + parts[-1] if rng.random() < 0.5 else "*." + ".".join(parts[-2:])
    if r < 0.7:
        return "re:" + re.escape(parts[0]) + r"\..*"
    if r < 0.8:
        return rng.choice(["*attn2.*", "*.ff.*", "conv_*", "*resnets.0.*", "*", "*.to_q"])
    if r < 0.87:
        return rng.choice(["*.does_not_exist", "conv_inn", "re:nope.*", "down_blocks.9.*"])
    if r < 0.94:
        return rng.choice(CATASTROPHIC)
    return rng.choice(BAD_REGEX)


def make_case(seed: int, names: list[str]) -> dict:
    rng = random.Random(seed)
    plan: dict = {"format": "diffusers-mixdq-plan", "version": 1}
    if rng.random() < 0.7:
        plan["defaults"] = _spec(rng)
    if rng.random() < 0.6:
        plan["rules"] = [
            {"targets": [_pattern(rng, names) for _ in range(rng.randint(1, 3))], **_spec(rng)}
            for _ in range(rng.randint(1, 4))
        ]
    if rng.random() < 0.4:
        plan["ignore"] = [_pattern(rng, names) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        picked = rng.sample(names, rng.randint(1, 4))
        if rng.random() < 0.05:
            picked.append(rng.choice(["nope.layer", "conv_norm_out", "time_proj"]))
        plan["layers"] = {n: _spec(rng) for n in picked}
    if rng.random() < 0.03:
        plan[rng.choice(["layer", "Defaults", "rule"])] = {}
    return plan


# ---------------------------------------------------------------------- the independent reading of the format
class Invalid(Exception):
    pass


def _check_spec(spec) -> None:
    allowed = {"weights", "activations", "act_range", "flags", "targets", "note"}
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise Invalid("spec keys")
    if "weights" in spec and spec["weights"] not in WEIGHTS:
        raise Invalid("weights")
    if "activations" in spec and spec["activations"] not in ACTS:
        raise Invalid("activations")
    r = spec.get("act_range")
    if r is not None and r != "dynamic":
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise Invalid("act_range type")
        try:
            value = float(r)
        except OverflowError:
            raise Invalid("act_range overflow") from None
        if not (math.isfinite(value) and 0 < value <= 1e6):
            raise Invalid("act_range value")


def _match(pattern: str, name: str) -> bool:
    if pattern in CATASTROPHIC:
        return False
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error:
            raise Invalid("regex") from None
    return fnmatch.fnmatchcase(name, pattern)


def expected(plan: dict, names: list[str], strict: bool) -> dict | None:
    """The resolved ``{layer: (weights, activations, act_range)}``, or raises Invalid."""
    if set(plan) - {"format", "version", "defaults", "rules", "ignore", "layers"}:
        raise Invalid("top-level keys")
    for spec in [plan.get("defaults", {})] + plan.get("rules", []) + list(plan.get("layers", {}).values()):
        _check_spec(spec)
    for name in plan.get("layers", {}):
        if name not in names:
            raise Invalid("unknown layer")
    rules, ignore = plan.get("rules", []), plan.get("ignore", [])
    for p in [p for r in rules for p in r["targets"]] + ignore:
        if p in BAD_REGEX:
            raise Invalid("regex")
    out, uncovered, rule_hits, ignore_hits = {}, [], set(), set()
    for name in names:
        spec = dict(plan.get("defaults", {}))
        covered = "defaults" in plan
        for i, rule in enumerate(rules):
            if any(_match(p, name) for p in rule["targets"]):
                rule_hits.add(i)
                covered = True
                spec.update({k: v for k, v in rule.items() if k in ("weights", "activations", "act_range")})
        for p in ignore:
            if _match(p, name):
                ignore_hits.add(p)
                covered = True
                spec = {"weights": "none", "activations": "none"}
        if name in plan.get("layers", {}):
            covered = True
            spec.update(plan["layers"][name])
        if not covered:
            uncovered.append(name)
            spec = {}
        w, a = spec.get("weights", "none"), spec.get("activations", "none")
        r = spec.get("act_range") if a != "none" else None
        if a != "none" and r is None:
            raise Invalid("static activations without range")
        out[name] = (w, a, r if r == "dynamic" or r is None else float(r))
    if strict and (uncovered or len(rule_hits) < len(rules) or set(ignore) - ignore_hits):
        raise Invalid("strict")
    return out


# ---------------------------------------------------------------------- the test
def _run(case: dict, unet, strict: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = BitPlan.load(case).resolve(unet, strict=strict)
    return {n: (s.weights, s.activations, s.act_range) for n, s in resolved.layer_specs().items()}


def test_generated_plans_resolve_exactly_or_raise_one_clear_error(unet, names):
    failures, slow = [], []
    for seed in range(CASES):
        case = make_case(seed, names)
        strict = seed % 3 != 0
        try:
            want = expected(case, names, strict)
        except Invalid:
            want = None
        t0 = time.perf_counter()
        try:
            got = _run(case, unet, strict)
            outcome = "ok"
        except MixDQError:
            got, outcome = None, "MixDQError"
        except Exception as e:  # noqa: BLE001 — the point of the test
            got, outcome = None, f"{type(e).__name__}: {str(e)[:120]}"
        if time.perf_counter() - t0 > TIME_LIMIT:
            slow.append(seed)
        if outcome not in ("ok", "MixDQError"):
            failures.append((seed, outcome))
        elif want is None and outcome == "ok":
            failures.append((seed, "accepted a plan the format forbids"))
        elif want is not None and outcome == "ok" and got != want:
            failures.append((seed, "resolved differently from the format"))
        elif want is not None and outcome != "ok" and not _only_catastrophic(case):
            failures.append((seed, "refused a valid plan"))
        if len(failures) >= 10:
            break
    detail = "\n".join(f"seed {s}: {why}\n  {json.dumps(make_case(s, names), default=str)[:400]}" for s, why in failures)
    assert not failures, f"{len(failures)} bad cases:\n{detail}"
    assert not slow, f"cases over {TIME_LIMIT} s: {slow[:10]}"


def _only_catastrophic(case: dict) -> bool:
    """A plan using a catastrophic regex may be refused (a pattern engine without backtracking limits cannot run it)."""
    patterns = [p for r in case.get("rules", []) for p in r.get("targets", [])] + case.get("ignore", [])
    return any(p in CATASTROPHIC for p in patterns)
