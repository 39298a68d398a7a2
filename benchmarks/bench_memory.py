"""Benchmark: peak memory must not grow with the model.

Builds two llama-shaped checkpoints with random weights and the same widths (hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, the demo model's tokenizer and vocabulary), one with 22
layers (≈1.1B parameters) and one with 44 (≈2.1B), written shard by shard so the builder itself
never holds a whole model. Then compresses each with GPTQ W4 g128 symmetric without act-order
(16 × 256 calibration, no evaluation) in a fresh process and prints, per model, the size on disk, the peak RSS, and the
ratios the foundation issue asks for.

    python benchmarks/bench_memory.py [--workdir /tmp/bench-mem] [--layers 22 44]

``--eval`` measures evaluation instead: perplexity on ``--windows`` windows of ``--seq-len``
tokens of the builtin evaluation split (random weights: the value is meaningless, the memory is
not), each run in a fresh process, (1) with ``layerwise: auto`` under an address-space limit
(``ulimit -v``) of half the model's float32 size (``--cap``), where it must choose the layer-wise
path (``compress.eval.layerwise``), (2) the whole model under the same limit, expected to fail (it
needs more than the limit), and (3) the whole model without a limit where the machine has the
memory for it. Each row gives the process's peak RSS. The limit counts address space, not
memory: the interpreter with torch, transformers and the tokenizer already maps about 1.6 GB (the
22-layer model's half, 2.3 GB, leaves no room for even its embeddings: use ``--cap 0.85`` there),
and glibc's heap keeps the address space of freed block weights (malloc_trim returns their
memory, not their addresses: 10-30 MB more per block, RSS flat), so the children run with a fixed
mmap threshold (``MALLOC_MMAP_THRESHOLD_``, the same for both modes): each large tensor gets its
own mapping, unmapped when it is freed.

    python benchmarks/bench_memory.py --eval [--windows 4] [--seq-len 256] [--layers 22 44] [--cap 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(path: Path, layers: int, hidden=2048, inter=5632, heads=32, kv_heads=4, seed=0) -> Path:
    from compress.checkpoint.source import demo_model_path

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


# The child of one evaluation run: perplexity only, no cache, its result and its log as JSON.
_EVAL_CHILD = """
import json, sys
from compress.api import Hooks, evaluate
from compress.recipe import EvalConfig, PerplexityConfig

path, windows, seq_len, setting = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = []

class Log(Hooks):
    def log(self, msg):
        lines.append(msg)

pc = PerplexityConfig(seq_len=seq_len, max_windows=windows, layerwise={"auto": "auto", "true": True, "false": False}[setting])
res = evaluate(path, None, EvalConfig(perplexity=pc, cache=False), hooks=Log())["model"]
print(json.dumps({"mode": res["mode"], "perplexity": res["perplexity"], "seconds": res["seconds"], "log": lines}))
"""


def eval_run(model: Path, setting: str, windows: int, seq_len: int, cap: int | None) -> dict:
    """One perplexity run in a fresh process (``layerwise: setting``), under an address-space
    limit of ``cap`` bytes if given. Peak RSS from the child's own rusage (``os.wait4``: per child,
    where RUSAGE_CHILDREN would give the largest of all the children so far)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}  # see the module docstring
        p = subprocess.Popen([sys.executable, "-c", _EVAL_CHILD, str(model), str(windows), str(seq_len), setting],
                             stdout=out, stderr=err, env=env, preexec_fn=limit if cap else None)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        row = {"layerwise": setting, "cap_gb": round(cap / 1e9, 2) if cap else None, "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}
        if p.returncode == 0:
            row.update(ok=True, **json.loads(out.read().decode().strip().splitlines()[-1]))
        else:  # the expected end of the whole model under the limit: an allocation fails
            tail = err.read().decode(errors="replace").strip().splitlines()
            row.update(ok=False, exit=p.returncode, error=(tail[-1] if tail else "")[-300:])
        return row


def bench_eval(work: Path, layers: list[int], windows: int, seq_len: int, cap_share: float) -> None:
    from compress.eval.layerwise import available_memory_bytes, whole_model_bytes

    from compress.checkpoint.source import ModelSource

    for n in layers:
        model = build(work / f"llama-{n}l", n)
        source = ModelSource(model)
        params = sum(p.numel() for p in source.skeleton().parameters())
        fp32 = 4 * params
        cap = int(fp32 * cap_share)
        need = whole_model_bytes(source, 1, seq_len)  # what `layerwise: auto` compares with the memory available
        head = {"layers": n, "params_b": round(params / 1e9, 3), "fp32_gb": round(fp32 / 1e9, 2), "whole_model_estimate_gb": round(need / 1e9, 2)}
        for setting, c in (("auto", cap), ("false", cap), ("false", None)):
            if c is None and need > 0.8 * available_memory_bytes():
                print(json.dumps({**head, "layerwise": setting, "cap_gb": None, "skipped": "not enough memory for the whole model"}), flush=True)
                continue
            print(json.dumps({**head, **eval_run(model, setting, windows, seq_len, c)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench-mem")
    ap.add_argument("--layers", type=int, nargs="+", default=[22, 44])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", action="store_true", help="benchmark perplexity's memory (layer-wise vs whole model) instead of compression's")
    ap.add_argument("--windows", type=int, default=4, help="--eval: evaluation windows")
    ap.add_argument("--cap", type=float, default=0.5, help="--eval: the address-space limit, as a share of the float32 model size")
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.eval:
        bench_eval(work, args.layers, args.windows, args.seq_len, args.cap)
        return
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
