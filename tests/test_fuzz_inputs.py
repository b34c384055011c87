"""Generated sidecars, MixDQConfig arguments, config.json quantization_config entries and pre-quantized checkpoints
(issue #17): each case either works exactly as an independent reading of the format says, or raises one
MixDQError, within 2 s. Seeded like tests/test_fuzz_plans.py; ``FUZZ_CASES`` scales the counts (5000: the default)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SMALLEST_UNET, make_unet, unet_inputs
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError
from diffusers_mixdq.bos import attach_bos
from diffusers_mixdq.plan import BOS_STATE_KEY, state_sha256

SCALE = int(os.environ.get("FUZZ_CASES", "5000")) / 5000
TIME_LIMIT = 2.0


def _count(n: int) -> int:
    return max(1, int(n * SCALE))


class Report:
    """Outcomes of a fuzz run: failures (wrong result, other exception) and slow cases."""

    def __init__(self):
        self.failures: list[tuple[int, str]] = []
        self.slow: list[int] = []

    def run(self, seed: int, call, expect_ok: bool | None, check=None) -> None:
        """``expect_ok``: True (must work, then ``check(result)``), False (must raise MixDQError), None (either)."""
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = call()
            if expect_ok is False:
                self.failures.append((seed, "accepted an input the format forbids"))
            elif check is not None and not check(result):
                self.failures.append((seed, "worked, but wrongly"))
        except MixDQError:
            if expect_ok:
                self.failures.append((seed, "refused a valid input"))
        except Exception as e:  # noqa: BLE001 — the point of the test
            self.failures.append((seed, f"{type(e).__name__}: {str(e)[:160]}"))
        if time.perf_counter() - t0 > TIME_LIMIT:
            self.slow.append(seed)

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} bad cases: {self.failures[:10]}"
        assert not self.slow, f"cases over {TIME_LIMIT} s: {self.slow[:10]}"


# ---------------------------------------------------------------------------------------------- sidecars
def _sidecar_case(rng: random.Random, folder: Path) -> tuple[Path, bool, torch.Tensor | None]:
    """A plan on disk with a generated BOS sidecar; returns (path, valid?, the state when valid)."""
    dim = rng.choice([8, 32, 77])
    state = torch.randn(dim, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    path = attach_bos(BitPlan.uniform("int8"), state).save(folder)
    sidecar = path.with_suffix(".safetensors")
    kind = rng.choice(["ok", "ok", "other state", "other dim", "inf", "nan", "int", "2d", "garbage", "truncated",
                       "missing", "empty", "extra key", "hash edit", "dim edit", "no bos record", "norm edit"])
    tensors = {BOS_STATE_KEY: state}
    if kind == "other state":
        tensors[BOS_STATE_KEY] = state + 1e-3
    elif kind == "other dim":
        tensors[BOS_STATE_KEY] = torch.randn(dim + 1)
    elif kind in ("inf", "nan"):
        bad = state.clone()
        bad[rng.randrange(dim)] = math.inf if kind == "inf" else math.nan
        tensors[BOS_STATE_KEY] = bad
    elif kind == "int":
        tensors[BOS_STATE_KEY] = state.round().to(torch.int32)
    elif kind == "2d":
        tensors[BOS_STATE_KEY] = state.reshape(1, -1)  # same values, kept as a [1, dim] tensor: fine
    elif kind == "extra key":
        tensors["other"] = torch.ones(2)  # unknown sidecar tensors are carried along
    if kind not in ("garbage", "truncated", "missing", "empty"):
        save_file(tensors, str(sidecar))
    elif kind == "garbage":
        sidecar.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    elif kind == "truncated":
        sidecar.write_bytes(sidecar.read_bytes()[: rng.randrange(1, 60)])
    elif kind == "missing":
        sidecar.unlink()
    else:
        sidecar.write_bytes(b"")
    data = json.loads(path.read_text())
    if kind == "hash edit":
        data["target"]["bos"]["sha256"] = "0" * 64
    elif kind == "dim edit":
        data["target"]["bos"]["dim"] = dim * 2
    elif kind == "no bos record":
        del data["target"]["bos"]  # a state nothing records: carried, never used for BOS rows
    elif kind == "norm edit":
        data["target"]["bos"]["norm"] = rng.choice([1e308 * 10, -1.0, "x"])
    path.write_text(json.dumps(data))
    valid = kind in ("ok", "2d", "extra key", "no bos record")
    return path, valid, state


def test_generated_sidecars(tmp_path):
    report = Report()
    for seed in range(_count(600)):
        rng = random.Random(seed)
        path, valid, state = _sidecar_case(rng, tmp_path / str(seed))
        report.run(seed, lambda: BitPlan.load(path), valid,
                   lambda plan: torch.equal(plan.tensors[BOS_STATE_KEY].reshape(-1), state))
    report.check()


# ---------------------------------------------------------------------------------------------- MixDQConfig
GOOD_PLAN = {"format": "diffusers-mixdq-plan", "version": 1, "defaults": {"weights": "int8"}}
PLANS = [
    (GOOD_PLAN, True), (json.dumps(GOOD_PLAN), True), (BitPlan.load(GOOD_PLAN), True),
    (None, False), (123, False), (["int8"], False), (b"{}", False), ({"format": "x"}, False), ("{not json", False),
    ("./no/such/plan.json", False), ("plan.json", False), ({**GOOD_PLAN, "defaults": {"weights": "int7"}}, False),
    ({"file": "mixdq_plan.json", "sha256": "a" * 64}, True), ({"file": 3, "sha256": None}, False),
    ({"file": "../../etc/passwd", "sha256": "0" * 64}, False), ({"file": "a.json", "sha256": "A" * 64}, False), ({"file": "", "sha256": "x"}, False),
    ({"file": "mixdq_plan.json", "sha256": "a" * 64, "provenance": {"source": {"repo_id": "a/b"}}}, True),
]
KWARGS = {
    "strict": [(True, True), (False, True), ("yes", False), (1, False), (None, False)],
    "modules_to_not_convert": [(None, True), ([], True), (["conv_in"], True), ("conv_in", False), ([1], False),
                               (["re:("], False)],
    "revision": [(None, True), ("main", True), (3, False)],
    "subfolder": [(None, True), ("unet", True), ([], False)],
    "quant_method": [("mixdq", True), ("other", False)],
    "bits": [(8, False)],
    "plan_source": [("a/b", True), (5, False)],
}


def _config_case(rng: random.Random):
    plan, ok = rng.choice(PLANS)
    kwargs = {}
    for key, options in KWARGS.items():
        if rng.random() < 0.3:
            value, valid = rng.choice(options)
            kwargs[key] = value
            ok = ok and valid
    if isinstance(plan, str) and plan.startswith("{") and "subfolder" in kwargs:
        pass  # JSON text ignores the subfolder
    return plan, kwargs, ok


def test_generated_config_arguments():
    report = Report()
    for seed in range(_count(1500)):
        rng = random.Random(seed)
        plan, kwargs, ok = _config_case(rng)
        report.run(seed, lambda: MixDQConfig(plan=plan, **kwargs), ok,
                   lambda c: json.loads(c.to_json_string())["quant_method"] == "mixdq")
        if ok:  # what config.json would hold, read back the way diffusers does
            entry = MixDQConfig(plan=plan, **kwargs).to_dict()
            report.run(seed, lambda: MixDQConfig.from_dict(entry), True,
                       lambda c: c.to_dict() == entry)
    report.check()


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    make_unet(**SMALLEST_UNET).save_pretrained(root / "fp")
    plan = attach_bos(BitPlan(defaults={"weights": "int8", "activations": "int8", "act_range": "dynamic"},
                              rules=[{"targets": ["*.ff.*"], "weights": "int4", "activations": "none"},
                                     {"targets": ["*resnets.*.conv1"], "weights": "float8"}],
                              layers={"conv_out": {"weights": "none", "activations": "int8", "act_range": 3.0}}),
                      torch.randn(32, generator=torch.Generator().manual_seed(0)))
    model = UNet2DConditionModel.from_pretrained(root / "fp", quantization_config=MixDQConfig(plan=plan))
    model.save_pretrained(root / "q")
    return root / "q", _run(model)


def _run(model) -> torch.Tensor:
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x, t, e).sample


#: changes a load must accept: none, and a scale stored in fp16 (cast back on load; its rounding moves the output a
#: little, through the dynamic int8 activations downstream)
HARMLESS = {"none": 0.0, "scale to fp16": 0.1}


def _mutate(rng: random.Random, folder: Path) -> str:
    """One change to a saved model; returns its name (refused unless in HARMLESS)."""
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    keys = sorted(k for k in tensors if ".weight." in k or k.endswith((".weight", "bos_input", "bos_output")))
    key = rng.choice(keys)
    kind = rng.choice(["none", "scale to fp16", "drop", "shape", "dtype", "nan scale", "extra piece", "plan edit",
                       "plan edit rehashed", "config sha", "config file"])
    if kind == "scale to fp16":
        key = rng.choice([k for k in keys if k.endswith("._scale")])
        tensors[key] = tensors[key].half()
    elif kind == "drop":
        del tensors[key]
    elif kind == "shape":
        t = tensors[key]
        tensors[key] = torch.zeros((t.shape[0] + 1,) + tuple(t.shape[1:]), dtype=t.dtype)
    elif kind == "dtype":
        t = tensors[key]
        tensors[key] = t.to(torch.int16 if t.is_floating_point() else torch.float32)
    elif kind == "nan scale":
        key = rng.choice([k for k in keys if k.endswith("._scale")])
        tensors[key] = torch.full_like(tensors[key], math.nan)
    elif kind == "extra piece":  # a piece no layer of the plan has (on the float layer: a quantized weight's)
        layer = rng.choice(sorted(json.loads((folder / "mixdq_plan.json").read_text())["layers"]))
        tensors[f"{layer}.weight._data" if f"{layer}.weight" in tensors else f"{layer}.weight._extra"] = \
            torch.zeros(2, dtype=torch.int8)
    save_file(tensors, str(weights))
    if kind.startswith("plan edit"):
        _edit_plan(rng, folder, rehash=kind.endswith("rehashed"))
    elif kind.startswith("config"):
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["plan"]["sha256" if kind == "config sha" else "file"] = "0" * 64
        (folder / "config.json").write_text(json.dumps(config))
    return kind


def _edit_plan(rng: random.Random, folder: Path, rehash: bool) -> None:
    path = folder / "mixdq_plan.json"
    data = json.loads(path.read_text())
    layer = rng.choice(sorted(data["layers"]))
    spec = data["layers"][layer]
    spec["weights"] = rng.choice([w for w in ("int8", "int4", "int2", "float8", "none") if w != spec["weights"]])
    text = json.dumps(data, indent=2) + "\n"
    path.write_text(text)
    if rehash:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["plan"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
        (folder / "config.json").write_text(json.dumps(config))


def test_generated_checkpoints(saved, tmp_path):
    folder, expected = saved
    report = Report()
    for seed in range(_count(40)):
        rng = random.Random(seed)
        case = tmp_path / str(seed)
        case.mkdir()
        for f in folder.iterdir():
            (case / f.name).write_bytes(f.read_bytes())
        kind = _mutate(rng, case)
        report.run(seed, lambda: UNet2DConditionModel.from_pretrained(case), kind in HARMLESS,
                   lambda m: bool(torch.isfinite(out := _run(m)).all())
                   and float((out - expected).norm() / expected.norm()) <= HARMLESS[kind])
    report.check()


def test_state_sha256_is_what_plans_record():
    state = torch.randn(5)
    assert attach_bos(BitPlan.uniform("int8"), state).target["bos"]["sha256"] == state_sha256(state)
