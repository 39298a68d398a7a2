"""Benchmark: the bytes the KV cache stores for the demo model's shape at 512 / 2048 / 8192 tokens,
bf16 (transformers' DynamicCache) against KV8 and KV4 (compress.quant.kv_cache.CodeCache).

Each cache is filled layer by layer with random bf16 keys and values of the demo config's shape
(SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; read from the demo folder when it is there, these
numbers otherwise), batch 1; the model itself is built on the meta device (no weights, no forward),
only to give ``kv_cache.install`` its attention modules. Runs in seconds.

    python benchmarks/bench_kv_cache.py
"""

from __future__ import annotations

import json
import time

import torch
from compress.quant import kv_cache
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig

from compress.utils import cache_dir

TOKENS = (512, 2048, 8192)
DEMO = cache_dir() / "models" / "SmolLM2-135M-Instruct"  # where compress.checkpoint.source puts the demo


def demo_config():
    if (DEMO / "config.json").exists():
        return AutoConfig.from_pretrained(DEMO), str(DEMO)
    return LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64,
                       intermediate_size=1536, vocab_size=49152), "SmolLM2-135M's shape (the demo folder is not there)"


def filled(cache, config, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, config.num_key_value_heads, tokens, config.head_dim)
    for i in range(config.num_hidden_layers):
        k, v = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))
        cache.update(k, v, i)
    return cache


def code_cache(config, bits: int, r3: bool) -> kv_cache.CodeCache:
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    kv_cache.install(m, {"bits": bits}, kv_cache.r3_section(config, 0) if r3 else None)
    return kv_cache.new_cache(m)


def main() -> None:
    torch.set_num_threads(1)
    config, source = demo_config()
    print(f"# {source}: {config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads, head_dim "
          f"{config.head_dim}, batch 1; bytes as stored (KV: codes + one bf16 scale per vector)")
    for t in TOKENS:
        t0 = time.perf_counter()
        bf16 = kv_cache.nbytes(filled(DynamicCache(), config, t))
        kv8 = filled(code_cache(config, 8, False), config, t).nbytes()
        kv4 = filled(code_cache(config, 4, True), config, t).nbytes()
        print(json.dumps({"tokens": t, "bf16_mib": round(bf16 / 2**20, 3), "kv8_mib": round(kv8 / 2**20, 3),
                          "kv4_r3_mib": round(kv4 / 2**20, 3), "kv8_of_bf16": round(kv8 / bf16, 4),
                          "kv4_of_bf16": round(kv4 / bf16, 4), "seconds": round(time.perf_counter() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main()
