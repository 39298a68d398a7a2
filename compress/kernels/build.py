"""Build a shared library from one C/C++/CUDA source at first use, into compress's kernel cache.

Shared by the CUDA decode kernel (``cuda_kernel``, nvcc) and the AVX-512 CPU kernels (``native``,
the C compiler). The library's name hashes the source, the command and the compiler's version, so
an edited source or another compiler builds anew; it is written to a temporary file and renamed,
so concurrent first uses (pytest workers, torchrun ranks) never load a half-written library.
Cache: ``$COMPRESS_CACHE/kernels/`` (default ``~/.cache/compress/kernels/``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from compress.errors import UsageError
from compress.utils import cache_dir


def compile_library(compiler: str, flags: list[str], source: Path, name: str, out_dir: Path | None = None) -> Path:
    """``compiler flags -o LIB source`` into ``out_dir`` (default: the kernel cache), reusing an
    earlier build of the same source, flags and compiler. Raises UsageError with the compiler's
    last error lines when it fails."""
    ver = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    tag = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + ver.encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir else cache_dir() / "kernels"
    lib = out_dir / f"{name}-{tag}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    res = subprocess.run([compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True)
    if res.returncode:
        os.unlink(tmp)
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-6:]) or f"exit code {res.returncode}, no output"
        raise UsageError(f"{Path(compiler).name} could not build {source}: {tail}")
    os.replace(tmp, lib)
    return lib
