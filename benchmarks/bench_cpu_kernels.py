"""Benchmark: the CPU integer kernels per call, against bf16 ``F.linear``, by number of tokens.

For one Linear shape (default: TinyLlama-1.1B's gate_proj, 2048 x 5632), random codes, bf16
activations, prints the median time of:

* bf16   ``F.linear`` with the dense bf16 weight (what plain transformers runs);
* w4a16  ``CpuQuantLinear`` (int4 g128 symmetric): compress's AVX-512 kernel (``native``) up to
  ``NATIVE_PREFILL_TOKENS`` tokens, dequantize + GEMM above (both paths timed at every M:
  ``w4 native``, ``w4 dequant``), and torch's int4 kernel on the same codes (``w4 torch``);
* w8a16  ``CpuQuantLinear`` (int8 per channel, ``_weight_int8pack_mm``);
* w8a8   ``CpuInt8Linear`` (oneDNN int8 GEMM, per-token activation quantization included);

and each one's speedup over bf16. What ``compress.kernels.cpu.PREFILL_TOKENS`` and
``NATIVE_PREFILL_TOKENS`` were chosen from.

    python benchmarks/bench_cpu_kernels.py [--shape 2048x5632] [--ms 1,4,16,32,64,128,512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from compress.checkpoint.cpu_modules import CpuInt8Linear, CpuQuantLinear
from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.packing import pack_int32
from compress.kernels import cpu, native


def median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def packed(K: int, N: int, bits: int, gs: int) -> QuantLinear:
    m = QuantLinear(K, N, bits, gs, True)
    half = 1 << (bits - 1)
    m.weight_packed.copy_(pack_int32(torch.randint(-half, half, (N, K)), bits, dim=1))
    m.weight_scale.copy_((torch.rand_like(m.weight_scale.float()) * 0.01 + 1e-3).to(m.weight_scale.dtype))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2048x5632", help="in x out features")
    ap.add_argument("--ms", default="1,4,16,32,64,128,512", help="token counts")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    K, N = (int(v) for v in a.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    w4 = CpuQuantLinear(q := packed(K, N, 4, 128), cpu.build(q, torch.bfloat16))
    c4 = w4.cpu
    tq = cpu.codes(c4)[:, :] + 8  # torch's int4 layout of the same codes, for its kernel
    t4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(tq.contiguous(), 1)
    tsz = torch.zeros(K // 128, N, 2, dtype=torch.bfloat16)
    tsz[..., 0] = q.weight_scale.t().to(torch.bfloat16)
    w8 = CpuQuantLinear(q8 := packed(K, N, 8, -1), cpu.build(q8, torch.bfloat16))
    i8 = Int8Linear(K, N)
    i8.weight.copy_(torch.randint(-127, 128, (N, K), dtype=torch.int8))
    a8 = CpuInt8Linear(i8)
    print(f"# {K} x {N}, bf16 activations, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, w4 layout {c4.layout}, PREFILL_TOKENS={cpu.PREFILL_TOKENS}, "
          f"NATIVE_PREFILL_TOKENS={cpu.NATIVE_PREFILL_TOKENS}")
    print(f"{'M':>5} {'bf16 ms':>9} {'w4 native':>10} {'w4 torch':>9} {'w4 dequant':>11} {'w4a16':>8} {'w8a16':>8} {'w8a8':>8}"
          "   speedups w4a16 / w8a16 / w8a8")
    for M in (int(v) for v in a.ms.split(",")):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        base = median_ms(lambda: F.linear(x, w), a.reps)
        nat = median_ms(lambda: native.int4_linear(x, c4.codes, c4.scale_zero, c4.zero, None, c4.gs), a.reps) if c4.layout == "native" else float("nan")
        kern = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t4, 128, tsz), a.reps)
        deq = median_ms(lambda: x @ cpu.dequantize_t(c4, torch.bfloat16), a.reps)
        t4_, t8, ta = (median_ms(lambda m=m: m(x), a.reps) for m in (w4, w8, a8))
        print(f"{M:>5} {base:>9.3f} {nat:>10.3f} {kern:>9.3f} {deq:>11.3f} {t4_:>8.3f} {t8:>8.3f} {ta:>8.3f}   "
              f"{base / t4_:.2f}x / {base / t8:.2f}x / {base / ta:.2f}x")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
