"""Benchmark: peak memory must not grow with the model.

Builds two llama-shaped checkpoints with random weights and the same widths (hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, the demo model's tokenizer and vocabulary), one with 22
layers (≈1.1B parameters) and one with 44 (≈2.1B), written shard by shard so the builder itself
never holds a whole model. Then compresses each with GPTQ W4 g128 symmetric without act-order
(16 × 256 calibration, no evaluation) in a fresh process and prints, per model, the size on disk, the peak RSS, and the
ratios the foundation issue asks for.

    python eval/bench_memory.py [--workdir /tmp/bench-mem] [--layers 22 44]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(path: Path, layers: int, hidden=2048, inter=5632, heads=32, kv_heads=4, seed=0) -> Path:
    from compress.modelio import demo_model_path

    if (path / "config.json").exists():
        return path
    demo = demo_model_path()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = json.loads((demo / "config.json").read_text())
    vocab = cfg["vocab_size"]
    head_dim = hidden // heads
    cfg.update(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=False, dtype="bfloat16",
    )
    cfg.pop("_model_name_or_path", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (demo / f).exists():
            shutil.copy2(demo / f, tmp / f)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}
    total = layers + 1

    def shard(k, tensors):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})

    shard(1, {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    })
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(i + 2, {
            p + "self_attn.q_proj.weight": rnd(hidden, hidden),
            p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench-mem")
    ap.add_argument("--layers", type=int, nargs="+", default=[22, 44])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for n in args.layers:
        model = build(work / f"llama-{n}l", n)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        cmd = [
            sys.executable, "-m", "compress.cli", "quantize", str(model), "-o", str(work / f"out-{n}l"), "--overwrite",
            "--method", "gptq", "--bits", "4", "--group-size", "128", "--no-act-order", "--samples", str(args.samples),
            "--seq-len", str(args.seq_len), "--no-eval", "--json", "--quiet",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"compress failed on {model}:\n{r.stderr[-2000:]}")
        rep = json.loads(r.stdout)
        row = {
            "layers": n, "params_b": round(rep["export"]["parameters"] / 1e9, 3), "bf16_disk_gb": round(disk / 1e9, 3),
            "peak_rss_gb": round(rep["peak_rss_mb"] / 1e3, 3), "compress_s": rep["time"]["compress_s"],
        }
        row["rss_over_disk"] = round(row["peak_rss_gb"] / row["bf16_disk_gb"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        growth = rows[-1]["peak_rss_gb"] / rows[0]["peak_rss_gb"] - 1
        print(json.dumps({"rss_growth_smallest_to_largest": round(growth, 4), "largest_rss_over_disk": rows[-1]["rss_over_disk"]}))


if __name__ == "__main__":
    main()
