"""Benchmark: speed of structurally pruned models in plain transformers on the CPU, against the original.

Every model given (a folder, or `demo` for the original) is loaded with
``AutoModelForCausalLM.from_pretrained`` in the same process, one after the other, and timed the
same way: prefill of a 512-token prompt at batch 1 (the forward alone) and greedy decode of 64
tokens with the KV cache after a 128-token prompt. Each figure is the median of ``--repeat`` runs
after a warm-up. Also: parameters, size on disk of the weights.

    python benchmarks/bench_structured.py demo /tmp/sp/out/w75 /tmp/sp/out/d75 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from compress.checkpoint.source import resolve_model


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(path: Path, dtype: torch.dtype, repeat: int, prefill: int, decode: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    p = x[:, :128]
    t_pre = _median_time(lambda: model(input_ids=x, use_cache=False), repeat)
    t_dec = _median_time(lambda: model.generate(p, max_new_tokens=decode, min_new_tokens=decode, do_sample=False), repeat)
    t_p128 = _median_time(lambda: model(input_ids=p, use_cache=False), repeat)
    params = sum(q.numel() for q in {id(q): q for q in model.parameters()}.values())
    disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"model": str(path), "params": params, "disk_mb": round(disk / 2**20, 1),
            "prefill_tok_s": round(prefill / t_pre, 1), "decode_tok_s": round(decode / max(t_dec - t_p128, 1e-9), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders (demo: the original demo model)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(resolve_model(m, log=lambda s: None) if m == "demo" else Path(m), getattr(torch, args.dtype), args.repeat,
                    args.prefill, args.decode) for m in args.models]
    base = rows[0]
    for r in rows:
        r["prefill_x"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 2)
        r["decode_x"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2)
        print(json.dumps(r))
    print(f"threads {torch.get_num_threads()}, dtype {args.dtype}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
