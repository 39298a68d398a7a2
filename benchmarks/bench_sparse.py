"""Benchmark: 2:4 semi-structured sparse Linears against dense, per layer and end to end (GPU).

    python benchmarks/bench_sparse.py                  # on a CUDA GPU of compute capability >= 8.0
    python benchmarks/bench_sparse.py --model out/s24  # end to end on a checkpoint instead of a random 1B llama
    python benchmarks/bench_sparse.py --cpu            # smoke run of the script's own paths (no timings claimed)

Prints JSON lines: per (shape, tokens) the dense and sparse time in ms and the speedup; end to
end, prefill (1 × 512 and 8 × 512 tokens: ms and tokens/s) and greedy decode (128 new tokens after
a 32-token prompt, tokens/s) dense vs 2:4, and the largest logit difference on the 1 × 512 prefill. Without a capable GPU it prints {"skipped": reason}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from compress.kernels.bench import timeit
from compress.prune.magnitude import magnitude_prune
from compress.prune.pattern import Pattern

from compress.kernels.sparse24 import (
    is_n_m,
    semi_structured_support,
    to_semi_structured,
)

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]  # in x out
TOKENS = [1, 16, 128, 512, 2048]


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (magnitude 2:4), in w's dtype."""
    return magnitude_prune(w, 0.5, Pattern(2, 4))[0].to(w.dtype)


def timed(fn, reps: int, device) -> float:
    """Median milliseconds of ``fn()`` (compress.kernels.bench's timer: warm-up, CUDA events on a GPU)."""
    return timeit(fn, device, reps) * 1e3


def layers(device, dtype, shapes, tokens, reps, sparse: bool):
    for k, n in shapes:
        w = prune_2_4(torch.randn(n, k, device=device, dtype=dtype))
        assert is_n_m(w)
        ws = torch.sparse.to_sparse_semi_structured(w) if sparse else None
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=dtype)
            row = {"shape": f"{k}x{n}", "m": m, "dense_ms": round(timed(lambda: F.linear(x, w), reps, device), 4)}
            if ws is not None:
                row["sparse_ms"] = round(timed(lambda: F.linear(x, ws), reps, device), 4)
                row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
                row["max_abs_diff"] = float((F.linear(x, ws) - F.linear(x, w)).abs().max())
            print(json.dumps(row), flush=True)


def build_model(path, device, dtype, tiny: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if path:
        from compress.checkpoint.load import load

        model = load(path, dtype=dtype, device=device, kernel="torch")  # dense first; converted in end_to_end
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32000)
        if tiny:
            cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=512)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    with torch.no_grad():  # magnitude 2:4 on every decoder Linear; a 2:4 checkpoint is left as it is
        for name, m in model.named_modules():
            if name.startswith("model.layers.") and type(m) is torch.nn.Linear:
                m.weight.copy_(prune_2_4(m.weight))
    return model


@torch.no_grad()
def end_to_end(model, device, reps, new_tokens, sparse: bool):
    vocab = model.config.vocab_size
    prompts = {b: torch.randint(0, vocab, (b, 512), device=device) for b in (1, 8)}
    dense_logits = model(input_ids=prompts[1]).logits.float()

    def generate(ids, n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    def measure(label):
        row = {"model": label}
        for b, ids in prompts.items():
            ms = timed(lambda: model(input_ids=ids), reps, device)
            row[f"prefill_{b}x512_ms"] = round(ms, 3)
            row[f"prefill_{b}x512_tokens_per_s"] = round(b * 512 / ms * 1e3, 1)
        ids = prompts[1][:, :32]
        generate(ids, 4)  # warm-up: one-time kernel selection stays out of the timing
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate(ids, new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["decode_tokens_per_s"] = round((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t), 1)
        return row

    rows = [measure("dense")]
    if sparse:
        res = to_semi_structured(model)
        rows.append({**measure("2:4 semi-structured"), "layers": len(res["converted"]), "kept_dense": len(res["skipped"]),
                     "max_abs_logit_diff": float((model(input_ids=prompts[1]).logits.float() - dense_logits).abs().max())})
    for r in rows:
        print(json.dumps(r), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU: tiny shapes, dense only, no claims")
    ap.add_argument("--model", help="a checkpoint folder for the end-to-end part, pruned 2:4 by magnitude (default: a random 1B llama)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--no-e2e", action="store_true", help="only the per-layer timings")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    if a.cpu:
        device = torch.device("cpu")
        layers(device, torch.float32, [(64, 128)], [1, 8], 2, sparse=False)
        if not a.no_e2e:
            end_to_end(build_model(None, device, torch.float32, tiny=True), device, 1, 4, sparse=False)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = semi_structured_support(device, dtype)
    if why is not None:
        print(json.dumps({"skipped": why}))
        return
    print(json.dumps({"device": torch.cuda.get_device_name(device), "dtype": a.dtype, "torch": torch.__version__}), flush=True)
    layers(device, dtype, SHAPES, TOKENS, a.reps, sparse=True)
    if not a.no_e2e:
        end_to_end(build_model(a.model, device, dtype, tiny=False), device, max(3, a.reps // 4), a.decode_tokens, sparse=True)


if __name__ == "__main__":
    main()
