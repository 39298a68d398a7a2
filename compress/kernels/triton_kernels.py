"""Triton kernels: W4A16/W8A16 GEMM with in-loop dequantization, per-token int8 quantization,
and the W8A8 int8 GEMM. Same results as ``reference`` up to float32 summation order.

Weight-only GEMM ``y (M, N) = x (M, K) @ Ŵᵀ``, reading ``KernelWeights`` (see the package
docstring: codes int32 (N, K / (32 / bits)) exactly as exported, scales (N, G) in their stored
dtype, optional int8 zero points (N, G), optional int32 g_idx (K,)). Per K tile of BK columns a
program loads BK / (32 / bits) words per output row, spreads them to (BN, BK) codes with shifts
and a reshape (each word is read from memory once), forms Ŵ = (q - 2^(b-1) - z) · s in float32,
rounds it to x's dtype (as the oracle does) and accumulates ``x · Ŵᵀ`` in float32 with tl.dot.

* decode (M <= 16): one 16-row M tile, and split-K: the K range is cut into SPLIT slices so that
  about four programs per SM stream disjoint parts of the weight even when N / BN is small; each
  slice writes float32 partials (SPLIT, M, N) that one torch sum reduces (deterministic, no atomics).
* prefill (M > 16): a plain tiled GEMM, no split.

Scales: when a K tile never straddles a group (BK divides the group size, or per-channel scales)
one (BN,) scale vector is loaded per tile; with g_idx (act-order, or group sizes without a
power-of-two factor >= 16) scales and zero points are gathered per column.

The tile sizes below are starting points chosen without a GPU at hand (this module was written on
a CPU-only machine); ``config=`` overrides them so ``compress/kernels/bench.py`` (``compress bench``) can tune on a GPU.

Under ``TRITON_INTERPRET=1`` (CPU, CI) the dot runs on float32 copies of the same bf16/fp16
operands: Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly (it multiplies the raw
bits), and float32 holds every bf16/fp16 value exactly, so the check of the dequantization and
the indexing is unchanged. Its float32 -> bf16 cast truncates, so there ``rtne_bf16`` rounds
to nearest-even as compiled Triton and torch do (EMULATE_BF16; never set on a GPU). The interpreter is chosen when ``@triton.jit`` runs, i.e. when this
module is first imported: set TRITON_INTERPRET before importing it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

DECODE = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
PREFILL = dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)
INT8 = dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)
INT8_DECODE = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
DECODE_MAX_M = 16
PROGRAMS_PER_SM = 4  # split-K target: enough programs in flight to stream the weight from every SM


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_dtype(x_dtype, interpreting):
    return tl.float32 if interpreting or x_dtype == torch.float32 else None


@triton.jit
def rtne_bf16(x):
    """float32 -> the nearest bf16 value (ties to even), kept in float32. Only under the
    interpreter, whose float32 -> bf16 cast truncates; compiled Triton casts with RTNE already."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _wna16_kernel(
    X, W, S, Z, GI, B, Y,
    M, N, K, KW, G, gs, stride_xm, stride_ym, k_per_split,
    BITS: tl.constexpr, HAS_Z: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS  # codes per int32 word
    BKW: tl.constexpr = BK // PER  # words per row per K tile
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    shifts = tl.arange(0, PER) * BITS  # (PER,)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_k * k_per_split  # a multiple of BK
    # stop at K: a tile starting past K would read the group k0 // gs = G, past its row's scales
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        offs_w = k0 // PER + tl.arange(0, BKW)
        words = tl.load(W + offs_n[:, None] * KW + offs_w[None, :], mask=n_ok[:, None] & (offs_w < KW)[None, :], other=0)  # (BN, BKW)
        # (BN, BKW, PER) -> (BN, BK): code j of word w is column w·PER + j (row-major reshape)
        q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BN, BK))
        v = q - (1 << (BITS - 1))  # signed code, int32
        if HAS_GIDX:
            g = tl.load(GI + offs_k, mask=k_ok, other=0)  # (BK,) group of each column
            sz_mask = n_ok[:, None] & k_ok[None, :]
            s = tl.load(S + offs_n[:, None] * G + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)  # (BN, BK)
            if HAS_Z:
                v = v - tl.load(Z + offs_n[:, None] * G + g[None, :], mask=sz_mask, other=0).to(tl.int32)
        else:
            g = k0 // gs  # the tile lies inside one group: BK divides gs, or gs = K (per channel)
            s = tl.load(S + offs_n * G + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]  # (BN, 1)
            if HAS_Z:
                v = v - tl.load(Z + offs_n * G + g, mask=n_ok, other=0).to(tl.int32)[:, None]
        w = v.to(tl.float32) * s  # Ŵ tile (BN, BK), float32 (exact: small integer times a 16-bit scale)
        if EMULATE_BF16:
            w = rtne_bf16(w)
        else:
            w = w.to(X.dtype.element_ty)  # rounded to x's dtype, as the oracle's Ŵ
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:  # split-K: float32 partials (SPLIT, M, N), summed by the caller
        tl.store(Y + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EMULATE_BF16:
            acc = rtne_bf16(acc)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewer programs is faster and still exercises the split


def _block_k(kw, bk: int) -> int:
    """Largest power of two <= bk that keeps a K tile inside one group (>= 16 for tl.dot)."""
    if kw.g_idx is not None or kw.gs == kw.K:
        return bk
    return min(bk, kw.gs & -kw.gs)  # kernel_weights() put a g_idx on group sizes with a factor < 16


def wna16_gemm(x: torch.Tensor, kw, bias: torch.Tensor | None = None, config: dict | None = None, split_k: int | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp16/fp32 -> (M, N) in x.dtype (``kw``: KernelWeights)."""
    M, K = x.shape
    N = kw.N
    if K != kw.K:
        raise ValueError(f"x has {K} features, the layer reads {kw.K}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    interp = interpreting()
    decode = M <= DECODE_MAX_M
    cfg = {**(DECODE if decode else PREFILL), **(config or {})}
    BM, BN = cfg["BM"], cfg["BN"]
    BK = max(_block_k(kw, cfg["BK"]), 32 // kw.bits)
    ktiles = triton.cdiv(K, BK)
    ntiles, mtiles = triton.cdiv(N, BN), triton.cdiv(M, BM)
    if split_k is None:
        split_k = max(1, min(ktiles, math.ceil(PROGRAMS_PER_SM * _sm_count(x.device) / (ntiles * mtiles)))) if decode else 1
    split_k = max(1, min(split_k, ktiles))
    k_per_split = triton.cdiv(ktiles, split_k) * BK
    split_k = triton.cdiv(K, k_per_split)  # drop slices that would start past K
    b = None if bias is None else bias.to(x.dtype)  # the oracle adds bias.to(x.dtype)
    partial = split_k > 1
    y = torch.empty((split_k, M, N) if partial else (M, N), device=x.device, dtype=torch.float32 if partial else x.dtype)
    dummy = kw.qweight  # pointer for absent optional tensors (never read)
    _wna16_kernel[(mtiles, ntiles, split_k)](
        x, kw.qweight, kw.scales,
        kw.zeros if kw.zeros is not None else dummy,
        kw.g_idx if kw.g_idx is not None else dummy,
        b if (b is not None and not partial) else dummy, y,
        M, N, K, kw.qweight.shape[1], kw.scales.shape[1], kw.gs, x.stride(0), N, k_per_split,
        BITS=kw.bits, HAS_Z=kw.zeros is not None, HAS_GIDX=kw.g_idx is not None, HAS_BIAS=b is not None and not partial,
        PARTIAL=partial, DOT_F32=interp or x.dtype == torch.float32, EMULATE_BF16=interp and x.dtype == torch.bfloat16,
        BM=BM, BN=BN, BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not partial:
        return y
    out = y.sum(0)  # (M, N) float32
    if b is not None:
        out += b.float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- W8A8


@triton.jit
def _quant_kernel(X, XQ, XS, K, stride_xm, BLOCK: tl.constexpr):
    """One program per row: absmax, scale = absmax / 127, codes = round-half-even(x / scale)."""
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):  # pass 1: absmax
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.max(amax, axis=0), 127.0)  # correctly rounded, as torch's division
    safe = tl.where(s > 0, s, 1.0)  # an all-zero row: 0 / 1 = 0
    tl.store(XS + row, s)
    for k0 in range(0, K, BLOCK):  # pass 2: codes (the row is re-read from L2)
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, safe)
        r = tl.floor(v + 0.5)  # exact for |v| <= 128
        # ties (v = n + 1/2) go to the even neighbour, like torch.round
        r = tl.where((r - v == 0.5) & ((r.to(tl.int32) & 1) == 1), r - 1.0, r)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(XQ + row * K + offs, r.to(tl.int8), mask=offs < K)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) float -> (xq int8 (T, K), xs float32 (T, 1))."""
    T, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    xq = torch.empty((T, K), device=x.device, dtype=torch.int8)
    xs = torch.empty((T, 1), device=x.device, dtype=torch.float32)
    if T:
        block = min(triton.next_power_of_2(K), 4096)
        _quant_kernel[(T,)](x, xq, xs, K, x.stride(0), BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return xq, xs


@triton.jit
def _int8_gemm_kernel(A, B, XS, WS, BIAS, Y, M, N, K, stride_ym,
                      HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y = (xq @ wqᵀ as int32) · xs · ws (+ bias): A int8 (M, K), B int8 (N, K)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        a = tl.load(A + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(B + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)  # exact: int8 products, int32 sums
    xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
    ws = tl.load(WS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None]
    y = y * ws[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16:
        y = rtne_bf16(y)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_gemm(xq, xs, weight, weight_scale, bias, dtype, config: dict | None = None) -> torch.Tensor:
    """xq int8 (M, K), xs float32 (M, 1), weight int8 (N, K), weight_scale (N,) -> (M, N) ``dtype``."""
    M, K = xq.shape
    N = weight.shape[0]
    cfg = {**(INT8_DECODE if M <= DECODE_MAX_M else INT8), **(config or {})}
    y = torch.empty((M, N), device=xq.device, dtype=dtype)
    w = weight if weight.is_contiguous() else weight.contiguous()
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _int8_gemm_kernel[grid](
        xq, w, xs.reshape(M).contiguous(), weight_scale.contiguous(), bias if bias is not None else xs, y, M, N, K, N,
        HAS_BIAS=bias is not None, EMULATE_BF16=interpreting() and dtype == torch.bfloat16, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
