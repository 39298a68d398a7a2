"""Packing of signed integer codes into int32 words: the bit layout of compressed-tensors.

A leaf module (torch only): the formats (``compress.checkpoint.formats``) write and read checkpoints with it,
and the kernels (``compress.kernels``) unpack the same words without importing the formats.

Bit layout. Codes and zero points are stored *signed*, ``v = q - 2^(bits-1)`` (compressed-tensors'
convention), and packed as the unsigned ``v + 2^(bits-1)``. Along the packed dimension every run
of values is one little-endian bit stream: value ``i`` occupies stream bits
``[i·bits, (i+1)·bits)`` and int32 word ``k`` holds stream bits ``[32k, 32k + 32)``, bit 0 first.
Two layouts exist, and they differ only for widths that do not divide 32:

* ``dense=True`` (compressed-tensors >= 0.18): one stream per row, ``ceil(n·bits / 32)`` words;
  for 3, 5, 6 and 7 bits a value may straddle two words.
* ``dense=False`` (compressed-tensors <= 0.17): ``32 // bits`` values per word, never straddling;
  the top ``32 mod bits`` bits of each word are unused; ``ceil(n / (32 // bits))`` words.

For 2, 4 and 8 bits the two are the same bits. We write dense (what the pinned library reads)
and read either, choosing by the ``version`` recorded in the checkpoint's config. vLLM serves
only 4 and 8 bits; other widths run on our own runtime (and transformers' dequantizing loader).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_bits(bits: int) -> None:
    """ValueError unless ``bits`` is a width this layout packs (2..8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 to pack into int32, got {bits}")


def _layout(bits: int, dense: bool) -> tuple[int, int]:
    """(values, words) per packing unit: 32 values fill exactly ``bits`` words when dense."""
    return (32, bits) if dense else (32 // bits, 1)


def packed_size(n: int, bits: int, dense: bool = True) -> int:
    """Number of int32 words that hold ``n`` values of ``bits`` bits."""
    check_bits(bits)
    return math.ceil(n * bits / 32) if dense else math.ceil(n / (32 // bits))


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1, *, dense: bool = True) -> torch.Tensor:
    """Pack signed integers in ``[-2^(bits-1), 2^(bits-1))`` into int32 words along ``dim``.

    values: any integer dtype, any shape; size ``n`` along ``dim``.
    Returns int32 of the same shape except ``packed_size(n, bits, dense)`` along ``dim``.
    """
    check_bits(bits)
    half = 1 << (bits - 1)
    u = values.to(torch.int64).movedim(dim, -1) + half  # (..., n) unsigned codes
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        # out-of-range values would spill into their neighbours' bits
        raise ValueError(f"values out of the signed {bits}-bit range [{-half}, {half - 1}]")
    n = u.shape[-1]
    per, words = _layout(bits, dense)
    units = math.ceil(n / per)
    u = F.pad(u, (0, units * per - n)).reshape(*u.shape[:-1], units, per)  # (..., units, per)
    # int64 so that shifting into bit 31 is plain arithmetic; converted to two's complement below
    out = u.new_zeros(*u.shape[:-1], words)  # (..., units, words)
    for i in range(per):
        word, off = divmod(i * bits, 32)
        out[..., word] |= (u[..., i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles (dense only): the high bits open the next word
            out[..., word + 1] |= u[..., i] >> (32 - off)
    # dense units hold whole multiples of 32 values; words past ceil(n·bits/32) are pure padding
    out = out.reshape(*out.shape[:-2], units * words)[..., : packed_size(n, bits, dense)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1, *, dense: bool = True) -> torch.Tensor:
    """Inverse of ``pack_int32``: ``size`` signed values along ``dim`` (int32)."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    p = packed.movedim(dim, -1)  # (..., words)
    if p.shape[-1] != packed_size(size, bits, dense):
        raise ValueError(f"{p.shape[-1]} words along dim {dim} cannot hold exactly {size} {bits}-bit values")
    per, words = _layout(bits, dense)
    units = math.ceil(size / per)
    p = F.pad(p, (0, units * words - p.shape[-1])).reshape(*p.shape[:-1], units, words)
    out = p.new_empty(*p.shape[:-1], per)  # (..., units, per)
    for i in range(per):
        word, off = divmod(i * bits, 32)
        lo = min(bits, 32 - off)  # how many of value i's bits sit in its first word
        # int32 >> is arithmetic (copies the sign bit); the mask keeps only the value's bits
        v = (p[..., word] >> off) & ((1 << lo) - 1)
        if lo < bits:
            v |= (p[..., word + 1] & ((1 << (bits - lo)) - 1)) << lo
        out[..., i] = v
    out = out.reshape(*out.shape[:-2], units * per)[..., :size] - (1 << (bits - 1))
    return out.movedim(-1, dim).contiguous()
