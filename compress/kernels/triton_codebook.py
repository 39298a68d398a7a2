"""Triton lookup-dequantize GEMM for non-uniform codebook layers (SqueezeLLM,
``compress.quant.codebook_module.CodebookLinear``): ``y (M, N) = x (M, K) @ Ŵᵀ`` where row r of Ŵ
is its table looked up at its codes, ``Ŵ[r, j] = tables[r, codes[r, j]]``.

The codes stay in the export's layout (each row one least-significant-bit-first stream of
``bits``-bit codes, ``codebook_module.pack_codes``): code j of a row starts at bit j·bits, in byte
(j·bits) >> 3 at shift (j·bits) & 7, and may run into the next byte (3-bit codes do), so a program
reads the two bytes around each code and shifts. The table entry is then gathered from the row's
2^bits entries (a few hundred bytes per tile: cached), rounded to x's dtype as the torch
reference rounds the looked-up weight, and multiplied on ``tl.dot`` with float32 accumulation.

Under ``TRITON_INTERPRET=1`` (CPU, CI) the dot runs on float32 copies, and bf16 rounding is
emulated, for the reasons ``triton_kernels`` gives (its ``rtne_bf16`` is reused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels.triton_kernels import interpreting, rtne_bf16

DECODE = {"BM": 16, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 2}
PREFILL = {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 2}
DECODE_MAX_M = 16


@triton.jit
def _codebook_kernel(
    X, C, T, B, Y,
    M, N, K, KB, stride_xm, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    ENTRIES: tl.constexpr = 1 << BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        bit = offs_k * BITS
        byte = bit >> 3
        ok = n_ok[:, None] & k_ok[None, :]
        row = C + offs_n[:, None] * KB
        lo = tl.load(row + byte[None, :], mask=ok, other=0).to(tl.int32)
        hi = tl.load(row + byte[None, :] + 1, mask=ok & (byte + 1 < KB)[None, :], other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (bit & 7)[None, :]) & (ENTRIES - 1)  # (BN, BK)
        w = tl.load(T + offs_n[:, None] * ENTRIES + code, mask=ok, other=0.0).to(tl.float32)  # the looked-up Ŵ tile
        if EMULATE_BF16:
            w = rtne_bf16(w)
        else:
            w = w.to(X.dtype.element_ty)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16:
        acc = rtne_bf16(acc)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def codebook_gemm(x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp16/fp32; codes uint8 (N, ⌈K/8⌉·bits) as exported; tables (N, 2^bits) ->
    (M, N) in x.dtype: the torch reference's ``x @ (tables gathered at the codes, in x.dtype)ᵀ``
    (+ bias in x.dtype), up to float32 summation order."""
    M, K = x.shape
    N, KB = codes.shape
    if tables.shape != (N, 1 << bits) or KB != -(-K // 8) * bits or codes.dtype != torch.uint8:
        raise ValueError(f"codebook_gemm: codes {tuple(codes.shape)} {codes.dtype} and tables {tuple(tables.shape)} "
                         f"do not hold {N} rows of {K} {bits}-bit codes")
    x = x if x.stride(-1) == 1 else x.contiguous()
    interp = interpreting()
    cfg = {**(DECODE if M <= DECODE_MAX_M else PREFILL), **(config or {})}
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _codebook_kernel[grid](
        x, codes.contiguous(), tables.contiguous(), b if b is not None else tables, y,
        M, N, K, KB, x.stride(0), y.stride(0),
        BITS=bits, HAS_BIAS=b is not None, DOT_F32=interp or x.dtype == torch.float32,
        EMULATE_BF16=interp and x.dtype == torch.bfloat16,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
