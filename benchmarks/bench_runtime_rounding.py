"""Benchmark: what the run-time roundings of our runtime cost on one export, without compressing
again: the KV cache at 8 and 4 bits (with and without R3), and the Linears' inputs at 4 bits.

Each variant loads the export with ``compress.load`` (float32 compute, the torch reference: the
same function the CPU kernels compute, without their bf16 roundings), changes only what is rounded
at run time, and scores the builtin evaluation split (512-token windows) as ``compress eval``
does. The weights are the export's in every row; in the ``a4`` rows GPTQ calibrated them on 8-bit
inputs (an A4 recipe, ``activations: {bits: 4}``, calibrates on 4-bit ones), and the ``a16`` row
drops the rounding of the inputs (the weights, calibrated on rounded inputs, stay).

    python benchmarks/bench_runtime_rounding.py OUT/rot-r4-gptq-w4a8g64-asym-orig
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from compress.eval.perplexity import perplexity
from compress.eval.vllm_runner import eval_windows_of
from compress.quant import kv_cache

from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.load import load
from compress.utils import peak_rss_mb

VARIANTS = {  # name: (KV-cache bits or None, R3, input bits for the packed Linears: None = as exported, 0 = none)
    "as-exported": (None, False, None),
    "a16": (None, False, 0),
    "kv8": (8, False, None),
    "kv4": (4, False, None),
    "kv4-r3": (4, True, None),
    "a4": (None, False, 4),
    "a4-kv4-r3": (4, True, 4),
}


def score(path, windows, kv: int | None, r3: bool, act: int | None) -> dict:
    m = load(path, dtype=torch.float32, log=lambda *_: None)
    if act is not None:
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.act_bits = act or None
    if kv is not None:
        kv_cache.install(m, {"bits": kv}, kv_cache.r3_section(m.config, 0) if r3 else None)
    t0 = time.time()
    r = perplexity(m, windows, batch_size=4)
    return {"ppl": round(r["perplexity"], 3), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    a = ap.parse_args()
    torch.set_num_threads(2)
    windows = eval_windows_of(a.export)
    for name in a.variants:
        print(json.dumps({"export": a.export, "variant": name, **score(a.export, windows, *VARIANTS[name]),
                          "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
