"""The CUDA C++ decode kernel (``cuda/wna16_decode.cu``): built with nvcc at first use, loaded
with ctypes.

Why nvcc + ctypes rather than ``torch.utils.cpp_extension``: the kernel only needs raw device
pointers and the current stream, so a plain shared library with one ``extern "C"`` entry point
is enough; it builds with nothing but nvcc (no torch headers, no matching CUDA toolkit for the
installed torch, no ninja), and the same build runs on a CPU-only CI machine, where the test
compiles the source without being able to run it.

Build: ``nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode arch=compute_XY,code=sm_XY``
for the GPU's compute capability (the CUDA runtime is linked statically, nvcc's default), into
the kernel cache (``compress.kernels.build``: ``$COMPRESS_CACHE/kernels/``), under a name that
hashes the source, the architecture and nvcc's version. nvcc is found as ``$NVCC``, on PATH,
or under ``$CUDA_HOME/bin`` / ``/usr/local/cuda/bin``.

Entry point: ``compress_wna16_decode(x_code, s_code, bits, x, qw, scales, zeros, g_idx, bias, y,
M, N, K, KW, G, gs, ldx, ldy, stream) -> int`` (dtype codes of x and scales: 0 = fp16, 1 = bf16,
2 = fp32; null
pointers for absent zeros / g_idx / bias; 0 on success, else a cudaError_t or -1).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import torch

from compress.errors import UsageError
from compress.kernels.build import compile_library

SOURCE = Path(__file__).with_name("cuda") / "wna16_decode.cu"
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

_libs: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand and Path(cand).is_file():
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def compile_source(arch: str, out_dir: Path | None = None) -> Path:
    """Compile the kernel for ``arch`` (e.g. 'sm_90') and return the shared library's path.

    Reuses an earlier build of the same source, arch and nvcc. Raises UsageError when nvcc is
    missing or fails (its last error lines in the message).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise UsageError("the CUDA kernel needs nvcc to build (set $NVCC or $CUDA_HOME, or put nvcc on PATH); or use --kernel triton")
    cc = arch.removeprefix("sm_")
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return compile_library(nvcc, flags, SOURCE, f"wna16_decode-{arch}", out_dir)


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _load(device: torch.device) -> ctypes.CDLL:
    arch = _arch(device)
    if arch in _failed:
        raise UsageError(_failed[arch])
    if arch not in _libs:
        try:
            lib = ctypes.CDLL(str(compile_source(arch)))
        except (UsageError, OSError) as e:
            _failed[arch] = str(e)
            raise UsageError(str(e)) from None
        f = lib.compress_wna16_decode
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
        _libs[arch] = lib
    return _libs[arch]


def missing(device: torch.device | None = None) -> str | None:
    """Why the CUDA kernel cannot run on ``device`` (builds it at first call); None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (this torch build or machine has none)"
    try:
        _load(device if device is not None else torch.device("cuda", torch.cuda.current_device()))
    except UsageError as e:
        return str(e)
    return None


def wna16_gemm(x: torch.Tensor, kw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 on CUDA -> (M, N) in x.dtype (``kw``: KernelWeights, bits 4 or 8)."""
    M, K = x.shape
    if K != kw.K:
        raise ValueError(f"x has {K} features, the layer reads {kw.K}")
    lib = _load(x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty((M, kw.N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    b = None if bias is None else bias.to(x.dtype).contiguous()
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = lib.compress_wna16_decode(
        _DTYPE_CODE[x.dtype], _DTYPE_CODE[kw.scales.dtype], kw.bits,
        ptr(x), ptr(kw.qweight), ptr(kw.scales), ptr(kw.zeros), ptr(kw.g_idx), ptr(b), ptr(y),
        M, kw.N, K, kw.qweight.shape[1], kw.scales.shape[1], kw.gs, x.stride(0), kw.N, stream,
    )
    if rc:
        raise RuntimeError(f"compress_wna16_decode failed with code {rc} (x {x.dtype}, scales {kw.scales.dtype}, bits {kw.bits})")
    return y
