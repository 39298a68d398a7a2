"""Benchmark: quantize the demo model with several schemes; print perplexity, time and memory.

The protocol of the foundation issue: SmolLM2-135M-Instruct, builtin:pydoc, 128 calibration
samples × 512 tokens, perplexity on the builtin evaluation split with 512-token windows. Each
configuration runs in its own process (`compress run`), so its peak RSS is its own.

    python benchmarks/bench_demo.py                    # every configuration below
    python benchmarks/bench_demo.py gptq-w4g64 rtn-w4g64
    python benchmarks/bench_demo.py --no-baseline awq-w4g64-asym   # without evaluating the original
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_W4A = "{bits: 4, group_size: 64, symmetric: false}"
_W8A8 = "{bits: 8, group_size: -1, symmetric: true, activations: {bits: 8, dynamic: true}}"

CONFIGS = {
    # name: --set overrides of the default recipe (GPTQ W4 g64 symmetric, act-order with static
    # groups, on the demo model)
    "gptq-w4g64": [],
    "gptq-w4g64-noact": ["passes.0.gptq.act_order=false"],
    "gptq-w4g64-gidx": ["passes.0.gptq.static_groups=false"],
    "rtn-w4g64": ["passes=[{rtn: {bits: 4, group_size: 64}}]"],
    "rtn-w4g64-minmax": ["passes=[{rtn: {bits: 4, group_size: 64, observer: minmax}}]"],
    "gptq-w4g64-asym": ["passes.0.gptq.symmetric=false"],
    "gptq-w4g64-asym-noact": ["passes.0.gptq.symmetric=false", "passes.0.gptq.act_order=false"],
    "gptq-w3g64": ["passes.0.gptq.bits=3"],
    "gptq-w3g64-noact": ["passes.0.gptq.bits=3", "passes.0.gptq.act_order=false"],
    "gptq-w8-channel": ["passes.0.gptq.bits=8", "passes.0.gptq.group_size=-1"],
    "gptq-w8-channel-noact": ["passes.0.gptq.bits=8", "passes.0.gptq.group_size=-1", "passes.0.gptq.act_order=false"],
    # issue 4: activation-aware scaling (W4 g64 asymmetric, the peer's AWQ scheme) and W8A8
    "rtn-w4g64-asym": ["passes=[{rtn: {bits: 4, group_size: 64, symmetric: false}}]"],
    "awq-w4g64-asym": [f"passes=[{{awq: {_W4A}}}]"],
    "awq-layer-w4g64-asym": [f"passes=[{{awq: {{{_W4A[1:-1]}, objective: layer}}}}]"],  # = the default
    "awq-output-w4g64-asym": [f"passes=[{{awq: {{{_W4A[1:-1]}, objective: output}}}}]"],
    "awq-noclip-w4g64-asym": [f"passes=[{{awq: {{{_W4A[1:-1]}, clip: false}}}}]"],
    "awq-gptq-w4g64-asym": [f"passes=[{{awq: {_W4A}}}, {{gptq: {_W4A}}}]"],
    "awq-noclip-gptq-w4g64-asym": [f"passes=[{{awq: {{{_W4A[1:-1]}, clip: false}}}}, {{gptq: {_W4A}}}]"],
    "w8a8": [f"passes=[{{rtn: {_W8A8}}}]"],
    "gptq-w8a8": [f"passes=[{{gptq: {_W8A8}}}]"],
    "sq05-w8a8": [f"passes=[{{smoothquant: {{alpha: 0.5}}}}, {{rtn: {_W8A8}}}]"],
    "sq08-w8a8": [f"passes=[{{smoothquant: {{alpha: 0.8}}}}, {{rtn: {_W8A8}}}]"],
    "sq05-gptq-w8a8": [f"passes=[{{smoothquant: {{alpha: 0.5}}}}, {{gptq: {_W8A8}}}]"],
    "sq08-gptq-w8a8": [f"passes=[{{smoothquant: {{alpha: 0.8}}}}, {{gptq: {_W8A8}}}]"],
    # issue 12: pruning (50% unstructured, 2:4), OWL vs uniform, SparseGPT 2:4 joint with GPTQ W4 g64
    **{f"{m}-50": [f"passes=[{{{m}: {{sparsity: 0.5}}}}]"] for m in ("sparsegpt", "wanda", "magnitude")},
    **{f"{m}-24": [f"passes=[{{{m}: {{pattern: '2:4'}}}}]"] for m in ("sparsegpt", "wanda", "magnitude")},
    **{f"{m}-{a}-{s}": [f"passes=[{{{m}: {{sparsity: 0.{s}, allocation: {a}}}}}]"]
       for m in ("wanda", "sparsegpt") for a in ("uniform", "owl") for s in (5, 7)},
    "wanda-50-nonseq": ["passes=[{wanda: {sparsity: 0.5}}]", "calibration.sequential=false"],
    "wanda-24-nonseq": ["passes=[{wanda: {pattern: '2:4'}}]", "calibration.sequential=false"],
    "sparsegpt-24-act": ["passes=[{sparsegpt: {pattern: '2:4', act_order: true}}]"],
    "sparsegpt-50-act": ["passes=[{sparsegpt: {sparsity: 0.5, act_order: true}}]"],
    "sparsegpt-24-noact": ["passes=[{sparsegpt: {pattern: '2:4', act_order: false}}]"],
    "sparsegpt-50-noact": ["passes=[{sparsegpt: {sparsity: 0.5, act_order: false}}]"],
    "sparsegpt-owl-7-act": ["passes=[{sparsegpt: {sparsity: 0.7, allocation: owl, act_order: true}}]"],
    "sparsegpt-uniform-7-act": ["passes=[{sparsegpt: {sparsity: 0.7, act_order: true}}]"],
    "sparsegpt-24-gptq-w4g64": ["passes=[{sparsegpt: {pattern: '2:4'}}, {gptq: {bits: 4, group_size: 64}}]"],
    "sparsegpt-24-then-gptq-w4g64": ["passes=[{sparsegpt: {pattern: '2:4', joint: false}}, {gptq: {bits: 4, group_size: 64}}]"],
    "wanda-24-gptq-w4g64": ["passes=[{wanda: {pattern: '2:4'}}, {gptq: {bits: 4, group_size: 64}}]"],
    # issue 10: low-rank at 10/20/30% of the decoder Linears' parameters, svd/asvd/whitened,
    # uniform vs sensitivity allocation, with and without propagation (-noprop); -c32: 32 windows
    **{f"lr-{m}-{a}-{p}{n}": [f"passes=[{{lowrank: {{method: {m}, allocation: {a}, reduction: 0.{p // 10}}}}}]"]
       + (["calibration.propagate=false"] if n else [])
       for m in ("whitened", "asvd", "svd") for a in ("uniform", "sensitivity") for p in (10, 20, 30) for n in ("", "-noprop")},
    "lr-whitened-uniform-20-noprop-c32": ["passes=[{lowrank: {allocation: uniform, reduction: 0.2}}]", "calibration.propagate=false",
                                          "calibration.samples=32"],
    "lr-whitened-sensitivity-20-rtn-w8": ["passes=[{lowrank: {reduction: 0.2}}, {rtn: {bits: 8, group_size: -1}}]"],
    # issue 11: distillation (defaults: scope model, forward KL, train auto, one pass over the
    # calibration windows) after GPTQ W3 g64, Wanda 2:4 and low-rank 20%; scope block on W3
    "gptq-w3g64-distill": ["passes=[{gptq: {bits: 3, group_size: 64, symmetric: true}}, {distill: {}}]"],
    "gptq-w3g64-distill-block": ["passes=[{gptq: {bits: 3, group_size: 64, symmetric: true}}, {distill: {scope: block}}]"],
    "wanda-24-distill": ["passes=[{wanda: {pattern: '2:4'}}, {distill: {}}]"],
    "lr-20-distill": ["passes=[{lowrank: {reduction: 0.2}}, {distill: {}}]"],
    # issue 26: calibration (and distillation) on 128 × 512 tokens the demo writes itself
    # (calibration.data: generated, the default sampling: T 1, top-k 50, seed 0)
    "gptq-w4g64-gen": ["calibration.data=generated"],  # the default sampling (batch 16)
    # issue 25: QuaRot's randomized Hadamard rotations (R1 residual, R2 per head) fused before GPTQ
    "rot-gptq-w4g64": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: true}}]"],
    "rot-gptq-w3g64": ["passes=[{rotate: {}}, {gptq: {bits: 3, group_size: 64, symmetric: true}}]"],
    "rot-gptq-w3g64-asym": ["passes=[{rotate: {}}, {gptq: {bits: 3, group_size: 64, symmetric: false}}]"],
    # GPTAQ's objective: each Linear's quantized outputs fit the original model's (objective: original)
    "rot-gptq-w3g64-orig": ["passes=[{rotate: {}}, {gptq: {bits: 3, group_size: 64, symmetric: true, objective: original}}]"],
    "rot-gptq-w3g64-asym-orig": ["passes=[{rotate: {}}, {gptq: {bits: 3, group_size: 64, symmetric: false, objective: original}}]"],
    "rot-gptq-w4g64-orig": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: true, objective: original}}]"],
    # W4A8: int8 per-token inputs to every Linear; R4 adds the online Hadamard on down_proj's input
    "rot-gptq-w4g64-asym-orig": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: false, objective: original}}]"],
    "rot-gptq-w4a8g64-asym-orig": [("passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: false, objective: original, "
                                    "activations: {bits: 8}}}]")],
    "rot-r4-gptq-w4a8g64-asym-orig": [("passes=[{rotate: {r4: true}}, {gptq: {bits: 4, group_size: 64, symmetric: false, "
                                       "objective: original, activations: {bits: 8}}}]")],
    # SpinQuant: R1 and each layer's R2 learned for the quantizer (100 Cayley SGD steps, 2 windows × 256 tokens each)
    "spin-rtn-w4g64": ["passes=[{rotate: {learn: {}}}, {rtn: {bits: 4, group_size: 64}}]"],
    "spin-gptq-w4g64": ["passes=[{rotate: {learn: {}}}, {gptq: {bits: 4, group_size: 64}}]"],
    "spin-gptq-w3g64": ["passes=[{rotate: {learn: {}}}, {gptq: {bits: 3, group_size: 64}}]"],
    "spin-r4-gptq-w4a8g64-asym-orig": [("passes=[{rotate: {r4: true, learn: {}}}, {gptq: {bits: 4, group_size: 64, symmetric: false, "
                                        "objective: original, activations: {bits: 8}}}]")],
    # SpQR-style outliers: 0.5% of each Linear's weights (per column, the worst rounded) kept in bf16 beside the codes
    "gptq-w3g64-out05": ["passes=[{gptq: {bits: 3, group_size: 64, symmetric: true, outliers: 0.005}}]"],
    # OWQ's weak columns: 1% of each Linear's input columns (6 of 576, 16 of 1536: +0.17 bits per weight) kept whole in bf16
    "gptq-w3g64-owq": ["passes=[{gptq: {bits: 3, group_size: 64, symmetric: true, weak_columns: 0.01}}]"],
    "rot-rtn-w4g64": ["passes=[{rotate: {}}, {rtn: {bits: 4, group_size: 64}}]"],
    "gptq-mixed35-g64": ["passes.0.gptq.bits=3.5"],  # mixed precision: widths 2/3/4/8 averaging 3.5 bits
    "rot-gptq-mixed35-g64": ["passes=[{rotate: {}}, {gptq: {bits: 3.5, group_size: 64, symmetric: true}}]"],
    "squeezellm-w3": ["passes=[{squeezellm: {bits: 3}}]"],  # per-row 8-entry tables: 3.22 bits per weight on 576 columns
    "gptq-w4g64-emb4": ["passes.0.gptq.embeddings={bits: 4}"],  # + the tied embedding/lm_head at 4 bits g64 (GPTQ on the head's inputs)
    "gptq-w4g64-gen-full": ["calibration.data=generated", "calibration.generate.top_k=null", "calibration.generate.batch_size=64"],
    "gptq-w4g64-gen-hybrid": ["calibration.data=generated", "calibration.generate.greedy_first=4", "calibration.generate.batch_size=64"],
    # issue 25: the rotation and the 4-bit embedding/lm_head together (rotate unties the head; both are quantized)
    "rot-gptq-w4g64-emb4": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: true, embeddings: {bits: 4}}}]"],
    "rot-gptq-w4g64-emb4-orig": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: true, embeddings: {bits: 4}, objective: original}}]"],
    # issue 26: the rotation before GPTQ, calibrated on the generated text (the default sampling, cached)
    "rot-gptq-w4g64-gen": ["passes=[{rotate: {}}, {gptq: {bits: 4, group_size: 64, symmetric: true}}]", "calibration.data=generated"],
    "gptq-w3g64-distill-gen": ["passes=[{gptq: {bits: 3, group_size: 64, symmetric: true}}, {distill: {}}]",
                               "calibration.data=generated"],
}


def run(name: str, overrides: list[str], workdir: Path, baseline: bool) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", "run", "--json", "--quiet", "--overwrite", "-o", str(workdir / name)]
    for o in overrides + ([] if baseline else ["eval.baseline=false"]):
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"name": name, "error": r.stderr.strip()[-500:]}
    rep = json.loads(r.stdout)
    ev = rep.get("eval", {})
    return {
        "name": name,
        "ppl": round(ev["model"]["perplexity"], 3),
        "baseline_ppl": round(ev["baseline"]["perplexity"], 3) if "baseline" in ev else None,
        "compress_s": rep["time"]["compress_s"],
        "total_s": rep["time"]["total_s"],
        "compress_peak_rss_gb": round(rep["compress_peak_rss_mb"] / 1e3, 2),
        "peak_rss_gb": round(rep["peak_rss_mb"] / 1e3, 2),
        "bits_per_param": rep["export"]["bits_per_parameter"],
        "size_mb": round(rep["export"]["size_bytes"] / 1e6, 1),
        **({"distill": {k: d.get(k) for k in ("scope", "steps", "tokens", "seconds", "stopped", "best_step", "heldout_ppl_start",
                                              "heldout_ppl_best", "perplexity") if k in d}}
           if (d := rep.get("distill")) else {}),
        **({"lowrank_reduction": round(1 - lr["parameters_kept"] / lr["parameters_dense"], 4), "lowrank_layers": lr["layers"]}
           if (lr := rep["export"].get("lowrank")) else {}),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="configurations: " + ", ".join(CONFIGS))
    p.add_argument("names", nargs="*", metavar="NAME", help="configurations to run (default: every one)")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate the original model")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {', '.join(unknown)}")
    work = Path("/tmp/bench-demo")
    for i, name in enumerate(a.names or list(CONFIGS)):
        print(json.dumps(run(name, CONFIGS[name], work, baseline=not a.no_baseline and i == 0)), flush=True)


if __name__ == "__main__":
    main()
