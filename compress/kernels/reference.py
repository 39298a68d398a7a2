"""The torch reference kernels: the CPU path, and the oracle every fast kernel is tested against.

Weight-only (W4A16 / W8A16, any 2..8 bits): ``QuantLinear.dequantize`` (float32, exact:
small integers times a bf16/fp16 scale), cast to the activation dtype, ``F.linear``. This is
exactly what ``QuantLinear.forward`` computed before the kernels existed, so the formats tests
and every exported checkpoint keep their numbers bit for bit on the CPU.

W8A8 (SmoothQuant exports): dynamic symmetric per-token quantization of the activations,

    xs[t] = max_k |x[t, k]| / 127            float32 (tokens, 1)
    xq[t, k] = round_half_even(x[t, k] / xs[t]) clamped to [-127, 127]    int8 (tokens, K)

(an all-zero row gets xs = 0 and xq = 0), an exact int32 GEMM ``acc = xq @ wqᵀ`` and the epilogue
``y = (acc · xs) · ws (+ bias)`` in float32, cast to x's dtype. Every backend uses these exact
formulas and this order of operations, so their results agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def buffers_key(qlinear) -> tuple:
    """Changes whenever a compressed module's own buffers do (a packed layer's codes, scales and
    zero points; a GGUF layer's blocks): in-place loads (load_state_dict, .copy_) bump
    ``_version``; .to(device) changes ``data_ptr``. What the per-module caches check."""
    return tuple((t.data_ptr(), t._version, t.device) for t in qlinear.buffers(recurse=False))


def cache_dense(qlinear, on: bool = True) -> None:
    """Keep (``on``) or stop keeping the module's dequantized weight between calls of this path
    (``QuantLinear.keep_dense``); stopping drops the kept copy."""
    qlinear.__dict__["_keep_dense"] = on
    if not on:
        qlinear.__dict__.pop("_dense", None)


def dense_weight_cached(qlinear) -> torch.Tensor:
    """The dequantized weight, kept per module (rebuilt when its buffers change) where
    ``cache_dense`` asked for it."""
    if not qlinear.__dict__.get("_keep_dense"):
        return qlinear.dequantize()
    key = buffers_key(qlinear)
    hit = qlinear.__dict__.get("_dense")
    if hit is None or hit[0] != key:
        hit = (key, qlinear.dequantize())
        qlinear.__dict__["_dense"] = hit
    return hit[1]


def wna16_linear(x: torch.Tensor, qlinear) -> torch.Tensor:
    """x (..., K) float -> (..., N) in x.dtype, through the dequantized weight (kept between
    calls where ``cache_dense`` asked for it)."""
    w = dense_weight_cached(qlinear).to(x.dtype)  # (N, K)
    return F.linear(x, w, None if qlinear.bias is None else qlinear.bias.to(x.dtype))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (xq int8 (tokens, K), xs float32 (tokens, 1)), tokens = x.numel() // K."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (T, K)
    xs = x2.abs().amax(dim=1, keepdim=True) / 127  # (T, 1); 0 for an all-zero row
    safe = torch.where(xs > 0, xs, torch.ones_like(xs))  # 0 / 1 = 0 keeps a zero row zero, no NaN
    # torch.round rounds half to even; the Triton kernel does the same (see triton_kernels)
    xq = torch.round(x2 / safe).clamp_(-127, 127).to(torch.int8)
    return xq, xs


def quantize_input(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """A WnA8 (WnA4) layer's input as its kernel reads it: each token rounded to symmetric 8-bit
    (4-bit) integers times its own scale, absmax / (2^(bits-1) - 1) (``quantize_per_token``'s rule),
    in x's dtype; x itself where ``bits`` is None. Under autograd the rounding passes the gradient
    straight through."""
    if not bits:
        return x
    if bits == 8:
        xq, xs = quantize_per_token(x.detach())
        y = (xq.float() * xs).reshape(x.shape).to(x.dtype)
    elif bits == 4:
        x2 = x.detach().float()
        xs = x2.abs().amax(dim=-1, keepdim=True) / 7
        y = (torch.round(x2 / torch.where(xs > 0, xs, torch.ones_like(xs))).clamp_(-7, 7) * xs).to(x.dtype)
    else:
        raise ValueError(f"activations are quantized to 8 or 4 bits, not {bits}")
    return x + (y - x).detach() if x.requires_grad else y


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch._int_mm (int8 x int8 -> int32) on CUDA needs more than 16 rows and K, N multiples of
    # 8 (cuBLASLt's int8 GEMM). On the CPU it exists but is a naive loop (30x slower than the
    # float32 GEMM on a 4096 x 1536 x 576 product, measured): the CPU takes the float32 path.
    M, K = a.shape
    return a.device.type == "cuda" and M > 16 and K % 8 == 0 and b.shape[0] % 8 == 0


# K columns per float32 partial product: |a_i · b_i| <= 128 · 128 = 2^14, so a sum of 1024 of
# them stays below 2^24, where float32 holds every integer exactly, in any summation order
_EXACT_F32_K = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ bᵀ``: a int8 (M, K), b int8 (N, K) -> int32 (M, N)."""
    if _int_mm_ok(a, b):
        return torch._int_mm(a.contiguous(), b.t())
    if a.device.type == "cuda":  # shapes cuBLASLt refuses: float64 is exact for any real K
        return (a.double() @ b.double().t()).to(torch.int32)
    acc = None
    for k in range(0, a.shape[1], _EXACT_F32_K):  # exact float32 partials, summed in int32
        part = (a[:, k : k + _EXACT_F32_K].float() @ b[:, k : k + _EXACT_F32_K].float().t()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def int8_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias, dtype) -> torch.Tensor:
    """acc int32 (T, N), xs float32 (T, 1), ws (N, 1) -> (acc · xs) · ws (+ bias), in ``dtype``."""
    y = acc.float() * xs * ws.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K) float; weight int8 (N, K); weight_scale (N, 1) -> (..., N) in x.dtype."""
    xq, xs = quantize_per_token(x)
    y = int8_epilogue(int8_matmul(xq, weight), xs, weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
