"""Benchmark: the low-rank grid *without* propagation, in one process.

Without propagation every layer is factored on the uncompressed model's activations, so one
calibration forward serves every configuration: this script collects XᵀX and mean|x| of every
decoder Linear once (the demo model, builtin:pydoc, 128 × 512 windows, as the engine would), then
for each method (svd, asvd, whitened), allocation (uniform, sensitivity) and reduction (10, 20,
30%) factors every layer with the library's own functions (``lowrank.svd.decompose``,
``lowrank.allocate``; the same rank_multiple 8 and damping as the pass), puts B·A (factors
rounded to bf16, as exported) in place, and measures perplexity on the builtin evaluation split
(512-token windows). Propagated runs go through the real engine: ``benchmarks/bench_demo.py lr-...``.

    python benchmarks/bench_lowrank.py                 # the whole grid (about 15 minutes on 2 idle cores)
    python benchmarks/bench_lowrank.py --samples 32 --methods whitened --allocations uniform --reductions 0.2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from compress.eval.perplexity import perplexity
from compress.lowrank.allocate import LayerShape, sensitivity_ranks, uniform_ranks
from compress.lowrank.svd import decompose

from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource, resolve_model
from compress.data import calibration_windows, eval_windows, load_texts, tokenize
from compress.passes import STATS
from compress.utils import peak_rss_mb


def collect(model, calib: torch.Tensor, batch_size: int = 8) -> dict[str, dict]:
    """XᵀX and Σ|x| of every decoder Linear's input over the calibration windows."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    stats = {n: {s: STATS[s][0](model.get_submodule(n).in_features) for s in ("hessian", "absmean")} for n in names}

    # Linears of one block reading the very same input tensor (q/k/v, gate/up) share statistics
    seen: list = []  # (block prefix, input tensor, name) of the block running now

    def hook_for(n):
        block = n.rsplit(".", 2)[0]

        def hook(mod, args):
            if seen and seen[0][0] != block:
                seen.clear()
            twin = next((m for _, t, m in seen if t is args[0]), None)
            seen.append((block, args[0], n))
            if twin is None:
                for s in ("hessian", "absmean"):
                    STATS[s][1](stats[n][s], args[0])
            else:
                stats[n] = stats[twin]

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for b in torch.split(calib, batch_size):
            seen.clear()
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--methods", default="svd,asvd,whitened")
    ap.add_argument("--allocations", default="uniform,sensitivity")
    ap.add_argument("--reductions", default="0.1,0.2,0.3")
    ap.add_argument("--multiple", type=int, default=8)
    args = ap.parse_args()

    t0 = time.time()
    source = ModelSource(resolve_model("demo", log=lambda m: None))
    model = load_source(source)
    ids = tokenize(load_texts("builtin:pydoc", "calibration"), source.tokenizer)
    calib = calibration_windows(ids, args.samples, 512)
    windows = eval_windows(tokenize(load_texts("builtin:pydoc", "eval"), source.tokenizer), 512)
    stats = collect(model, calib)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in stats}
    calib_s = time.time() - t0
    print(json.dumps({"calibration_s": round(calib_s, 1), "samples": args.samples, "layers": len(stats)}), flush=True)

    for method in args.methods.split(","):
        t1 = time.time()
        decs = {n: decompose(originals[n], method, stats[n]["hessian"]["H"], stats[n]["absmean"]["sum"], damp=0.01, name=n) for n in stats}
        dec_s = time.time() - t1
        shapes = [LayerShape(n, W.shape[1], W.shape[0], decs[n].gains, decs[n].total) for n, W in originals.items()]
        for alloc in args.allocations.split(","):
            for red in map(float, args.reductions.split(",")):
                t2 = time.time()
                ranks = (sensitivity_ranks if alloc == "sensitivity" else uniform_ranks)(shapes, red, args.multiple)
                kept = 0
                for L in shapes:
                    r = ranks[L.name]
                    lin = model.get_submodule(L.name)
                    if r is None:
                        lin.weight.data = originals[L.name].clone()
                        kept += L.dense
                    else:
                        B, A = decs[L.name].factors(r)
                        lin.weight.data = B.bfloat16().float() @ A.bfloat16().float()
                        kept += r * L.unit
                factor_s = time.time() - t2
                ppl = perplexity(model, windows, batch_size=1)
                print(json.dumps({
                    "method": method, "allocation": alloc, "reduction": red, "propagate": False, "samples": args.samples,
                    "ppl": round(ppl["perplexity"], 3), "achieved_reduction": round(1 - kept / sum(L.dense for L in shapes), 4),
                    "dense_layers": sum(r is None for r in ranks.values()),
                    "factor_s": round(dec_s + factor_s, 1), "eval_s": ppl["seconds"], "peak_rss_gb": round(peak_rss_mb() / 1e3, 2),
                }), flush=True)
        del decs
    for n, W in originals.items():
        model.get_submodule(n).weight.data = W


if __name__ == "__main__":
    main()
