"""compress's AVX-512 CPU kernel for non-uniform codebook layers (SqueezeLLM,
``compress.quant.codebook_module.CodebookLinear``; ``csrc/codebook_avx512.c``), built and loaded
like the int4 kernel (``native.load_library``: ctypes, the C compiler at first use):

    y (M, N) = x (M, K) @ Ŵᵀ (+ bias),   Ŵ[n, k] = tables[n, codes[n, k]]

straight from the export's codes (each row one LSB-first bit stream of 2, 3 or 4-bit codes,
``codebook_module.pack_codes``) and tables (bf16 or float32), for bf16 or float32 x: the looked-up
weight rounded to x's dtype as the torch reference rounds it, products summed in float32, the
output rounded once to x's dtype (the bias, in x's dtype, added before).

* ``linear``   the lookup GEMV/GEMM: no weight is materialised; blocks of up to 8 token rows
  share each decoded chunk of codes. What decode runs (up to ``PREFILL_TOKENS`` tokens).
* ``prefill``  above that: tiles of rows of Ŵ looked up by the kernel (``dequant``, a few MB at a
  time, never the whole layer) and multiplied by torch's GEMM.

The C decoder yields each chunk of 128 codes in a fixed order of its own (``decode_order``); the
activations are reordered to it once per call (``permute``, zero-padded to whole chunks) instead
of every row's weights. ``missing()`` says why the kernel cannot run (no AVX-512 BW and BF16, no
compiler, ``$COMPRESS_CPU_NATIVE=0``); ``emulate=True`` runs the same C source on any CPU through
SIMDe's portable intrinsics (Debian's libsimde-dev): slow, for the tests.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from compress.errors import UsageError
from compress.kernels import native

SOURCE = Path(__file__).with_name("csrc") / "codebook_avx512.c"
BITS = (2, 3, 4)
DTYPES = (torch.bfloat16, torch.float32)
CHUNK = 128  # codes per decoding step (the C source's CHUNK)
# Above this many tokens per call: looked-up tiles + torch's GEMM (``prefill``), whose cost per
# token does not include decoding the codes again; the int4 kernel's crossover (cpu.NATIVE_PREFILL_TOKENS).
PREFILL_TOKENS = 16
TILE_BYTES = 8 << 20  # one looked-up tile of Ŵ in ``prefill``


@functools.cache
def library(emulate: bool = False) -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be (built once per process)."""
    p, i = ctypes.c_void_p, ctypes.c_int
    return native.load_library(SOURCE, "cpu_codebook_avx512", (
        ("compress_codebook_order", [i, i, p]), ("compress_codebook_permute", [p, p] + [i] * 6),
        ("compress_codebook_linear", [p, p, p, i, p, i, p] + [i] * 6), ("compress_codebook_dequant", [p, p, i, p] + [i] * 5)),
        emulate=emulate)


def missing(emulate: bool = False) -> str | None:
    """Why the kernel cannot run here (builds it at the first call); None when it can."""
    off = native.switched_off()
    if off:
        return off
    lib = library(emulate)
    return lib if isinstance(lib, str) else None


def unsupported(bits: int, dtype: torch.dtype, emulate: bool = False) -> str | None:
    """Why the kernel cannot compute a ``bits``-bit layer for ``dtype`` activations; None when it can."""
    if bits not in BITS:
        return f"compress's CPU codebook kernel reads 2, 3 or 4-bit codes (this layer has {bits}-bit codes)"
    if dtype not in DTYPES:
        return f"compress's CPU codebook kernel computes with bf16 or float32 activations, not {dtype}"
    return missing(emulate)


def _lib(emulate: bool) -> ctypes.CDLL:
    why = missing(emulate)
    if why:
        raise UsageError(why)
    return library(emulate)


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"compress's CPU codebook kernel {what} refused its arguments (code {rc})")


def _as_read(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A table or bias as the kernel reads it: (contiguous bf16 or float32 tensor, 1 if float32)."""
    t = t if t.dtype in DTYPES else t.float()
    return t.contiguous(), int(t.dtype == torch.float32)


def padded(K: int) -> int:
    """Columns of the permuted x and of ``dequant``'s rows: K rounded up to whole chunks."""
    return -(-K // CHUNK) * CHUNK


def decode_order(bits: int, dtype: torch.dtype, emulate: bool = False) -> torch.Tensor:
    """int64 (128,): position p of a chunk in the decode order holds the chunk's code ``order[p]``."""
    out = (ctypes.c_int * CHUNK)()
    _check(_lib(emulate).compress_codebook_order(bits, int(dtype == torch.float32), out), "order")
    return torch.tensor(list(out), dtype=torch.int64)


def permute(x2: torch.Tensor, bits: int, emulate: bool = False) -> torch.Tensor:
    """x2 (M, K) bf16/float32, unit-stride rows -> (M, ``padded(K)``) in the decode order, zeros past K."""
    M, K = x2.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    xp = torch.empty(M, padded(K), dtype=x2.dtype)
    _check(_lib(emulate).compress_codebook_permute(x2.data_ptr(), xp.data_ptr(), M, K, x2.stride(0), bits,
                                                   int(x2.dtype == torch.float32), torch.get_num_threads()), "permute")
    return xp


def _shapes(x2: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int) -> tuple[int, int, int]:
    M, K = x2.shape
    N = codes.shape[0]
    if bits not in BITS or codes.dtype != torch.uint8 or codes.shape != (N, -(-K // 8) * bits) or tables.shape != (N, 1 << bits):
        raise ValueError(f"codebook kernel: codes {tuple(codes.shape)} {codes.dtype} and tables {tuple(tables.shape)} do not hold "
                         f"{N} rows of {K} {bits}-bit codes (2, 3 or 4 bits)")
    if x2.dtype not in DTYPES:
        raise ValueError(f"codebook kernel: x is {x2.dtype}, not bf16 or float32")
    return M, N, K


def linear(x2: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
           emulate: bool = False) -> torch.Tensor:
    """x2 (M, K) bf16/float32; codes uint8 (N, ⌈K/8⌉·bits) as exported; tables (N, 2^bits); bias (N,)
    -> (M, N) in x2's dtype, from the codes directly (the lookup kernel, any M)."""
    M, N, K = _shapes(x2, codes, tables, bits)
    xp = permute(x2, bits, emulate)
    t, t32 = _as_read(tables)
    b, b32 = _as_read(bias) if bias is not None else (None, 0)
    y = torch.empty(M, N, dtype=x2.dtype)
    _check(_lib(emulate).compress_codebook_linear(xp.data_ptr(), codes.contiguous().data_ptr(), t.data_ptr(), t32,
                                                  None if b is None else b.data_ptr(), b32, y.data_ptr(), M, N, K, bits,
                                                  int(x2.dtype == torch.float32), torch.get_num_threads()), "linear")
    return y


def dequant(codes: torch.Tensor, tables: torch.Tensor, bits: int, K: int, dtype: torch.dtype, emulate: bool = False) -> torch.Tensor:
    """(N, ``padded(K)``) Ŵ in ``dtype`` (bf16/float32, rounded as ``.to(dtype)`` rounds the
    reference's), each chunk's columns in ``decode_order(bits, dtype)`` (T[n, 0] past K)."""
    N = codes.shape[0]
    t, t32 = _as_read(tables)
    out = torch.empty(N, padded(K), dtype=dtype)
    _check(_lib(emulate).compress_codebook_dequant(codes.contiguous().data_ptr(), t.data_ptr(), t32, out.data_ptr(), N, K, bits,
                                                   int(dtype == torch.float32), torch.get_num_threads()), "dequant")
    return out


def prefill(x2: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
            emulate: bool = False) -> torch.Tensor:
    """``linear``'s result for many token rows: Ŵ looked up ``TILE_BYTES`` of rows at a time (in the
    decode order, as x is permuted) and multiplied by torch's GEMM, y accumulated transposed."""
    M, N, K = _shapes(x2, codes, tables, bits)
    xp = permute(x2, bits, emulate)  # (M, Kp)
    rows = max(16, TILE_BYTES // (xp.shape[1] * xp.element_size()))
    b = None if bias is None else bias.to(x2.dtype)
    yt = torch.empty(N, M, dtype=x2.dtype)
    for n0 in range(0, N, rows):
        w = dequant(codes[n0 : n0 + rows], tables[n0 : n0 + rows], bits, K, x2.dtype, emulate)  # (rows, Kp)
        if b is None:
            torch.mm(w, xp.t(), out=yt[n0 : n0 + rows])
        else:
            torch.addmm(b[n0 : n0 + rows, None], w, xp.t(), out=yt[n0 : n0 + rows])
    return yt.t().contiguous()


def codebook_linear(x2: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                    emulate: bool = False) -> torch.Tensor:
    """(M, N) = x2 @ Ŵᵀ (+ bias): ``linear`` up to ``PREFILL_TOKENS`` rows, ``prefill`` above."""
    run = linear if x2.shape[0] <= PREFILL_TOKENS else prefill
    return run(x2, codes, tables, bits, bias, emulate)
