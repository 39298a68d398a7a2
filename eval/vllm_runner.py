"""Perplexity of a checkpoint folder in vLLM, on exactly the windows ``compress eval`` scores.

``compress eval`` tokenizes its evaluation text once (the tokenizer's own special tokens, no BOS
added by us), cuts it into consecutive non-overlapping windows of ``seq_len`` tokens (the tail is
dropped; ``max_windows`` caps the count) and scores each window on its own: every window
contributes its ``seq_len - 1`` predicted tokens (``compress.eval.perplexity``). Here the same
windows (built with the same functions, in this process) are sent to vLLM as token-id prompts and
scored from vLLM's prompt log-probabilities, so the two perplexities are comparable figure for
figure (vLLM computes in the checkpoint's dtype, bf16 for our exports; ``compress eval`` in float32).

vLLM runs in a subprocess, one engine per call: nothing of vLLM is imported here, a crash or a
refusal comes back as vLLM's own message (``result["error"]``), and a hang ends at ``timeout``.
The subprocess is ``sys.executable`` unless ``python=`` (or ``COMPRESS_VLLM_PYTHON``) names the
interpreter of another virtual environment that holds vLLM.

In that subprocess ``torchvision``, ``torchaudio`` and ``torchcodec`` are hidden (the CPU build of
vLLM pulls CUDA builds of them that fail to load without CUDA; a text model needs none of them),
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in that process and
``VLLM_CPU_KVCACHE_SPACE`` defaults to 2 (GiB).

    from compress.eval.vllm_runner import vllm_perplexity, vllm_unavailable_reason
    reason = vllm_unavailable_reason()      # None when vLLM imports here, else why not
    res = vllm_perplexity("out/w4", seq_len=512, max_windows=8)
    res["perplexity"] or res["error"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

HIDDEN = ("torchvision", "torchaudio", "torchcodec")

# Runs in the subprocess: hides the broken companions, sets vLLM's CPU defaults. sys.modules[name] =
# None makes `import name` raise ImportError and importlib.util.find_spec(name) return None, which is
# how transformers and vLLM decide that an optional package is absent.
_PRELUDE = f"""
import os, sys
for _m in {HIDDEN!r}:
    sys.modules[_m] = None
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.pop("TRITON_INTERPRET", None)
"""

_PROBE = """
import importlib, importlib.util, json, sys
broken = []
for _m in HIDDEN_NAMES:
    if importlib.util.find_spec(_m) is not None:
        try:
            importlib.import_module(_m)
        except BaseException as e:
            broken.append(f"{_m} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        for _k in [k for k in sys.modules if k == _m or k.startswith(_m + ".")]:
            del sys.modules[_k]
if broken:
    print("VLLM_BROKEN " + json.dumps(broken))
""".replace("HIDDEN_NAMES", repr(HIDDEN)) + _PRELUDE + """
import vllm
from vllm.platforms import current_platform
print("VLLM_PROBE " + json.dumps({"version": vllm.__version__, "device": str(current_platform.device_type)}))
"""

_WORKER = _PRELUDE + r"""
import json, math, time, traceback
args = json.loads(open(sys.argv[1]).read())
out_path = sys.argv[2]
def write(obj):
    with open(out_path, "w") as f:
        json.dump(obj, f)
t0 = time.time()
try:
    from vllm import LLM, SamplingParams
    windows = args["windows"]
    llm = LLM(model=args["path"], dtype=args["dtype"], max_model_len=args["seq_len"] + 1, enforce_eager=True,
              enable_prefix_caching=False, seed=0, max_num_seqs=args["max_num_seqs"], **args["llm_kwargs"])
    t1 = time.time()
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], sp, use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(windows, outs):
        lps = o.prompt_logprobs
        assert len(lps) == len(w) and lps[0] is None, (len(lps), len(w))
        for t in range(1, len(w)):
            nll -= lps[t][w[t]].logprob
            count += 1
    write({"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows),
           "load_seconds": round(t1 - t0, 2), "seconds": round(time.time() - t0, 2)})
except BaseException as e:
    write({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:],
           "seconds": round(time.time() - t0, 2)})
    raise SystemExit(1)
"""


def _python(python: str | None) -> str:
    return python or os.environ.get("COMPRESS_VLLM_PYTHON") or sys.executable


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the test suite turns Triton's interpreter on; vLLM must not run under it
    return env


@cache
def _probe(python: str, timeout: float) -> tuple[str | None, str]:
    try:
        p = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    except FileNotFoundError:
        return f"no Python interpreter at {python} (COMPRESS_VLLM_PYTHON)", ""
    except subprocess.TimeoutExpired:
        return f"importing vLLM in {python} did not finish in {timeout:.0f} s", ""
    for line in p.stdout.splitlines():
        if line.startswith("VLLM_BROKEN "):
            broken = json.loads(line[len("VLLM_BROKEN "):])
            return (f"installed but failing to load (CUDA builds pulled by vllm-cpu), they break transformers in {python}: "
                    f"{'; '.join(broken)}; run: pip uninstall -y {' '.join(HIDDEN)}"), ""
        if line.startswith("VLLM_PROBE "):
            info = json.loads(line[len("VLLM_PROBE "):])
            return None, f"vLLM {info['version']} ({info['device']})"
    err = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    last = err[-1] if err else f"exit status {p.returncode}"
    if "No module named 'vllm'" in last:
        return f"vLLM is not installed in {python} (pip install -e '.[vllm]', see docs/vllm.md)", ""
    return f"vLLM does not import in {python}: {last}", ""


def vllm_unavailable_reason(python: str | None = None, timeout: float = 600) -> str | None:
    """None where vLLM imports (in a subprocess, with the companions hidden), else the reason in
    one line: not installed, or the import's own error. Cached per interpreter."""
    return _probe(_python(python), timeout)[0]


def vllm_version(python: str | None = None) -> str | None:
    """``"vLLM 0.32.0 (cpu)"`` where vLLM imports, else None."""
    reason, info = _probe(_python(python), 600)
    return None if reason else info


def eval_windows_of(path, data: str = "builtin:pydoc", seq_len: int = 512, max_windows: int | None = None):
    """The (n, seq_len) int64 windows ``compress eval`` scores for checkpoint ``path`` with
    ``eval.perplexity`` settings ``data``, ``seq_len``, ``max_windows`` (its own functions, its own
    tokenizer: the checkpoint's)."""
    from compress.checkpoint.source import ModelSource
    from compress.data import eval_windows, load_texts, tokenize

    source = ModelSource(Path(path))
    return eval_windows(tokenize(load_texts(data, "eval"), source.tokenizer), seq_len, max_windows)


def vllm_perplexity(path, *, data: str = "builtin:pydoc", seq_len: int = 512, max_windows: int | None = None,
                    windows=None, dtype: str = "auto", python: str | None = None, timeout: float = 1800,
                    max_num_seqs: int = 4, llm_kwargs: dict | None = None) -> dict:
    """Perplexity of checkpoint folder ``path`` in vLLM on the windows ``compress eval`` scores
    (``eval_windows_of``; or ``windows``, an (n, T) tensor or list of token-id lists).

    Returns {"perplexity", "nll", "tokens", "windows", "load_seconds", "seconds"} or, where vLLM
    refuses the checkpoint, crashes or times out, {"error": vLLM's message (type: text), "traceback"
    or "stderr": the end of it, "seconds"}. Never raises for vLLM's failures."""
    path = Path(path).resolve()
    if windows is None:
        windows = eval_windows_of(path, data, seq_len, max_windows)
    windows = [list(map(int, w)) for w in (windows.tolist() if hasattr(windows, "tolist") else windows)]
    if not windows:
        raise ValueError("no windows to score")
    seq_len = max(len(w) for w in windows)
    py = _python(python)
    reason = vllm_unavailable_reason(py)
    if reason:
        return {"error": f"vLLM unavailable: {reason}", "seconds": 0.0}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="compress-vllm-") as tmp:
        args_f, out_f = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args_f.write_text(json.dumps({"path": str(path), "windows": windows, "seq_len": seq_len, "dtype": dtype,
                                      "max_num_seqs": max_num_seqs, "llm_kwargs": llm_kwargs or {}}))
        try:
            p = subprocess.run([py, "-c", _WORKER, str(args_f), str(out_f)], capture_output=True, text=True,
                               timeout=timeout, env=_env(), cwd=tmp, check=False)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-4000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"error": f"TimeoutError: vLLM did not finish in {timeout:.0f} s", "stderr": tail, "seconds": round(time.time() - t0, 2)}
        if out_f.exists():
            res = json.loads(out_f.read_text())
            if "error" in res:
                res["stderr"] = p.stderr[-4000:]
            return res
        return {"error": f"vLLM's process ended with exit status {p.returncode} without a result"
                         f"{' (signal ' + str(-p.returncode) + ')' if p.returncode < 0 else ''}",
                "stderr": p.stderr[-4000:], "seconds": round(time.time() - t0, 2)}


def refusal_message(res: dict) -> str:
    """vLLM's own message of a failed ``vllm_perplexity`` result, in one line: the exception text
    (``Type: message``), trimmed."""
    msg = res.get("error", "")
    return " ".join(msg.split())[:600]
