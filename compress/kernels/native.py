"""compress's own AVX-512 CPU kernels (``csrc/int4_avx512.c``): built with the C compiler at first
use, loaded with ctypes, like the CUDA kernel (``cuda_kernel``) and for the same reasons (raw
pointers are all they need; no torch headers, no ninja).

Why our own: torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) streams the codes at 10–14
GB/s on the project's 2-core Xeon where bf16's GEMV streams 17–20 GB/s, so W4A16 decode reached
only 2.2× bf16 against a 3.3× bytes limit (BENCHMARKS.md "Serving on the CPU"). This kernel
decodes 32 codes to bf16 with one table lookup (VPERMW) and multiplies on VDPBF16PS (exact
products, float32 sums); and W8A8's per-token activation quantizer becomes one read per row.

* ``int4_linear``   W4A16 for decode (up to ``cpu.NATIVE_PREFILL_TOKENS`` tokens per call);
* ``int4_dequant``  the bf16 weight for the prefill path's dense GEMM;
* ``quantize_rows`` per-token int8 quantization of bf16 activations, bit for bit the reference's;
* ``scale_rows_``   W8A8's epilogue (per-token scale and bias) in one pass;
* ``rms_norm``      Llama's RMSNorm on bf16 rows in one pass, transformers' two roundings;
* ``silu_mul_quant`` a gated MLP's middle for W8A8: SiLU(gate) · up from the two GEMMs' outputs,
                    quantized per token for down_proj, in one pass (no bf16 intermediates).

``load_library`` builds and loads another of ``csrc/``'s sources the same way (``codebook_cpu``:
the codebook layers' lookup kernel, ``csrc/codebook_avx512.c``).

Layout of the codes: ``pack`` / ``unpack`` (documented in the C source). Needs Linux on x86-64
with AVX-512 BW and BF16 (``/proc/cpuinfo``), and a C compiler (``$CC``, ``cc`` or ``gcc``) with
OpenMP; links the libgomp torch has loaded, so both share one thread pool. ``missing()`` says why
not; ``COMPRESS_CPU_NATIVE=0`` turns it off (torch's int4 kernel and quantizer run instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

from compress.errors import UsageError
from compress.kernels.build import compile_library

SOURCE = Path(__file__).with_name("csrc") / "int4_avx512.c"
ENV = "COMPRESS_CPU_NATIVE"
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
EMULATE_FLAGS = ["-O2", "-std=gnu11", "-shared", "-fPIC", "-fopenmp", "-Wno-psabi", "-DCOMPRESS_EMULATE_AVX512"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def load_library(source: Path, name: str, signatures, emulate: bool = False) -> ctypes.CDLL | str:
    """``source`` built with ``FLAGS`` at first use (``build.compile_library``: once per source and
    compiler) and loaded, each ``(function, argtypes)`` of ``signatures`` declared with an int
    return; or why it cannot be (not Linux on x86-64, a CPU without AVX-512 BW and BF16, no C
    compiler, a failed build). ``emulate``: the tests' build for any CPU, the intrinsics from
    SIMDe's portable headers (``-DCOMPRESS_EMULATE_AVX512``, Debian's libsimde-dev), where the
    source supports it."""
    if not emulate and (platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64")):
        return f"compress's CPU kernels are built for Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    lacking = [] if emulate else [f for f in NEEDS if f not in _cpu_flags()]
    if lacking:
        return f"this CPU lacks {', '.join(lacking)} (compress's CPU kernels need AVX-512 BW and BF16)"
    cc = _compiler()
    if cc is None:
        return "no C compiler to build compress's CPU kernels (set $CC or install gcc)"
    try:
        lib = ctypes.CDLL(str(compile_library(cc, EMULATE_FLAGS if emulate else FLAGS, source, name + ("-emulated" if emulate else ""))))
    except (UsageError, OSError) as e:
        return str(e)
    for fname, args in signatures:
        f = getattr(lib, fname)
        f.restype, f.argtypes = ctypes.c_int, args
    return lib


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it cannot be (built once per process)."""
    p, i = ctypes.c_void_p, ctypes.c_int
    return load_library(SOURCE, "cpu_int4_avx512", (
        ("compress_int4_linear", [p] * 7 + [i] * 7), ("compress_int4_dequant", [p] * 4 + [i] * 4),
        ("compress_quantize_rows_bf16", [p] * 3 + [i] * 4), ("compress_scale_rows_bf16", [p] * 3 + [i] * 4),
        ("compress_silu_mul_quant_bf16", [p] * 5 + [i] * 5), ("compress_rms_norm_bf16", [p] * 3 + [i] * 4 + [ctypes.c_float, i])))


def switched_off() -> str | None:
    """Why ``$COMPRESS_CPU_NATIVE`` keeps compress's CPU kernels off; None when it does not."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"${ENV} turns compress's CPU kernels off"
    return None


def missing() -> str | None:
    """Why the native kernels cannot run here (builds them at the first call); None when they can."""
    off = switched_off()
    if off:
        return off
    lib = _library()
    return lib if isinstance(lib, str) else None


def _lib() -> ctypes.CDLL:
    why = missing()
    if why:
        raise UsageError(why)
    return _library()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"compress's CPU kernel {what} refused its arguments (code {rc})")


# ----------------------------------------------------------------------------- layout


def pack(q: torch.Tensor, gs: int) -> torch.Tensor:
    """Unsigned 4-bit codes (N, K) -> the kernel's (N, K/2) uint8: per group of ``gs`` columns,
    chunks of 64 (byte j: column j low, j + 32 high), then a half chunk of 32 where ``gs`` is an
    odd multiple of 32 (byte j: column j low, j + 16 high)."""
    N, K = q.shape
    q = q.to(torch.uint8).reshape(N, K // gs, gs)
    full = gs // 64 * 64
    c = q[:, :, :full].reshape(N, K // gs, -1, 2, 32)
    parts = [(c[..., 0, :] | (c[..., 1, :] << 4)).reshape(N, K // gs, -1)]
    if gs > full:
        r = q[:, :, full:].reshape(N, K // gs, 2, 16)
        parts.append(r[..., 0, :] | (r[..., 1, :] << 4))
    return huge_pages(torch.cat(parts, dim=-1).reshape(N, K // 2))


HUGE_PAGE = 2 << 20
ARENA_CHUNK = 64 << 20


class _Arena:
    """Bump allocation in 2 MiB-aligned private anonymous mappings advised for transparent huge
    pages, ``ARENA_CHUNK`` (or one tensor's size) at a time. One mapping per tensor would leave
    each tensor's unaligned head and tail on 4 KiB pages (a 2 MiB q_proj on none at all), and
    aligning each mapping would fault a whole huge page past each tensor's end; packing the
    layers back to back leaves one partial page per chunk. A chunk lives while any tensor in it
    does (the tensors hold it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buf: mmap.mmap | None = None
        self.start = self.used = self.cap = 0

    def _grow(self, n: int) -> None:
        cap = max(ARENA_CHUNK, -(-n // HUGE_PAGE) * HUGE_PAGE)
        buf = mmap.mmap(-1, cap + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared anonymous memory is shmem: no THP
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.buf, self.start, self.used, self.cap = buf, (-addr) % HUGE_PAGE, 0, cap

    def take(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        with self.lock:
            if self.buf is None or self.cap - self.used < n:
                self._grow(n)
            off = self.start + self.used
            self.used += -(-n // 64) * 64
            out = torch.frombuffer(self.buf, dtype=t.dtype, count=t.numel(), offset=off).view(t.shape)  # holds the mapping
        out.copy_(t)
        return out


_arena = _Arena()


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``'s copy in memory advised for transparent huge pages (``_Arena``; Linux, tensors of at
    least 2 MiB; others are returned contiguous as they are). A decode step streams every code
    once: with 4 KiB pages the page walks held one layer's GEMV at 12 GB/s, with 2 MiB pages it
    reaches 15-17 GB/s (2048 x 5632, 2 threads; BENCHMARKS.md "Serving on the CPU"). Needs
    /sys/kernel/mm/transparent_hugepage/enabled at ``madvise`` or ``always``; elsewhere the
    advice is ignored and the copy is an ordinary one."""
    if t.numel() * t.element_size() < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.contiguous()
    return _arena.take(t)


def unpack(p: torch.Tensor, gs: int) -> torch.Tensor:
    """Inverse of ``pack``: (N, K/2) uint8 -> (N, K) uint8 codes 0..15."""
    N, K = p.shape[0], p.shape[1] * 2
    p = p.reshape(N, K // gs, gs // 2)
    full = gs // 64 * 64
    c = p[:, :, : full // 2].reshape(N, K // gs, -1, 1, 32)
    parts = [torch.cat([c & 15, c >> 4], dim=-2).reshape(N, K // gs, -1)]
    if gs > full:
        r = p[:, :, full // 2 :]
        parts.append(torch.cat([r & 15, r >> 4], dim=-1))
    return torch.cat(parts, dim=-1).reshape(N, K)


# ----------------------------------------------------------------------------- calls


def int4_linear(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor | None,
                bias: torch.Tensor | None, gs: int) -> torch.Tensor:
    """x2 bf16 (M, K) -> bf16 (M, N): x2 @ Ŵᵀ (+ bias), Ŵ = (q - 8)·scales + zero per group,
    products exact and sums in float32, the output rounded once (bias added before)."""
    lib = _lib()
    M, K = x2.shape
    N, G = scales.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    xsum = torch.empty(M, G, dtype=torch.float32) if zero is not None else None
    b = None if bias is None else bias.float().contiguous()
    _check(lib.compress_int4_linear(_ptr(x2), _ptr(codes), _ptr(scales), _ptr(zero), _ptr(b), _ptr(y), _ptr(xsum),
                                    M, N, K, gs, x2.stride(0), N, torch.get_num_threads()), "int4_linear")
    return y


def int4_dequant(codes: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor | None, gs: int) -> torch.Tensor:
    """(N, K) bf16 Ŵ, rounded to nearest even from the exact float32 (q - 8)·s + zero."""
    lib = _lib()
    N, K = codes.shape[0], codes.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.bfloat16)
    _check(lib.compress_int4_dequant(_ptr(codes), _ptr(scales), _ptr(zero), _ptr(out), N, K, gs, torch.get_num_threads()), "int4_dequant")
    return out


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (T, K) -> int8 (T, K) codes and float32 (T, 1) scales: ``reference.quantize_per_token``
    bit for bit, in one read of each row."""
    lib = _lib()
    T, K = x2.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    q = torch.empty(T, K, dtype=torch.int8)
    s = torch.empty(T, 1, dtype=torch.float32)
    _check(lib.compress_quantize_rows_bf16(_ptr(x2), _ptr(q), _ptr(s), T, K, x2.stride(0), torch.get_num_threads()), "quantize_rows")
    return q, s


def scale_rows_(y: torch.Tensor, rs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8's epilogue in place: bf16 (M, N) ``y`` = y · rs[m] (+ bias), float32 math, one
    rounding (``rs``: float32 (M, 1) per-token scales). Returns ``y``."""
    lib = _lib()
    M, N = y.shape
    if y.stride(-1) != 1:
        raise ValueError("scale_rows_ needs unit-stride rows")
    r = rs.reshape(M).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    _check(lib.compress_scale_rows_bf16(_ptr(y), _ptr(r), _ptr(b), M, N, y.stride(0), torch.get_num_threads()), "scale_rows")
    return y


def silu_mul_quant(g: torch.Tensor, u: torch.Tensor, rs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8 gated MLP middle: bf16 (T, I) gate and up GEMM outputs before their per-token scale
    ``rs`` (float32 (T, 1)) -> h = SiLU(g · rs) · (u · rs) in float32, quantized per token: int8
    (T, I) codes and float32 (T, 1) scales (``reference.quantize_per_token``'s rule on h)."""
    lib = _lib()
    T, I = g.shape
    if u.shape != g.shape or g.stride(-1) != 1 or u.stride(-1) != 1 or g.dtype != torch.bfloat16 or u.dtype != torch.bfloat16:
        raise ValueError(f"silu_mul_quant needs two bf16 (T, I) tensors with unit-stride rows (got {tuple(g.shape)}, {tuple(u.shape)})")
    r = rs.reshape(T).float().contiguous()
    q = torch.empty(T, I, dtype=torch.int8)
    s = torch.empty(T, 1, dtype=torch.float32)
    _check(lib.compress_silu_mul_quant_bf16(_ptr(g), _ptr(u), _ptr(r), _ptr(q), _ptr(s), T, I, g.stride(0), u.stride(0),
                                            torch.get_num_threads()), "silu_mul_quant")
    return q, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of bf16 ``x`` (..., K) with a bf16 ``weight`` (K): float32
    ``x · rsqrt(mean(x²) + eps)`` rounded to bf16, times the weight rounded again, in one pass
    per row (equal to transformers' up to the order of the float32 sum of squares)."""
    lib = _lib()
    K = x.shape[-1]
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape != (K,):
        raise ValueError(f"rms_norm needs bf16 x (..., {K}) and a bf16 weight ({K},)")
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=torch.bfloat16)
    _check(lib.compress_rms_norm_bf16(_ptr(x2), _ptr(w), _ptr(y), x2.shape[0], K, x2.stride(0), K, float(eps), torch.get_num_threads()),
           "rms_norm")
    return y.reshape(x.shape)
