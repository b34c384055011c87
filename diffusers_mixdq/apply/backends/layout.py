"""The stored layout of a quantized weight that the quanto and native backends share (torch-free rules).

Both backends keep optimum-quanto 0.2.7's layout, so checkpoints and plans made with one load into the other:

* int8 / float8: ``weight._data`` of the weight's shape and one scale per output channel (``weight._scale``,
  shape ``(out, 1, ...)``), symmetric (absmax / largest code);
* int4 / int2: the weight flattened to rows of :func:`group_size` values, affine per group (``scale`` =
  (max - min) / (2^bits - 1), ``shift`` = -min, codes ``round((w + shift) / scale)`` in ``[0, 2^bits - 1]``,
  ``w = code * scale - shift``), the codes packed ``8 // bits`` rows to a byte along dim 0 (row ``i`` of block
  ``j`` in bits ``j * bits ...``), saved as ``weight._data._data``, ``weight._scale``, ``weight._shift``
  (``(rows, 1)``, or ``(out, 1, ...)`` when the whole row is one group).
* int3 / int5 / int6 (native backend only; quanto has no such types): grouped and affine as int4 / int2, each
  ``bits``-bit code split into two bit planes (:data:`SPLIT_PLANES`: int3 = 2 + 1 bits, int5 = 4 + 1, int6 = 4 + 2;
  ``code = low | high << low_bits``), each plane packed as above with its own width, the two concatenated along
  dim 0 into ``weight._data._data`` (low plane first). 8 codes take exactly ``bits`` bytes (plus the padding of each
  plane's last block when the rows are not a multiple of 8), the same keys as int4 / int2.
"""

from __future__ import annotations

#: bits of each stored weight dtype
WEIGHT_BITS = {"int8": 8, "float8": 8, "int6": 6, "int5": 5, "int4": 4, "int3": 3, "int2": 2}
#: widths stored as two bit planes: bits -> (low plane bits, high plane bits)
SPLIT_PLANES = {3: (2, 1), 5: (4, 1), 6: (4, 2)}


def packed_rows(bits: int, rows: int) -> int:
    """Rows (dim 0) of the packed codes of ``rows`` rows of ``bits``-bit codes (every width but 8)."""
    planes = SPLIT_PLANES.get(bits, (bits,))
    return sum((rows + 8 // b - 1) // (8 // b) for b in planes)


def group_size(in_features: int) -> int:
    """optimum-quanto's group size for int4 / int2 weights: 128, lowered by 32 until it divides ``in_features``
    (down to 32), else the whole row; rows of 128 elements or fewer are one group."""
    if in_features <= 128:
        return in_features
    for size in (128, 96, 64, 32):
        if in_features % size == 0:
            return size
    return in_features


def storage_bits(bits: int | None, in_features: int, float_bits: int = 16) -> float:
    """Stored bits per weight element: int8 / float8 one ``float_bits`` scale per output channel; int2 ... int6 a
    scale and a shift per group; ``bits=None``: floating point."""
    if bits is None:
        return float(float_bits)
    k = max(in_features, 1)
    if bits == 8:
        return bits + float_bits / k
    return bits + 2 * float_bits / group_size(k)


def weight_key_of(key: str) -> str | None:
    """A saved quantized weight is its inner tensors: ``<module>.weight._data``, ``._scale``, ... -> the weight's
    own key ``<module>.weight``; ``None`` for any other key."""
    i = key.rfind(".weight.")
    return key[: i + len(".weight")] if i >= 0 else None


def piece_keys(bits: int) -> frozenset[str]:
    """The state-dict keys (relative to the module) of a saved quantized weight of ``bits`` bits."""
    if bits == 8:
        return frozenset({"weight._data", "weight._scale"})
    return frozenset({"weight._data._data", "weight._scale", "weight._shift"})


def grouping(shape: tuple[int, ...], bits: int) -> tuple[int, int | None]:
    """``(rows, group)`` of a grouped (2- to 6-bit) weight of ``shape``: ``group`` ``None`` when each output channel is one
    group (quanto then keeps the weight's own shape)."""
    numel = 1
    for s in shape:
        numel *= s
    in_features = numel // shape[0]
    group = group_size(in_features)
    if group == in_features:
        return shape[0], None
    return numel // group, group


def expected_pieces(bits: int, float8: bool, shape: tuple[int, ...]) -> dict[str, tuple]:
    """``{key: (shape, dtype name)}`` of a saved quantized weight (dtype ``None``: the model's float dtype, for
    scales and shifts): see the module docstring."""
    per_channel = (shape[0],) + (1,) * (len(shape) - 1)
    if bits == 8:
        return {"weight._data": (tuple(shape), "float8_e4m3fn" if float8 else "int8"),
                "weight._scale": (per_channel, None)}
    rows, group = grouping(shape, bits)
    data, scale = (tuple(shape[1:]), per_channel) if group is None else ((group,), (rows, 1))
    return {"weight._data._data": ((packed_rows(bits, rows),) + data, "uint8"),
            "weight._scale": (scale, None), "weight._shift": (scale, None)}


class SharedLayout:
    """The size and key rules of this layout, for a :class:`~.base.WeightBackend` that stores it."""

    def storage_bits(self, dtype: str, bits: int | None, in_features: int, float_bits: int = 16) -> float:
        """int8 / float8: one ``float_bits`` scale per output channel; int2 ... int6: a scale and a shift per group."""
        return storage_bits(bits, in_features, float_bits)

    def weight_key_of(self, key: str) -> str | None:
        """A saved quantized weight is its inner tensors: ``<module>.weight._data``, ``._scale``, ..."""
        return weight_key_of(key)


def torch_pieces(bits: int, float8: bool, shape: tuple[int, ...]) -> dict[str, tuple]:
    """:func:`expected_pieces` with torch dtypes (``None`` kept: the model's float dtype)."""
    import torch

    pieces = expected_pieces(bits, float8, shape)
    return {k: (s, None if d is None else getattr(torch, d)) for k, (s, d) in pieces.items()}
