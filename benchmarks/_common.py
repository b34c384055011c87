"""What the peer benchmarks share: the variants (MixDQ plans and the peers' diffusers configs), sizes, memory.

A variant is a name and how to load a denoiser with it: a float dtype, or a ``quantization_config`` for
``from_pretrained`` (diffusers-mixdq's ``MixDQConfig``, diffusers' ``QuantoConfig`` / ``TorchAoConfig`` /
``SDNQConfig``). Peers are used with their documented defaults; nothing is tuned for this benchmark.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark.

    ``family``: "FP", "MixDQ" or a peer's name. ``dtype``: the float dtype the model is loaded in (quantized
    variants compute in it too). ``plan``: for MixDQ, the plan's name (a plan packaged in ``diffusers_mixdq/demo/plans``
    on the demo model; a stand-in allocation with the same budget on the real-size UNets, see ``peers_size.py``).
    ``weight_bits``: the nominal weight width, for the plot's labels. ``weights_only``: the plan's weight widths
    with activations left in floating point (a diagnostic row). ``real_size``: also run on the real-size UNets."""

    name: str
    family: str
    dtype: str = "float32"
    plan: str | None = None
    peer: str | None = None
    weight_bits: float = 32.0
    weights_only: bool = False
    real_size: bool = True


VARIANTS: list[Variant] = [
    Variant("FP32", "FP", "float32"),
    Variant("FP16", "FP", "float16", weight_bits=16),
    Variant("BF16", "FP", "bfloat16", weight_bits=16, real_size=False),  # slower than FP16 on CPUs without bf16
    Variant("MixDQ W8A8", "MixDQ", plan="w8a8", weight_bits=8),
    Variant("MixDQ W5A8 mixed", "MixDQ", plan="w5a8-mixed", weight_bits=5),
    Variant("MixDQ W4A8 mixed", "MixDQ", plan="w4a8-mixed", weight_bits=4),
    # on the real-size UNets the uniform and the mixed W4A8 plan have the same size: the mixed one stands for both
    Variant("MixDQ W4A8 uniform", "MixDQ", plan="w4a8-uniform", weight_bits=4, real_size=False),
    Variant("MixDQ W4A16 mixed", "MixDQ", plan="w4a8-mixed", weight_bits=4, weights_only=True, real_size=False),
    Variant("MixDQ W3A8 mixed", "MixDQ", plan="w3a8-mixed", weight_bits=3),
    Variant("quanto int8", "quanto", peer="quanto-int8", weight_bits=8),
    Variant("quanto int4", "quanto", peer="quanto-int4", weight_bits=4),
    Variant("torchao int8wo", "torchao", peer="torchao-int8wo", weight_bits=8),
    Variant("SDNQ uint4", "SDNQ", peer="sdnq-uint4", weight_bits=4),
]
BY_NAME = {v.name: v for v in VARIANTS}


def demo_plan_dir(plan: str) -> Path:
    """Directory of a demo plan packaged with diffusers_mixdq: bundled (``demo/plans/shapes``) or built for the
    benchmarks (``demo/plans/shapes-extra``)."""
    from diffusers_mixdq import demo

    try:
        return demo.plan_path(plan)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Build it with `python examples/build_demo_plans.py --only {plan}`.") from None


def without_activations(plan):
    """``plan`` with every layer's activations left in floating point (weights, flags and tensors kept)."""
    from diffusers_mixdq import BitPlan

    data = plan.to_dict()
    data["layers"] = {name: {k: v for k, v in spec.items() if k not in ("activations", "act_range")}
                      | {"activations": "none"} for name, spec in data["layers"].items()}
    data["provenance"] = {**data.get("provenance", {}), "derived": "activations removed (weights only)"}
    new = BitPlan.from_dict(data)
    new.tensors = dict(plan.tensors)  # the BOS row of the BOS-aware K/V layers
    return new


def demo_plan(variant: Variant):
    """The plan of a MixDQ variant on the demo model."""
    from diffusers_mixdq import BitPlan

    plan = BitPlan.load(demo_plan_dir(variant.plan))
    return without_activations(plan) if variant.weights_only else plan


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def peer_config(peer: str):
    """The diffusers quantization config of a peer, with the peer's defaults."""
    if peer in ("quanto-int8", "quanto-int4"):
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=peer.split("-")[1])
    if peer == "torchao-int8wo":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if peer == "sdnq-uint4":
        from diffusers import SDNQConfig

        return SDNQConfig(weights_dtype="uint4")
    raise ValueError(f"unknown peer {peer!r}")


def load_kwargs(variant: Variant, plan=None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``variant`` (``plan``: the MixDQ plan source to use)."""
    from diffusers_mixdq import MixDQConfig

    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(variant.dtype)}
    if variant.family == "MixDQ":
        kwargs["quantization_config"] = MixDQConfig(plan=plan)
    elif variant.peer is not None:
        kwargs["quantization_config"] = peer_config(variant.peer)
    return kwargs


def tensor_storage_bytes(t, float_bytes: int | None = None) -> int:
    """Bytes a tensor holds; tensor subclasses (torchao, quanto) are opened into their inner tensors, since their
    ``element_size()`` is the logical (float) dtype's. ``float_bytes``: count floating-point elements at that many
    bytes (2: the size the same model would have with its unquantized tensors in 16-bit floats)."""
    import torch

    total = 0
    for inner in _plain_tensors(t):
        if float_bytes is not None and inner.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            total += inner.numel() * float_bytes
        else:
            total += inner.numel() * inner.element_size()
    return total


def storage_bytes(module, float_bytes: int | None = None) -> int:
    """Bytes of every tensor in ``module``'s state dict, as held in memory (quantized weights as packed);
    ``float_bytes`` as in :func:`tensor_storage_bytes`."""
    return sum(tensor_storage_bytes(t, float_bytes) for t in module.state_dict().values())


def _plain_tensors(t):
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _plain_tensors(getattr(t, n))
    else:
        yield t


def touch(module) -> None:
    """Read one element per page of every tensor ``module`` holds (inner tensors of subclasses included), so that
    weights still memory-mapped from the checkpoint become resident, as a first forward would make them."""
    import torch

    with torch.no_grad():
        for t in module.state_dict().values():
            for inner in _plain_tensors(t):
                if inner.numel() and inner.device.type == "cpu":
                    inner.detach().reshape(-1)[::1024].float().sum()


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def saved_bytes(model, directory: Path) -> tuple[int | None, str | None]:
    """Bytes of ``model.save_pretrained(directory)`` (safetensors; pickle where the peer needs it), or the error."""
    import shutil

    try:
        try:
            model.save_pretrained(directory)
        except Exception:  # e.g. a tensor subclass safetensors cannot hold
            shutil.rmtree(directory, ignore_errors=True)
            model.save_pretrained(directory, safe_serialization=False)
        return dir_bytes(directory), None
    except Exception as e:  # noqa: BLE001 - reported in the table
        return None, error_line(e)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def error_line(e: BaseException) -> str:
    """The exception's type and first line of message (for a table cell / JSON)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process, so the next :class:`PeakMemory` block sees
    only its own peak (Linux: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """The machine, for the results: CPU model and count, memory, Python and library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "diffusers", "optimum-quanto", "torchao", "sdnq", "diffusers-mixdq"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "packages": versions}


def quiet() -> None:
    """Silence diffusers' and transformers' progress bars and advisory warnings in a measuring process."""
    import warnings

    os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass
