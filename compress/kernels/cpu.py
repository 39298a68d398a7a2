"""CPU packed-int kernels: the weights stay packed in memory and run through integer kernels:
compress's own AVX-512 kernels where the CPU has AVX-512 BW and BF16 (``native``), torch's
(AVX-512 / AVX2 / AMX, whatever torch's build dispatches to) otherwise.

* **W4A16** ``native.int4_linear`` (layout ``"native"``: codes in ``native.pack``'s layout,
  float32 scales and zero term, exact as stored); without it,
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (layout ``"torch"``): codes in torch's own int4 CPU layout
  (``_convert_weight_to_int4pack_for_cpu``: rows in blocks of 64 on AVX-512 builds, two codes per
  byte), per-group ``(scale, zero)`` pairs; it computes ``Ŵ = (q - 8) · scale + zero``.
* **W8A16** ``torch.ops.aten._weight_int8pack_mm``: signed int8 codes (N, K) with one scale per
  row; grouped scales run one call per group (codes stored (G, N, gs)).
* **W8A8** ``torch.ops.onednn.qlinear_pointwise``: oneDNN's int8 GEMM (VNNI / AMX) on the
  prepacked weight; the per-token activation scales are applied after it. Exact only with VNNI:
  ``int8_unsupported`` probes it once, and without it W8A8 keeps the torch reference. The activations are
  quantized by ``native.quantize_rows`` (one read per row) where it runs.

Exactness. Symmetric codes fold straight in (zero = 0). An asymmetric group's weight is
``(q - z) · s = (q - 8) · s + (8 - z) · s`` (8 bits: 128): the second term is folded into the
kernel's zero where it is exact in the compute dtype, and otherwise added exactly beside it as
``(x summed over the group) @ ((8 - z) · s)`` in float32 (a (G, N) matrix, a few % of the codes'
bytes). Act-order (``g_idx``) columns are permuted so every group is contiguous and the input
permuted the same way at run time. Per-channel scales and group sizes the kernel does not take
(it takes 32, 64, 128, 256) are repeated over the largest of those that divides the group.

The int4/int8 weight-only kernels read the activations in bf16 (fp32 runs them ~70x slower and
fp16 ~40x, measured: the automatic choice keeps those on the torch reference). They are decode kernels: their
cost grows linearly with the tokens (no weight reuse), so above ``PREFILL_TOKENS[bits]`` tokens a call
dequantizes the layer from the packed codes (exactly as the reference does) and runs the dense
GEMM, which is faster there (measured, see BENCHMARKS.md "Serving on the CPU"); the native
kernel's crossover is ``NATIVE_PREFILL_TOKENS``.

What cannot run here (another width, a group size no kernel group divides, N not a multiple of 16
for int4 is padded, K not a multiple of 32) is reported by ``unsupported`` and that layer keeps the
reference path; ``compress.load`` says which layers, once.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.checkpoint.packing import unpack_int32
from compress.kernels import native

INT4_GROUPS = (256, 128, 64, 32)  # the group widths _weight_int4pack_mm_for_cpu takes
# above this many tokens per call: dequantize + dense GEMM, whose cost does not grow per token
# (crossovers measured on 2048 x 5632, benchmarks/bench_cpu_kernels.py: int4 ~96, int8 ~40)
PREFILL_TOKENS = {4: 96, 8: 32}
NATIVE_PREFILL_TOKENS = 16  # compress's own int4 kernel (``native``): its crossover with dequantize + GEMM, measured the same way
COMPUTE_DTYPES = (torch.bfloat16,)  # fp16 activations run the int4 kernel ~40x slower (measured): reference there


def available() -> str | None:
    """Why the CPU integer kernels cannot run in this torch build (None when they can)."""
    ops = torch.ops.aten
    for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"):
        if not hasattr(ops, name):
            return f"this torch build ({torch.__version__}) has no aten.{name}"
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return f"this torch build ({torch.__version__}) has no oneDNN int8 linear"
    if int4_block() is None:
        return "this torch build packs int4 CPU weights in a layout compress does not know"
    return None


@functools.cache
def int8_unsupported() -> str | None:
    """Why oneDNN's int8 GEMM is not exact on this CPU (None when it is). Without VNNI (AVX2 only),
    oneDNN multiplies u8 × s8 pairs with ``vpmaddubsw``, whose int16 pair sums saturate on
    full-range codes: seen here on an AMD EPYC with AVX2, up to 100% off. Checked once on codes
    where saturation shows (127 · 127 · 2 > 32767); W8A8 layers keep the reference where it fails."""
    if available() is not None:
        return available()
    K, N = 64, 16
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    w[:, :2] = 127
    xq = torch.randint(-127, 128, (4, K), generator=g, dtype=torch.int8)
    xq[:, :2] = 127
    want = xq.double() @ w.double().T
    got = _qlinear(xq, build_int8(w, torch.ones(N, 1)), torch.ones(N)).double()
    if not torch.equal(got, want):
        err = float((got - want).abs().max() / want.abs().max())
        return (f"oneDNN's int8 GEMM is not exact on this CPU (no VNNI: its int16 pair sums saturate; off by up to "
                f"{err:.0%} on a probe): W8A8 runs on the torch reference here")
    return None


def kernel_group(gs: int) -> int | None:
    """The largest int4 kernel group width that divides ``gs`` (None: none does)."""
    return next((k for k in INT4_GROUPS if gs % k == 0), None)


def unsupported(bits: int, K: int, gs: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why a weight-only layer (``bits``, K inputs, ``gs`` columns per group) cannot run on the
    CPU kernels; None when it can."""
    if bits not in (4, 8):
        return f"the CPU kernels read 4 or 8-bit weights ({bits}-bit runs on the torch reference)"
    if bits == 4 and kernel_group(gs) is None:
        return f"groups of {gs} columns: the int4 CPU kernel needs groups of a multiple of 32"
    if g_idx is not None:
        counts = torch.bincount(g_idx.long(), minlength=K // gs)
        if bool((counts != gs).any()):
            return "act-order groups of unequal sizes cannot be made contiguous"
    return None


# ----------------------------------------------------------------------------- int4 layout


def _to_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes (N, K), N a multiple of 16 -> torch's int4 CPU layout (N, K/2) uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.cache
def int4_block() -> int | None:
    """Rows per block of this build's int4 CPU layout (64 with AVX-512, 32 with AVX2), read off
    a probe: in a full block, byte (k, d) holds row d (low nibble) and row d + block/2 (high).
    None: a layout this module does not know (the CPU kernels then stay off)."""
    rows = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 2)  # row r holds r // 16
    high = int(_to_int4pack(rows).reshape(-1)[0]) >> 4  # row block/2's value
    return {2: 64, 1: 32}.get(high)


def unpack_int4_t(p: torch.Tensor, Np: int, K: int) -> torch.Tensor:
    """Inverse of ``_to_int4pack``, transposed: (Np, K/2) uint8 -> (K, Np) uint8 codes, exact
    (tested against torch's own packing on full and partial row blocks). Within a row block the
    layout is k-major, so only 64-byte runs move, no byte-level transpose."""
    B = int4_block()
    p = p.reshape(-1)
    full = (Np // B) * B
    out = torch.empty(K, Np, dtype=torch.uint8)
    if full:
        blk = p[: full * K // 2].reshape(full // B, K, B // 2)
        pair = torch.cat([blk & 15, blk >> 4], dim=-1)  # (block, k, B): rows d, then d + B/2
        out[:, :full] = pair.permute(1, 0, 2).reshape(K, full)
    if Np > full:
        tail = p[full * K // 2 :].reshape(K, (Np - full) // 2)
        out[:, full:] = torch.stack([tail & 15, tail >> 4], dim=-1).reshape(K, Np - full)  # rows 2j, 2j + 1
    return out


def unpack_int4(p: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of ``_to_int4pack``: (N, K) uint8 codes (a transposed view of ``unpack_int4_t``)."""
    return unpack_int4_t(p, N, K).t()


# ----------------------------------------------------------------------------- weight-only


@dataclass
class CpuWeights:
    """A weight-only layer in the CPU kernels' layout; replaces the export's packed words in memory.

    codes       int4 ``native``: uint8 (N, K/2) in ``native.pack``'s layout;
                int4 ``torch``: uint8 (Np, K/2) torch's int4 CPU layout, Np = N rounded up to 16;
                int8: int8 (N, K) per-channel, or (G, N, gs) per group (signed: q - 128)
    scale_zero  int4 ``native``: float32 (N, G) scales;  int4 ``torch``: (K / kgs, Np, 2) compute
                dtype;  int8: (N,) or (G, N) scales, compute dtype
    corr        float32 (G, N) or None: (2^(b-1) - z) · s where it is not exact in the compute dtype
                (``native``: always None, the zero term is ``zero``)
    perm        int64 (K,) or None: act-order column order (groups contiguous)
    zero        int4 ``native``: float32 (N, G) zero term (8 - z) · s, or None (symmetric)
    layout      "native" (compress's AVX-512 kernel, ``compress.kernels.native``) or "torch"
    """

    bits: int
    N: int
    K: int
    gs: int  # columns per stored group
    kgs: int  # columns per kernel group (int4)
    dtype: torch.dtype
    codes: torch.Tensor
    scale_zero: torch.Tensor
    corr: torch.Tensor | None
    perm: torch.Tensor | None
    zero: torch.Tensor | None = None
    layout: str = "torch"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale_zero, self.corr, self.perm, self.zero) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _signed_codes(qlinear) -> torch.Tensor:
    """(N, K) int32 signed codes q - 2^(b-1), from the export's words."""
    return unpack_int32(qlinear.weight_packed, qlinear.bits, qlinear.in_features, dim=1, dense=qlinear.dense)


def build(qlinear, dtype: torch.dtype) -> CpuWeights:
    """The CPU layout of a ``QuantLinear``'s buffers for ``dtype`` activations (bf16 / fp16).
    Raises ValueError where ``unsupported`` says so, or where a scale is not exact in ``dtype``."""
    N, K, bits = qlinear.out_features, qlinear.in_features, qlinear.bits
    gs = K if qlinear.group_size == -1 else qlinear.group_size
    g_idx = qlinear.weight_g_idx if hasattr(qlinear, "weight_g_idx") else None
    why = unsupported(bits, K, gs, g_idx)
    if why:
        raise ValueError(why)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"the CPU kernels compute with bf16 activations, not {dtype}")
    s = qlinear.weight_scale.float()  # (N, G)
    if not torch.equal(s.to(dtype).float(), s):
        raise ValueError(f"the {qlinear.weight_scale.dtype} scales are not exact in {dtype}; load with dtype={qlinear.weight_scale.dtype}")
    G = K // gs
    v = _signed_codes(qlinear)  # (N, K) int32, q - 2^(b-1)
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.long(), stable=True)
        v = v[:, perm]
    fold = None
    if not qlinear.symmetric:
        z = unpack_int32(qlinear.weight_zero_point, bits, N, dim=0, dense=qlinear.dense).float()  # z - 2^(b-1)
        fold = -z * s  # (N, G): (2^(b-1) - z) · s, exact in float32
    if bits == 4 and native.missing() is None:  # scales and zero term stay float32: exact as stored
        return CpuWeights(4, N, K, gs, gs, dtype, native.pack(v + 8, gs), s.contiguous(), None, perm,
                          None if fold is None else fold.contiguous(), "native")
    corr = None
    if fold is not None and not torch.equal(fold.to(dtype).float(), fold):
        corr, fold = fold.t().contiguous(), None  # (G, N) float32, added beside the kernel
    if bits == 4:
        kgs = kernel_group(gs)
        Np = -(-N // 16) * 16
        codes = torch.zeros(Np, K, dtype=torch.int32)
        codes[:N] = v + 8
        rep = gs // kgs
        sz = torch.zeros(K // kgs, Np, 2, dtype=dtype)
        sz[:, :N, 0] = s.repeat_interleave(rep, dim=1).t().to(dtype)
        if fold is not None:
            sz[:, :N, 1] = fold.repeat_interleave(rep, dim=1).t().to(dtype)
        return CpuWeights(4, N, K, gs, kgs, dtype, _to_int4pack(codes), sz, corr, perm)
    v8 = v.to(torch.int8)
    if fold is not None:  # int8pack has no zero: exact folded zeros go beside it too
        corr = fold.t().contiguous()
    if G == 1:
        return CpuWeights(8, N, K, gs, gs, dtype, v8.contiguous(), s[:, 0].to(dtype).contiguous(), corr, perm)
    grouped = v8.reshape(N, G, gs).permute(1, 0, 2).contiguous()  # (G, N, gs)
    return CpuWeights(8, N, K, gs, gs, dtype, grouped, s.t().to(dtype).contiguous(), corr, perm)


def _kernel_codes(cw: CpuWeights, transposed: bool = False) -> torch.Tensor:
    """(N, K) signed codes q - 2^(b-1) in the kernel's column order, int8; ``transposed``: (K, N)
    (built so for 4 bits, whose layout decodes that way)."""
    if cw.layout == "native":
        v = native.unpack(cw.codes, cw.gs).view(torch.int8) - 8
        return v.t() if transposed else v
    if cw.bits == 4:
        v = unpack_int4_t(cw.codes, cw.codes.shape[0], cw.K)[:, : cw.N].view(torch.int8) - 8
        return v if transposed else v.t()
    v = cw.codes if cw.codes.dim() == 2 else cw.codes.permute(1, 0, 2).reshape(cw.N, cw.K)
    return v.t() if transposed else v


def codes(cw: CpuWeights) -> torch.Tensor:
    """(N, K) int32 signed codes q - 2^(b-1) in the *stored* column order: the inverse of ``build``."""
    v = _kernel_codes(cw).to(torch.int32)
    if cw.perm is not None:
        out = torch.empty_like(v)
        out[:, cw.perm] = v
        v = out
    return v


def _scales(cw: CpuWeights) -> torch.Tensor:
    """(N, G) float32 scales in stored group order."""
    if cw.layout == "native":
        return cw.scale_zero
    if cw.bits == 4:
        return cw.scale_zero[:: cw.gs // cw.kgs, : cw.N, 0].t().float()
    return cw.scale_zero.float().reshape(-1, cw.N).t() if cw.scale_zero.dim() == 2 else cw.scale_zero.float()[:, None]


def _zero_term(cw: CpuWeights) -> torch.Tensor | None:
    """(N, G) float32 ``(2^(b-1) - z) · s`` (None: symmetric)."""
    if cw.layout == "native":
        return cw.zero
    if cw.corr is not None:
        return cw.corr.t()
    if cw.bits == 4:
        zt = cw.scale_zero[:: cw.gs // cw.kgs, : cw.N, 1].t().float()
        return zt if bool(zt.any()) else None
    return None


def dequantize(cw: CpuWeights, dtype: torch.dtype = torch.float32, transposed: bool = False) -> torch.Tensor:
    """(N, K) in the kernel's column order (permuted for act-order), or (K, N) Ŵᵀ when
    ``transposed`` (what the prefill path multiplies ``x @ Ŵᵀ`` with; 4-bit codes decode that way):
    the reference's Ŵ rounded to ``dtype``, bit for bit: (q - z) · s is exact in float32, and a
    symmetric layer's (q - 8) · s is one correctly rounded product in bf16 as well (computed
    there, a third of the bytes)."""
    zt, s = _zero_term(cw), _scales(cw)  # (N, G)
    work = dtype if zt is None and dtype in COMPUTE_DTYPES and cw.scale_zero.dtype == dtype else torch.float32
    if transposed:  # groups along K, the first dimension
        w = _kernel_codes(cw, transposed=True).to(work).reshape(-1, cw.gs, cw.N)
        s, zt = s.t()[:, None, :], None if zt is None else zt.t()[:, None, :]
    else:
        w = _kernel_codes(cw).to(work).reshape(cw.N, -1, cw.gs)
        s, zt = s[:, :, None], None if zt is None else zt[:, :, None]
    w.mul_(s.to(work))
    if zt is not None:
        w.add_(zt)
    return w.reshape(cw.K, cw.N).to(dtype) if transposed else w.reshape(cw.N, cw.K).to(dtype)


def dequantize_t(cw: CpuWeights, dtype: torch.dtype) -> torch.Tensor:
    """(K, N) Ŵᵀ for the prefill path: 4-bit codes decode transposed; 8-bit ones are stored (N, K)."""
    if cw.layout == "native" and dtype == torch.bfloat16:
        return native.int4_dequant(cw.codes, cw.scale_zero, cw.zero, cw.gs).t()
    return dequantize(cw, dtype, transposed=True) if cw.bits == 4 else dequantize(cw, dtype).t()


def _zero_correction(cw: CpuWeights, x2: torch.Tensor) -> torch.Tensor | None:
    if cw.corr is None:
        return None
    return x2.float().reshape(x2.shape[0], -1, cw.gs).sum(-1) @ cw.corr  # (M, N) float32


def wna16_linear(x: torch.Tensor, cw: CpuWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ Ŵᵀ (+ bias), x (..., K) any float dtype -> (..., N) in x.dtype; computes in
    ``cw.dtype`` (the activations are rounded to it)."""
    out_dtype = x.dtype
    x2 = x.reshape(-1, cw.K).to(cw.dtype)
    if cw.perm is not None:
        x2 = x2.index_select(1, cw.perm)
    M = x2.shape[0]
    if cw.layout == "native":
        if M > NATIVE_PREFILL_TOKENS:
            y = F.linear(x2, native.int4_dequant(cw.codes, cw.scale_zero, cw.zero, cw.gs), None if bias is None else bias.to(x2.dtype))
        else:
            y = native.int4_linear(x2, cw.codes, cw.scale_zero, cw.zero, bias, cw.gs)
        return y.to(out_dtype).reshape(*x.shape[:-1], cw.N)
    if M > PREFILL_TOKENS[cw.bits]:
        y = x2 @ dequantize_t(cw, cw.dtype)
    else:
        if cw.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), cw.codes, cw.kgs, cw.scale_zero)[:, : cw.N]
        elif cw.codes.dim() == 2:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), cw.codes, cw.scale_zero)
        else:
            xg = x2.reshape(M, -1, cw.gs)
            y = None
            for g in range(cw.codes.shape[0]):
                part = torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), cw.codes[g], cw.scale_zero[g])
                y = part if y is None else y.add_(part)
        c = _zero_correction(cw, x2)
        if c is not None:
            y = (y.float() + c).to(cw.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype).reshape(*x.shape[:-1], cw.N)


# ----------------------------------------------------------------------------- W8A8


@dataclass
class CpuInt8:
    """A W8A8 layer's weight prepacked for oneDNN (the int8 codes' only copy in memory)."""

    packed: torch.Tensor  # opaque oneDNN int8 tensor
    scale: torch.Tensor  # float32 (N,)
    N: int
    K: int
    zeros: torch.Tensor  # int64 (N,): the weight zero points oneDNN asks for (all 0, symmetric)

    @property
    def nbytes(self) -> int:
        return self.N * self.K + self.scale.numel() * 4


def build_int8(weight: torch.Tensor, weight_scale: torch.Tensor) -> CpuInt8:
    """int8 (N, K) codes and (N, 1) scales -> oneDNN's prepacked layout."""
    N, K = weight.shape
    return CpuInt8(torch.ops.onednn.qlinear_prepack(weight.contiguous(), [1, K]), weight_scale.float().reshape(N).contiguous(), N, K,
                   torch.zeros(N, dtype=torch.int64))


def _qlinear(xq: torch.Tensor, ci: CpuInt8, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    zeros = ci.zeros
    one = xq.shape[0] == 1
    if one:  # one row takes a oneDNN path ~100x slower on narrow outputs (2048 -> 256: 19 ms vs 0.16 ms for two rows)
        xq = xq.expand(2, -1).contiguous()
    y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, ci.packed, w_scale, zeros, None, 1.0, 0, out_dtype, "none", [], "")
    return y[:1] if one else y


def int8_codes(ci: CpuInt8) -> torch.Tensor:
    """The int8 (N, K) codes back out of the prepacked weight, exactly: the GEMM of the identity
    (integers below 2^24 are exact in the float32 output)."""
    eye = torch.eye(ci.K, dtype=torch.int8)
    return _qlinear(eye, ci, torch.ones(ci.N)).t().round().to(torch.int8).contiguous()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_per_token``, bit for bit, in fewer passes over memory (prefill's
    activations are megabytes per call; the reference's float32 copies cost more than the int8
    GEMM there): the max of |x| in x's own dtype (exact), the division promoting bf16 to float32
    as it reads, rounding and clamping in place. bf16 with compress's CPU kernels (``native``): one
    read of each row."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype == torch.bfloat16 and native.missing() is None:
        return native.quantize_rows(x2)
    xs = x2.abs().amax(dim=1, keepdim=True).float() / 127  # (T, 1)
    safe = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = (x2 / safe).round_().clamp_(-127, 127).to(torch.int8)
    return xq, xs


_last_input = threading.local()


def _quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token(x)``, reused when the previous call of this thread quantized this very
    tensor, unmodified (q/k/v and gate/up read one input: 4 quantizations per decoder layer instead
    of 7). The cache holds the tensor itself, so its memory cannot be reused by another one;
    inference-mode tensors (no version counter) are quantized every time."""
    if x.is_inference():  # no version counter: an in-place change could not be seen
        return quantize_per_token(x)
    hit = getattr(_last_input, "hit", None)
    if hit is not None and hit[0] is x and hit[1] == x._version:
        return hit[2], hit[3]
    xq, xs = quantize_per_token(x)
    _last_input.hit = (x, x._version, xq, xs)
    return xq, xs


def int8_linear(x: torch.Tensor, ci: CpuInt8, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 on oneDNN: per-token int8 x (``quantize_per_token``), acc = xq @ Wᵀ exactly in int32,
    y = acc · ws · xs (+ bias), in x.dtype (the reference's ``(acc · xs) · ws`` to float32
    rounding; for bf16 x, ``acc · ws`` is rounded to bf16 before ``· xs``), the epilogue in place."""
    xq, xs = _quantized(x)
    if x.dtype == torch.bfloat16 and native.missing() is None:  # bf16 out of oneDNN, then one fused pass
        y = native.scale_rows_(_qlinear(xq, ci, ci.scale, torch.bfloat16), xs, bias)
        return y.reshape(*x.shape[:-1], ci.N)
    if x.dtype == torch.bfloat16:  # bf16 straight out of oneDNN: a third of the epilogue's bytes, one more bf16 rounding
        y = _qlinear(xq, ci, ci.scale, torch.bfloat16).mul_(xs.to(torch.bfloat16))
        return (y if bias is None else y.add_(bias.to(y.dtype))).reshape(*x.shape[:-1], ci.N)
    y = _qlinear(xq, ci, ci.scale).mul_(xs)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], ci.N)


def int8_gated_mlp(x: torch.Tensor, gate: CpuInt8, up: CpuInt8, down: CpuInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A W8A8 gated MLP, ``down(SiLU(gate(x)) · up(x))`` (Llama's), in bf16 with compress's CPU
    kernels: x quantized once for gate and up; their bf16 GEMM outputs go straight into
    ``native.silu_mul_quant`` (SiLU, product and down's per-token quantization in one float32
    pass, where the module path writes four bf16 intermediates); down's epilogue adds ``bias``.
    Needs ``native.missing() is None`` and bf16 ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token(x2)
    g = _qlinear(xq, gate, gate.scale, torch.bfloat16)
    u = _qlinear(xq, up, up.scale, torch.bfloat16)
    hq, hs = native.silu_mul_quant(g, u, xs)
    del g, u
    y = native.scale_rows_(_qlinear(hq, down, down.scale, torch.bfloat16), hs, bias)
    return y.reshape(*x.shape[:-1], down.N)
