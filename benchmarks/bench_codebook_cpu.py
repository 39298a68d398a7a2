"""Benchmark: a codebook (SqueezeLLM) layer on the CPU per call, by number of tokens: the torch
reference against compress's lookup kernel (``compress.kernels.codebook_cpu``).

For each Linear shape (default: TinyLlama-1.1B's 2048 x 5632, 5632 x 2048 and 2048 x 2048) and
code width (3, 4 bits), random codes and sorted bf16 tables, bf16 activations, prints the median
milliseconds per call of:

* torch    ``CodebookLinear`` with ``backend='torch'``: the weight looked up (gather) every call,
           then ``F.linear`` (the CPU path before the kernel);
* kernel   ``CodebookLinear`` automatic: the lookup kernel up to ``codebook_cpu.PREFILL_TOKENS``
           tokens, looked-up tiles + torch's GEMM above;
* lookup / tiles   the two paths of the kernel at every token count (where the crossover is);
* dense    ``F.linear`` with a dense bf16 weight (what plain transformers runs);

and the kernel's speedup over torch. ``--emulate`` times the SIMDe build of the kernel (CPUs
without AVX-512: its numbers say nothing of the native kernel's speed).

    python benchmarks/bench_codebook_cpu.py [--shapes 2048x5632,5632x2048,2048x2048] [--bits 3,4]
                                            [--tokens 1,4,16,128] [--dtype bf16|fp32] [--reps 5] [--emulate]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_cpu_kernels import (
    median_ms,  # beside this script: the same timing (warm-up, then the median)
)
from compress.quant.codebook_module import CodebookLinear

from compress.kernels import codebook_cpu


def layer(K: int, N: int, bits: int) -> CodebookLinear:
    g = torch.Generator().manual_seed(K + N + bits)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    tables = torch.sort(torch.randn(N, 1 << bits, generator=g) * 0.02, dim=1).values
    return CodebookLinear.from_codes(codes, tables, bits)


def time_tokens(m: CodebookLinear, dense: torch.Tensor, T: int, dtype: torch.dtype, reps: int, emulate: bool) -> dict[str, float]:
    """Median ms per call of each path for T token rows."""
    x = torch.randn(T, m.in_features).to(dtype)
    args = (m.weight_codes, m.weight_tables, m.bits, None, emulate)
    m.backend = "torch"
    out = {"torch": median_ms(lambda: m(x), max(2, reps // 2))}  # slow: fewer repetitions
    m.backend = None
    out["kernel"] = median_ms(lambda: m(x), reps)
    out["lookup"] = median_ms(lambda: codebook_cpu.linear(x, *args), reps)
    out["tiles"] = median_ms(lambda: codebook_cpu.prefill(x, *args), reps)
    out["dense"] = median_ms(lambda: F.linear(x, dense), reps)
    return out


def time_shape(K: int, N: int, bits: int, tokens: list[int], dtype: torch.dtype, reps: int, emulate: bool) -> None:
    m = layer(K, N, bits)
    dense = m.dequantize().to(dtype)
    for T in tokens:
        t = time_tokens(m, dense, T, dtype, reps, emulate)
        print(f"{K:>5}x{N:<5} {bits}-bit T={T:<4} torch {t['torch']:9.2f}  kernel {t['kernel']:8.3f}  lookup {t['lookup']:8.3f}  "
              f"tiles {t['tiles']:8.3f}  dense {t['dense']:8.3f} ms   kernel/torch x{t['torch'] / t['kernel']:6.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x5632,5632x2048,2048x2048", help="in x out features, comma-separated")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--tokens", default="1,4,16,128")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--emulate", action="store_true", help="time the SIMDe build (CPUs without AVX-512; not the native speed)")
    a = ap.parse_args()
    why = codebook_cpu.missing(a.emulate)
    if why:
        raise SystemExit(f"compress's CPU codebook kernel cannot run here: {why} (--emulate runs the SIMDe build)")
    if a.emulate:  # CodebookLinear's automatic path then runs the emulated build too
        lib = codebook_cpu.library(True)
        codebook_cpu.library = lambda emulate=False: lib
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype} x, {'EMULATED (SIMDe) ' if a.emulate else ''}kernel, "
          f"prefill above {codebook_cpu.PREFILL_TOKENS} tokens", flush=True)
    with torch.inference_mode():
        for shape in a.shapes.split(","):
            K, N = (int(v) for v in shape.split("x"))
            for bits in (int(b) for b in a.bits.split(",")):
                time_shape(K, N, bits, [int(t) for t in a.tokens.split(",")], dtype, a.reps, a.emulate)


if __name__ == "__main__":
    main()
