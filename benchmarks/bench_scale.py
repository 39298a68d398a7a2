"""Benchmark: compression time and peak memory on 1 process vs N data-parallel ranks, and on a GPU.

Random llama-shaped checkpoints built locally (no hub; ``benchmarks/bench_memory.py``'s builder, the
demo model's tokenizer and vocabulary):

* ``1b``: 22 layers, hidden 2048, intermediate 5632, 32 heads / 4 KV heads (≈1.1 B parameters);
* ``8b``: Llama-3-8B's blocks: 32 layers, hidden 4096, intermediate 14336, 32 heads / 8 KV heads
  (the vocabulary is the demo's 49,152, not Llama 3's 128,256: the blocks, which are what the
  sweep spends its time on, are the same).

GPTQ W4 g128 symmetric, no evaluation. Each setting runs in a fresh process tree; the peak RSS is
the largest sum over the tree (all ranks together) sampled every 0.2 s, and the peak GPU memory
comes from the report (``run.peak_gpu_mb``).

    python benchmarks/bench_scale.py --cpu                  # 1b: 1 process vs 2 ranks (gloo) on the CPU
    python benchmarks/bench_scale.py --gpu                  # 1b and 8b on the GPU, 128 x 2048 calibration

CPU defaults to 16 x 256 calibration tokens (as bench_memory.py) to stay within minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

SHAPES = {"1b": dict(layers=22, hidden=2048, inter=5632, heads=32, kv_heads=4),
          "8b": dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8)}


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env=None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS of the process tree in bytes, exit code)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return time.time() - t0, peak, proc.returncode


def run_one(model: Path, out: Path, device: str, nproc: int, samples: int, seq_len: int) -> dict:
    cmd = [sys.executable, "-m", "compress", "run", "--set", f"model={model}", "--device", device,
           "--set", "passes=[{gptq: {bits: 4, group_size: 128, symmetric: true, act_order: false}}]",
           "--set", f"calibration.samples={samples}", "--set", f"calibration.seq_len={seq_len}",
           "--set", "eval.perplexity=null", "-o", str(out), "--overwrite", "-q"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    wall, peak, rc = measure(cmd)
    rep = json.loads((out / "report.json").read_text()) if rc == 0 else {}
    shutil.rmtree(out, ignore_errors=True)
    return {"device": device, "ranks": nproc, "rc": rc, "wall_s": round(wall, 1), "compress_s": rep.get("time", {}).get("compress_s"),
            "peak_rss_gb": round(peak / 1e9, 2), "peak_gpu_gb": round(rep.get("run", {}).get("peak_gpu_mb", 0) / 1024, 2) or None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="1b on the CPU: 1 process vs --ranks ranks")
    ap.add_argument("--gpu", action="store_true", help="1b and 8b on the GPU (cuda)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/bench-mem")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory import build

    work = Path(args.workdir)
    rows = []
    if args.cpu:
        model = build(work / "llama-22l", **SHAPES["1b"])
        for n in (1, args.ranks):
            rows.append({"model": "1b", **run_one(model, work / "scale-out", "cpu", n, args.samples or 16, args.seq_len or 256)})
            print(json.dumps(rows[-1]), flush=True)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here")
        for name in ("1b", "8b"):
            sh = SHAPES[name]
            model = build(work / f"llama-{name}", **sh)
            rows.append({"model": name, **run_one(model, work / "scale-out", "cuda", 1, args.samples or 128, args.seq_len or 2048)})
            print(json.dumps(rows[-1]), flush=True)
    print("| model | device | ranks | compression | whole command | peak RSS (all ranks) | peak GPU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['ranks']} | {r['compress_s']} s | {r['wall_s']} s | {r['peak_rss_gb']} GB | {r['peak_gpu_gb'] or '-'} |")


if __name__ == "__main__":
    main()
