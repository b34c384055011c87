"""A pre-quantized checkpoint checked against its plan before any weight is loaded.

The safetensors headers of the checkpoint files give every tensor's name, shape and dtype without reading the
tensors. For each layer of the resolved plan the checkpoint must hold exactly what the plan says: the pieces of a
quantized weight of the planned dtype with the shapes the weight backend gives them, or a plain floating-point
``weight`` of the layer's shape, and the BOS rows of BOS-aware layers. Any disagreement (a plan or config edited by
hand, a corrupted tensor, weights from another save) is one :class:`~diffusers_mixdq.errors.MixDQError` listing
the first differences, never a weight silently left on the meta device or a crash at the first forward.

Also here: casting the floating-point pieces of a saved quantized weight (scales, shifts) to the dtype the model is
loaded in, so a checkpoint saved in fp16 / bf16 reloads in any supported dtype.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import MixDQError

#: safetensors dtype names -> torch dtypes (those a diffusers checkpoint can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
#: the model dtypes a floating piece of a quantized weight (scale, shift) may be stored in
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: header bytes read at most (a header lists names, shapes and offsets only)
_MAX_HEADER = 100 * 2**20

Header = dict[str, tuple[tuple[int, ...], Any]]


def read_headers(checkpoint_files: Sequence[str]) -> Header | None:
    """``{key: (shape, torch dtype)}`` over every safetensors checkpoint file; ``None`` when some file is not
    safetensors (then only the checks made while loading apply)."""
    header: Header = {}
    for file in checkpoint_files or ():
        if not str(file).endswith(".safetensors"):
            return None
        header.update(_read_header(Path(file)))
    return header


def _read_header(path: Path) -> Header:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            raw = json.loads(f.read(size))
        return {k: (tuple(int(s) for s in v["shape"]), _DTYPES.get(v["dtype"], v["dtype"]))
                for k, v in raw.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise MixDQError(f"The checkpoint file {path} is not a readable safetensors file ({e}). Re-download or "
                         "re-save the model.") from None


def check_checkpoint(header: Header | None, specs: Mapping[str, Any], table: Mapping[str, Any],
                     expected_pieces, model_shapes: Mapping[str, tuple[int, ...]] = {}) -> None:
    """Raise :class:`MixDQError` unless every layer's tensors in ``header`` are what its spec says.

    ``specs``: layer -> :class:`~diffusers_mixdq.LayerSpec`; ``table``: layer -> ``LayerInfo``;
    ``expected_pieces(name, spec, info)``: ``{key: (shape, dtype or None for a model float dtype)}`` of a
    quantized weight, from the weight backend; ``model_shapes``: the shapes of the model's other tensors (biases,
    norms, embeddings), which must match too."""
    if header is None:
        return
    by_layer: dict[str, dict[str, tuple]] = {}
    for key, value in header.items():
        layer, _, rest = key.partition(".weight")
        if layer in table and (rest == "" or rest.startswith(".")):
            by_layer.setdefault(layer, {})["weight" + rest] = value
    problems = []
    for name, spec in specs.items():
        want = _wanted(name, spec, table[name], expected_pieces)
        problems += _differences(name, spec, by_layer.get(name, {}), want)
        problems += _bos_differences(name, spec, table[name], header)
    problems += [f"'{key}' is {list(header[key][0])} in the checkpoint, but {list(shape)} in the model"
                 for key, shape in model_shapes.items()
                 if key in header and header[key][0] != tuple(shape)
                 and not (key.endswith(".weight") and key[: -len(".weight")] in table)]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise MixDQError(
            "This pre-quantized checkpoint does not match its plan (mixdq_plan.json / config.json):\n  - "
            + "\n  - ".join(shown)
            + "\nThe plan or config.json was edited, or the weights come from another save. Restore the files saved "
            "together, or quantize the full-precision model again and save it with save_pretrained."
        )


def _wanted(name: str, spec, info, expected_pieces) -> dict[str, tuple]:
    if spec.weights == "none":
        return {"weight": (tuple(info.shape), None)}
    return dict(expected_pieces(name, spec, info))


def _differences(name: str, spec, have: dict[str, tuple], want: dict[str, tuple]) -> list[str]:
    what = f"{spec.weights} weights" if spec.weights != "none" else "a floating-point weight"
    if set(have) != set(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        return [f"'{name}': the plan says {what}, but the checkpoint "
                + (f"lacks {', '.join(missing)}" if missing else "")
                + (" and " if missing and extra else "")
                + (f"has {', '.join(extra)}" if extra else "")]
    out = []
    for key, (shape, dtype) in want.items():
        got_shape, got_dtype = have[key]
        ok_dtype = got_dtype in FLOAT_DTYPES if dtype is None else got_dtype == dtype
        if got_shape != shape or not ok_dtype:
            out.append(f"'{name}.{key}' is {list(got_shape)} {_dtype_name(got_dtype)}; {what} need "
                       f"{list(shape)} {_dtype_name(dtype)}")
    return out


def _bos_differences(name: str, spec, info, header: Header) -> list[str]:
    bos = bool(spec.flags.get("bos_aware")) and spec.is_quantized
    out = []
    for key, size in (("bos_input", info.in_features), ("bos_output", info.shape[0])):
        entry = header.get(f"{name}.{key}")
        if bos and entry is None:
            out.append(f"'{name}' is BOS-aware in the plan, but the checkpoint has no '{name}.{key}'")
        elif not bos and entry is not None:
            out.append(f"'{name}' is not BOS-aware in the plan, but the checkpoint has '{name}.{key}'")
        elif bos and (entry[0] != (size,) or entry[1] not in FLOAT_DTYPES):
            out.append(f"'{name}.{key}' is {list(entry[0])} {_dtype_name(entry[1])}; the layer needs [{size}] float")
    return out


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float16/bfloat16/float32"
    return str(dtype).replace("torch.", "")


def cast_floating_pieces(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pieces of a saved quantized weight with scales and shifts in ``dtype`` (the stored data untouched)."""
    return {k: (v.to(dtype) if not k.endswith("_data") and v.dtype in FLOAT_DTYPES else v)
            for k, v in tensors.items()}


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating tensors holding NaN or infinity (a quantized weight's scales must be finite)."""
    return [k for k, v in tensors.items() if v.dtype in FLOAT_DTYPES and not bool(torch.isfinite(v).all())]


def check_small_buffers(modules: Mapping[str, torch.nn.Module]) -> None:
    """Activation scales and BOS rows read from a checkpoint must be finite (else every output is NaN)."""
    bad = []
    for name, module in modules.items():
        buffers = {k: getattr(module, k, None) for k in ("input_scale", "output_scale", "bos_input", "bos_output",
                                                          "act_group_scales", "outlier_scale")}
        bad += [f"{name}.{k}" for k in non_finite({k: v for k, v in buffers.items() if isinstance(v, torch.Tensor)})]
    if bad:
        raise MixDQError(f"This checkpoint holds NaN or infinite values in {', '.join(bad[:8])}: it is corrupted. "
                         "Re-download or re-save the model.")
