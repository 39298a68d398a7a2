"""The dispatcher: which backend runs each packed-int call, and the kernel layout of the weights.

Four backends compute the same functions (see ``reference`` for the exact definitions):

* ``torch``  (``reference.py``): dequantize then ``F.linear``; W8A8 through ``torch._int_mm``.
  Runs everywhere; the float32 CPU path and the oracle of every test.
* ``cpu``    (``cpu.py``): integer CPU kernels with bf16 activations: W4A16 on compress's own
  AVX-512 kernel (``native.py``, built with the C compiler at first use) or torch's
  ``_weight_int4pack_mm_for_cpu``, W8A16 ``_weight_int8pack_mm``, W8A8 oneDNN ``qlinear_pointwise``.
  ``compress.load`` on the CPU converts each packed layer to this layout once (the codes' only
  copy in memory, ``CpuQuantLinear``/``CpuInt8Linear``); a plain module asked for it here builds
  the layout at its first call and keeps it beside its buffers.
* ``triton`` (``triton_kernels.py``): W4A16/W8A16 GEMM that dequantizes inside the K loop (a
  split-K decode path for up to 16 tokens, a tiled prefill path above), a fused per-token int8
  activation quantizer, and an int8 x int8 -> int32 GEMM with the scales in its epilogue. On a
  CUDA GPU; on the CPU only under ``TRITON_INTERPRET=1`` (how CI checks it).
* ``cuda``   (``cuda_kernel.py`` + ``cuda/wna16_decode.cu``): a CUDA C++ W4A16/W8A16 kernel for
  decode (1-16 tokens per launch chunk), compiled with nvcc at first use.

Choosing: an explicit ``backend=`` argument wins, then the module's own choice
(``QuantLinear.backend``, set by ``compress.load(path, kernel=...)``), then the ``COMPRESS_KERNEL``
environment variable (``torch|cpu|triton|cuda``; empty or ``auto`` = automatic). Automatic picks,
per call, torch on the CPU (``compress.load`` has already chosen ``cpu`` for the layers it converted,
those with bf16 compute); on a GPU the CUDA kernel for weight-only calls of at most ``CUDA_MAX_TOKENS`` tokens,
Triton otherwise, torch where neither applies (3/5/6/7-bit weights). A forced backend that cannot
run raises ``compress.errors.UsageError`` naming what is missing. ``last_kernel()`` (per thread)
and ``QuantLinear.kernel`` tell which backend ran last.

The weight-only calls take any module with a ``QuantLinear``'s buffers and attributes
(``weight_packed``, ``weight_scale``, ``weight_zero_point``/``weight_g_idx`` when present,
``bits``, ``group_size``, ``symmetric``, ``dense``, ``in_features``, ``out_features``, ``bias``,
``dequantize()``): this package imports no module type.

Kernel layout (``KernelWeights``; built once per module and cached, never copies the codes):

    qweight  int32        (N, K // (32 // bits))   the exported ``weight_packed`` itself: codes packed
                                                    along K, little-endian, value k of a row in word
                                                    k // (32 // bits) at bit (k % (32 // bits)) · bits,
                                                    stored unsigned (signed value + 2^(bits-1))
    scales   scale dtype  (N, G)                   ``weight_scale`` (bf16 or fp16, as stored)
    zeros    int8         (N, G)                   signed zero points (z - 2^(bits-1)), unpacked
                                                    from the export's int32 words; None if symmetric
    g_idx    int32        (K,)                     group of each column: ``weight_g_idx``, or
                                                    ``arange(K) // group_size`` when the group size
                                                    has no power-of-two factor >= 16 (the kernels
                                                    then gather scales per column); else None
    gs       int                                   columns per group (K for per-channel scales)

Only widths that divide 32 (2, 4, 8 bits) have this word layout; other widths run on torch.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass

import torch

from compress.checkpoint.packing import unpack_int32
from compress.errors import UsageError
from compress.kernels import cpu, cuda_kernel, reference
from compress.utils import group_width

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV = "COMPRESS_KERNEL"
CUDA_MAX_TOKENS = 16  # the CUDA kernel's decode range; above it Triton's tiled GEMM reuses weights better

_last = threading.local()


def last_kernel() -> str | None:
    """The backend of this thread's most recent kernel call (None before the first)."""
    return getattr(_last, "name", None)


def record_kernel(name: str) -> str:
    """Note ``name`` as this thread's last backend (``last_kernel``); returns it."""
    _last.name = name
    return name




def requested_backend(backend: str | None = None) -> str | None:
    """Validate a backend name (None, '' or 'auto' = automatic), falling back to $COMPRESS_KERNEL."""
    src = "backend argument"
    if backend in (None, ""):
        backend, src = os.environ.get(ENV, ""), f"${ENV}"
    backend = backend.strip().lower() if backend else ""
    if backend in ("", "auto"):
        return None
    if backend not in BACKENDS:
        raise UsageError(f"unknown kernel backend {backend!r} (from the {src}); use one of {', '.join(BACKENDS)} or auto")
    return backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def missing(backend: str, device: torch.device, *, op: str = "wna16", bits: int | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` ('wna16' or 'w8a8') on ``device``; None when it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the CPU kernels need tensors on the CPU (they are on {device})"
        why = cpu.available()
        if why is None and op == "wna16" and bits not in (None, 4, 8):
            why = f"the CPU kernels read 4 or 8-bit weights (this layer has {bits}-bit weights)"
        if why is None and op == "w8a8":
            why = cpu.int8_unsupported()
        return why
    if op == "wna16" and bits is not None and 32 % bits:
        return f"the {backend} kernels read 2, 4 or 8-bit weights only (this layer has {bits}-bit weights packed across int32 words)"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install 'compress[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        return f"Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors (tensors are on {device})"
    if backend == "cuda":
        if op != "wna16":
            return "there is no CUDA C++ kernel for W8A8 (use triton or torch)"
        if bits not in (None, 4, 8):
            return f"the CUDA kernel reads 4 or 8-bit weights only (this layer has {bits}-bit weights)"
        if device.type != "cuda":
            return f"the CUDA kernel needs tensors on a CUDA device (they are on {device})"
        return cuda_kernel.missing()
    raise UsageError(f"unknown kernel backend {backend!r}; use one of {', '.join(BACKENDS)}")


def choose(backend: str | None, device: torch.device, *, op: str, bits: int | None = None, tokens: int = 1) -> str:
    """The backend that runs this call: the forced one (checked) or the fastest available."""
    forced = requested_backend(backend)
    if forced is not None:
        why = missing(forced, device, op=op, bits=bits)
        if why:
            raise UsageError(f"kernel backend {forced!r} is unavailable: {why}")
        return forced
    if device.type != "cuda":
        return "torch"
    if op == "wna16" and tokens <= CUDA_MAX_TOKENS and missing("cuda", device, op=op, bits=bits) is None:
        return "cuda"
    return "triton" if missing("triton", device, op=op, bits=bits) is None else "torch"


# ----------------------------------------------------------------------------- weight-only


@dataclass
class KernelWeights:
    """A QuantLinear's buffers in the kernel layout (module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    N: int
    K: int
    gs: int
    key: tuple


def _pow2_factor(n: int) -> int:
    return n & -n


def kernel_weights(qlinear) -> KernelWeights:
    """The module's KernelWeights, built at first use and rebuilt only if its buffers change."""
    key = reference.buffers_key(qlinear)
    kw = qlinear.__dict__.get("_kernel_weights")
    if kw is not None and kw.key == key:
        return kw
    N, K, bits = qlinear.out_features, qlinear.in_features, qlinear.bits
    gs = group_width(qlinear.group_size, K)
    zeros = None
    if not qlinear.symmetric:
        z = unpack_int32(qlinear.weight_zero_point, bits, N, dim=0, dense=qlinear.dense)  # (N, G) int32 signed
        zeros = z.to(torch.int8).contiguous()
    if hasattr(qlinear, "weight_g_idx"):
        g_idx = qlinear.weight_g_idx.to(torch.int32).contiguous()
    elif gs != K and _pow2_factor(gs) < 16:
        # no K tile of >= 16 columns stays inside one group: gather scales per column instead
        g_idx = (torch.arange(K, device=qlinear.weight_packed.device) // gs).to(torch.int32)
    else:
        g_idx = None
    kw = KernelWeights(qlinear.weight_packed.contiguous(), qlinear.weight_scale.contiguous(), zeros, g_idx, bits, N, K, gs, key)
    qlinear.__dict__["_kernel_weights"] = kw  # a plain attribute: not a buffer, not in the state_dict
    return kw


def cpu_weights(qlinear, dtype: torch.dtype) -> "cpu.CpuWeights":
    """The module's CPU kernel layout for ``dtype`` activations (bf16 for float32), built at
    first use and rebuilt only if its buffers change (beside the buffers: ``compress.load``
    converts instead, keeping one copy)."""
    dt = dtype if dtype in cpu.COMPUTE_DTYPES else torch.bfloat16
    key = (reference.buffers_key(qlinear), dt)
    hit = qlinear.__dict__.get("_cpu_weights")
    if hit is None or hit[0] != key:
        try:
            hit = (key, cpu.build(qlinear, dt))
        except ValueError as e:
            raise UsageError(f"kernel backend 'cpu' cannot run this layer: {e}") from None
        qlinear.__dict__["_cpu_weights"] = hit
    return hit[1]


def wna16_linear(x: torch.Tensor, qlinear, backend: str | None = None) -> torch.Tensor:
    """y = x @ Ŵᵀ (+ bias) for a ``QuantLinear``; x (..., K) bf16/fp16/fp32 -> (..., N) in x.dtype.

    The fast kernels are built for bf16/fp16 activations; fp32 runs too (ieee-precision dots).

    ``backend``: None (then ``qlinear.backend``, then $COMPRESS_KERNEL, then automatic) or
    torch|triton|cuda. Sets ``qlinear.kernel`` to the backend that ran.
    """
    if backend in (None, ""):
        backend = getattr(qlinear, "backend", None)
    tokens = x.numel() // max(x.shape[-1], 1)
    name = choose(backend, x.device, op="wna16", bits=qlinear.bits, tokens=tokens)
    if name != "torch" and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UsageError(f"kernel backend {name!r} computes with bf16, fp16 or fp32 activations, got {x.dtype}")
    qlinear.kernel = record_kernel(name)
    if name == "torch":
        return reference.wna16_linear(x, qlinear)
    if name == "cpu":
        return cpu.wna16_linear(x, cpu_weights(qlinear, x.dtype), qlinear.bias)
    kw = kernel_weights(qlinear)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if name == "triton":
        from compress.kernels import triton_kernels  # imports triton: only when it runs

        y = triton_kernels.wna16_gemm(x2, kw, qlinear.bias)
    else:
        y = cuda_kernel.wna16_gemm(x2, kw, qlinear.bias)
    return y.reshape(*x.shape[:-1], kw.N)


# ----------------------------------------------------------------------------- W8A8


def quantize_per_token(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (xq int8 (tokens, K), xs float32 (tokens, 1)); xs = absmax / 127,
    xq = round-half-even(x / xs) (see ``reference``)."""
    name = record_kernel(choose(backend, x.device, op="w8a8"))
    if name == "triton":
        from compress.kernels import triton_kernels

        return triton_kernels.quantize_per_token(x.reshape(-1, x.shape[-1]))
    return reference.quantize_per_token(x)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """W8A8: x (..., K) float, weight int8 (N, K), weight_scale (N, 1) float32/bf16/fp16, bias (N,)
    -> (..., N) in x.dtype: dynamic per-token int8 x, exact int32 x @ weightᵀ, then
    ``(acc · xs) · ws (+ bias)``."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise UsageError(f"int8_linear needs an int8 (N, K) weight, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K or weight_scale.numel() != N:
        raise UsageError(f"int8_linear shapes disagree: x {tuple(x.shape)}, weight {(N, K)}, weight_scale {tuple(weight_scale.shape)}")
    name = record_kernel(choose(backend, x.device, op="w8a8"))
    if name == "torch":
        return reference.int8_linear(x, weight, weight_scale, bias)
    if name == "cpu":
        return cpu.int8_linear(x, cpu.build_int8(weight, weight_scale), bias)
    from compress.kernels import triton_kernels

    xq, xs = triton_kernels.quantize_per_token(x.reshape(-1, K))
    y = triton_kernels.int8_gemm(xq, xs, weight, weight_scale.reshape(N), bias, x.dtype)
    return y.reshape(*x.shape[:-1], N)

