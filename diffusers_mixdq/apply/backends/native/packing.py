"""Quantizing, packing and dequantizing weights in the shared quanto layout (:mod:`..layout`), with torch only.

The numerics are optimum-quanto 0.2.7's: int8 / float8 symmetric per output channel (scale = absmax / largest
code, computed in the weight's dtype), int4 / int2 affine per group (MaxOptimizer: scale = (max - min) /
(2^bits - 1), shift = -min). A weight quantized here equals, bit for bit, one quantized by the quanto backend,
and dequantizing repeats quanto's operations in quanto's order (``code * scale - shift``). int3 / int5 / int6
(this backend's own) are grouped and affine the same way, their codes stored as two bit planes
(:data:`~..layout.SPLIT_PLANES`).
"""

from __future__ import annotations

import torch

from ..layout import SPLIT_PLANES, grouping, packed_rows

FLOAT8 = torch.float8_e4m3fn
_FLOAT8_MAX = float(torch.finfo(FLOAT8).max)


def quantize_symmetric(w: torch.Tensor, float8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale)`` of an 8-bit weight: int8 codes (or float8 values), one scale per output channel."""
    dims = tuple(range(1, w.dim()))
    qmax = _FLOAT8_MAX if float8 else 127.0
    scale = torch.amax(torch.abs(w), dim=dims, keepdim=True) / qmax
    data = w / scale
    if float8:
        return torch.clamp(data, -_FLOAT8_MAX, _FLOAT8_MAX).to(FLOAT8), scale
    return torch.clamp(torch.round(data), -128, 127).to(torch.int8), scale


def quantize_affine(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed codes, scale, shift)`` of a 2- to 6-bit weight, grouped (and 4 / 2-bit packed) as quanto does."""
    rows, group = grouping(tuple(w.shape), bits)
    base = w.reshape(rows, -1)
    rmin = torch.amin(base, dim=1, keepdim=True)
    rmax = torch.amax(base, dim=1, keepdim=True)
    scale = (rmax - rmin) / (2**bits - 1)
    shift = -rmin
    codes = torch.clamp(torch.round((base + shift) / scale), 0, 2**bits - 1).to(torch.uint8)
    if group is None:  # one group per output channel: quanto keeps the weight's own shape
        per_channel = (w.shape[0],) + (1,) * (w.dim() - 1)
        codes, scale, shift = codes.reshape(w.shape), scale.reshape(per_channel), shift.reshape(per_channel)
    return pack(codes, bits), scale, shift


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``8 // bits`` blocks of rows to a byte along dim 0: row ``i`` of block ``j`` in bits ``j * bits``."""
    per_byte = 8 // bits
    rows = codes.shape[0]
    block = (rows + per_byte - 1) // per_byte
    packed = torch.zeros((block,) + tuple(codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for j in range(per_byte):
        part = codes[j * block : min((j + 1) * block, rows)]
        packed[: part.shape[0]] |= part << (bits * j)
    return packed


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes packed along dim 0: quanto's layout for 4 / 2 bits; int3 / int5 / int6 as two such planes, the
    low bits then the high bits, concatenated."""
    if bits not in SPLIT_PLANES:
        return _pack_plane(codes, bits)
    low, high = SPLIT_PLANES[bits]
    return torch.cat([_pack_plane(codes & (2**low - 1), low), _pack_plane(codes >> low, high)])


def _plane_rows(packed: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``start:stop`` of one plane packed by :func:`_pack_plane` (uint8, flattened after dim 0), read from
    the blocks holding them."""
    block = packed.shape[0]
    flat = packed.reshape(block, -1)
    codes = torch.empty((stop - start, flat.shape[1]), dtype=torch.uint8, device=packed.device)
    for j in range(8 // bits):
        lo, hi = max(start, j * block), min(stop, (j + 1) * block)
        if lo < hi:
            torch.bitwise_right_shift(flat[lo - j * block : hi - j * block], bits * j,
                                      out=codes[lo - start : hi - start])
    return codes.bitwise_and_(2**bits - 1)


def _unpack_rows(packed: torch.Tensor, bits: int, rows: int, start: int, stop: int) -> torch.Tensor:
    """Codes ``start:stop`` of the ``rows`` codes :func:`pack` packed (both planes of int3 / int5 / int6)."""
    if bits not in SPLIT_PLANES:
        return _plane_rows(packed, bits, start, stop)
    low, high = SPLIT_PLANES[bits]
    n_low = packed_rows(low, rows)
    codes = _plane_rows(packed[:n_low], low, start, stop)
    return codes.bitwise_or_(_plane_rows(packed[n_low:], high, start, stop).bitwise_left_shift_(low))


def unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The codes of :func:`pack` (``rows`` of them, uint8)."""
    return _unpack_rows(packed, bits, rows, 0, rows).view((rows,) + tuple(packed.shape[1:]))


def dequantize_channels(data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, bits: int,
                        shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Output channels ``start:stop`` of the weight of ``shape`` from its stored pieces, in fresh memory of the
    scales' dtype, computed in place on it in quanto's order (``code * scale - shift``): the eager CPU path,
    which dequantizes a large weight a slice at a time."""
    out = torch.empty((stop - start,) + tuple(shape[1:]), dtype=scale.dtype, device=data.device)
    if bits == 8:
        return out.copy_(data[start:stop]).mul_(scale[start:stop])
    rows = grouping(tuple(shape), bits)[0]
    per = rows // shape[0]  # stored rows (groups) per output channel
    lo, hi = start * per, stop * per
    out.view(hi - lo, -1).copy_(_unpack_rows(data, bits, rows, lo, hi)).mul_(scale.view(rows, 1)[lo:hi]).sub_(
        shift.view(rows, 1)[lo:hi])
    return out


def dequantize(data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, bits: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """The weight from its stored pieces, out of place in few fusable ops (the traced / compiled path)."""
    if bits == 8:
        return data.to(scale.dtype) * scale
    rows, group = grouping(shape, bits)
    low, high = SPLIT_PLANES.get(bits, (bits, 0))
    n_low = packed_rows(low, rows)
    codes = _plane_codes(data[:n_low], low, rows)
    if high:
        codes = torch.bitwise_or(codes, torch.bitwise_left_shift(_plane_codes(data[n_low:], high, rows), low))
    return (codes.to(scale.dtype) * scale - shift).reshape(shape)


def _plane_codes(data: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    parts = [torch.bitwise_and(torch.bitwise_right_shift(data, bits * j), 2**bits - 1) for j in range(8 // bits)]
    return torch.cat(parts)[:rows]
