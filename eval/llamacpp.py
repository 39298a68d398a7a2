"""llama.cpp's own tools as a reference for our GGUF exports: find or build them, run them, parse
what they print.

The tools (``llama-perplexity``, ``llama-quantize``, ``llama-imatrix``, ``llama-bench``) are found
in, first to last:

* ``$COMPRESS_LLAMA_CPP``: a folder holding the four binaries (e.g. a llama.cpp ``build/bin``);
* the ``PATH``;
* ``<cache>/llama.cpp/bin`` (``<cache>``: ``$COMPRESS_CACHE``, else ``~/.cache/compress``), where
  ``python -m compress.eval.llamacpp build`` puts them.

``build`` fetches llama.cpp's source the one way this project fetches anything: the sdist of
``llama-cpp-python`` (``LLAMA_CPP_PYTHON``) from PyPI, which vendors llama.cpp; it configures it
with CMake (static, CPU, native but without AMX: ``NO_AMX``), builds the four tools and copies
them, with llama.cpp's ``convert_hf_to_gguf.py`` (and the ``conversion`` package and ``gguf-py``
it imports), to the cache. It needs ``cmake`` and a C++ compiler; about 4 minutes on 2 idle cores.
``install-from TREE`` installs from a tree already built instead.

``convert_hf`` runs ``convert_hf_to_gguf.py`` with this Python and ``PYTHONPATH`` set to the
vendored ``gguf-py`` (the script's Llama path imports ``sentencepiece`` even for a BPE tokenizer:
``pip install sentencepiece``). A byte-level BPE ``tokenizer.json`` with ``byte_fallback: true``
(what transformers' GGUF loader writes, so the demo folder's) sends the converter's Llama path to
its SentencePiece vocabulary, and the GGUF it writes crashes llama.cpp's tokenizer
(``unordered_map::at``); ``convert_hf`` converts such a folder through a view of it whose
``tokenizer.json`` has byte fallback off (a byte-level vocabulary holds every byte, so its
tokenization does not change), and the converter writes the ``gpt2`` vocabulary it recognizes.

Every runner raises ``LlamaCppError`` with the tool's last output lines when the tool fails.

What llama-perplexity measures (``perplexity``): the text tokenized whole, cut into
``len(tokens) // ctx`` consecutive windows of ``ctx`` tokens (the remainder is dropped); each window
is scored on its second half only (``ctx - ctx/2 - 1`` predicted tokens, the first half is context).
So its figure is not the one of ``compress eval`` (every token of each window but the first), only
comparable between GGUF files measured the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix", "llama-bench")
ENV = "COMPRESS_LLAMA_CPP"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors the llama.cpp we build
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
# x86: native, but without AMX. On a CPU that reports AMX, a native build stores q4_0/q8_0/k-quant
# weights in ggml's AMX buffer, and every quantized model then segfaults in its first matmul
# (seen in a Firecracker VM on a Sapphire Rapids-class Xeon: the tile permission is granted, the
# kernels crash). Without AMX, ggml's AVX-512 repacking (CPU_REPACK) still runs. The explicit
# -mno-* flags win over the -march=native that ggml adds after them.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_flags() -> list[str]:
    """``CMAKE_FLAGS``, plus ``NO_AMX`` for the C and C++ compilers on x86-64."""
    import platform

    flags = list(CMAKE_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return flags
ERROR_LINES = 15  # lines of a failing tool's output kept in the error


class LlamaCppError(RuntimeError):
    """A llama.cpp tool is missing or failed; the message ends with its last output lines."""


# ---------------------------------------------------------------------------------------------
# finding the tools


def default_home() -> Path:
    """``<cache>/llama.cpp``: where ``build_tools`` installs (``bin/`` and the converter)."""
    cache = Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")
    return cache / "llama.cpp"


def _has_tools(folder: Path) -> bool:
    return all(os.access(folder / t, os.X_OK) and (folder / t).is_file() for t in TOOLS)


def find_tools() -> Path | None:
    """The folder holding the four tools, or None (``unavailable_reason`` says why)."""
    env = os.environ.get(ENV)
    if env:
        p = Path(env).expanduser()
        return p if _has_tools(p) else None
    on_path = shutil.which(TOOLS[0])
    if on_path and _has_tools(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    home = default_home() / "bin"
    return home if _has_tools(home) else None


def unavailable_reason() -> str | None:
    """One line saying why ``find_tools`` finds nothing (None when the tools are there)."""
    if find_tools() is not None:
        return None
    env = os.environ.get(ENV)
    if env:
        missing = [t for t in TOOLS if not (Path(env).expanduser() / t).is_file()]
        return f"${ENV}={env} lacks {', '.join(missing) or 'executable tools'}"
    return (
        f"llama.cpp's tools ({', '.join(TOOLS)}) are not in ${ENV}, on the PATH or in "
        f"{default_home() / 'bin'}; run `python -m compress.eval.llamacpp build`"
    )


def tool(name: str) -> Path:
    """The path of one tool; LlamaCppError when absent."""
    folder = find_tools()
    if folder is None:
        raise LlamaCppError(unavailable_reason())
    return folder / name


def find_converter() -> Path | None:
    """The folder holding ``convert_hf_to_gguf.py`` with its ``conversion`` package and ``gguf-py``:
    beside the tools or one or two folders up (a llama.cpp tree's ``build/bin``), else the cache."""
    places = []
    tools = find_tools()
    if tools is not None:
        places += [tools, tools.parent, tools.parent.parent]
    places.append(default_home())
    for p in places:
        if (p / CONVERT_SCRIPT).is_file() and (p / "gguf-py" / "gguf").is_dir():
            return p
    return None


# ---------------------------------------------------------------------------------------------
# running them


def _tail(text: str, n: int = ERROR_LINES) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def run_tool(cmd: list, *, log: Path | None = None, env: dict | None = None, timeout: float | None = None) -> str:
    """Run ``cmd`` (stdout and stderr together, as text); the output is written to ``log`` when
    given. LlamaCppError naming the tool, its exit status and its last lines when it fails."""
    cmd = [str(c) for c in cmd]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env, timeout=timeout)
    except FileNotFoundError as e:
        raise LlamaCppError(f"{cmd[0]}: not found ({e})") from e
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        raise LlamaCppError(f"{Path(cmd[0]).name} timed out after {timeout} s; its last lines:\n{_tail(out)}") from e
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(" ".join(cmd) + "\n\n" + r.stdout)
    if r.returncode != 0:
        raise LlamaCppError(f"{Path(cmd[0]).name} failed (exit {r.returncode}): {' '.join(cmd)}\n{_tail(r.stdout)}")
    return r.stdout


# --- llama-perplexity

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf) \+/- ([0-9.eE+-]+|nan|inf)")
_PPL_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)")
_TOO_SHORT = re.compile(r"you need at least (\d+) tokens.*?tokenizes to only (\d+) tokens", re.DOTALL)
_RUNNING = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf),")


def parse_perplexity(text: str) -> dict:
    """The figures of llama-perplexity's output: ``ppl``, ``ppl_stderr``, ``chunks``, ``n_ctx``,
    ``batch_size``, ``scored_tokens`` (second half of each window), ``running`` (the PPL after each
    chunk). ValueError when the output has no final estimate (with the reason where it says one)."""
    if m := _TOO_SHORT.search(text):
        raise ValueError(f"the text is too short: {m.group(2)} tokens, llama-perplexity needs at least {m.group(1)}")
    final = _FINAL.search(text)
    if not final:
        raise ValueError(f"no 'Final estimate' in llama-perplexity's output:\n{_tail(text)}")
    out = {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2))}
    if m := _PPL_CHUNKS.search(text):
        chunks, n_ctx, batch, n_seq = map(int, m.groups())
        out.update(chunks=chunks, n_ctx=n_ctx, batch_size=batch, n_seq=n_seq, scored_tokens=chunks * (n_ctx - n_ctx // 2 - 1))
    out["running"] = [float(v) for _, v in _RUNNING.findall(text)]
    return out


def perplexity(gguf_path, text_file, ctx: int = 512, threads: int = 2, batch: int | None = None, chunks: int | None = None,
               log: Path | None = None, timeout: float | None = None) -> dict:
    """``llama-perplexity -m F -f TEXT -c ctx -b batch`` (batch = ctx): ``parse_perplexity``'s dict
    plus ``seconds``."""
    import time

    cmd = [tool("llama-perplexity"), "-m", gguf_path, "-f", text_file, "-c", ctx, "-b", batch or ctx, "-t", threads]
    if chunks is not None:
        cmd += ["--chunks", chunks]
    t0 = time.perf_counter()
    out = run_tool(cmd, log=log, timeout=timeout)
    try:
        res = parse_perplexity(out)
    except ValueError as e:
        raise LlamaCppError(f"llama-perplexity on {gguf_path}: {e}") from e
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


# --- llama-quantize

_TENSOR = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[([^\]]*)\], type =\s*(\S+),", re.MULTILINE)
_CONVERT = re.compile(r"converting to (\S+) \.\.")
_FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\) (?:\(WARNING[^)]*\) )?-> falling back to\s+(\S+)"
)
_SIZE = re.compile(r"(model|quant) size\s+=\s+([0-9.]+) MiB \(([0-9.]+) BPW\)")


def parse_quantize(text: str) -> dict:
    """llama-quantize's output: ``tensors`` (name -> {shape, from, to}), ``fallbacks`` (tensors whose
    row length does not divide the target type's block: name, ncols, wanted, got), and
    ``model_mib``/``model_bpw``/``quant_mib``/``quant_bpw`` from its closing lines."""
    tensors = {}
    starts = list(_TENSOR.finditer(text))
    for i, m in enumerate(starts):
        chunk = text[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        conv = _CONVERT.search(chunk)
        tensors[m.group(1)] = {"shape": m.group(2).strip(), "from": m.group(3), "to": conv.group(1) if conv else m.group(3)}
    fallbacks = [
        {"tensor": name, "ncols": int(nc), "block": int(blk), "wanted": want, "got": got}
        for name, nc, blk, want, got in _FALLBACK.findall(text)
    ]
    out = {"tensors": tensors, "fallbacks": fallbacks}
    for which, mib, bpw in _SIZE.findall(text):
        out[f"{which}_mib"], out[f"{which}_bpw"] = float(mib), float(bpw)
    return out


def quantize(src, dst, type: str, imatrix=None, threads: int = 2, extra: list | None = None, log: Path | None = None) -> dict:
    """``llama-quantize [--imatrix F] SRC DST TYPE threads``: ``parse_quantize``'s dict plus
    ``seconds``."""
    import time

    cmd = [tool("llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    cmd += [*(extra or []), src, dst, type.upper(), threads]
    t0 = time.perf_counter()
    out = run_tool(cmd, log=log)
    res = parse_quantize(out)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


# --- llama-imatrix

_IM_CHUNKS = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")


def imatrix(model, text_file, out, ctx: int = 512, threads: int = 2, chunks: int | None = None, log: Path | None = None) -> dict:
    """``llama-imatrix -m MODEL -f TEXT -o OUT -c ctx``: ``{"path", "chunks", "n_ctx", "seconds"}``."""
    import time

    cmd = [tool("llama-imatrix"), "-m", model, "-f", text_file, "-o", out, "-c", ctx, "-b", ctx, "-t", threads]
    if chunks is not None:
        cmd += ["--chunks", chunks]
    t0 = time.perf_counter()
    text = run_tool(cmd, log=log)
    if not Path(out).is_file():
        raise LlamaCppError(f"llama-imatrix wrote no {out}:\n{_tail(text)}")
    res = {"path": str(out), "seconds": round(time.perf_counter() - t0, 2)}
    if m := _IM_CHUNKS.search(text):
        res["chunks"], res["n_ctx"] = int(m.group(1)), int(m.group(2))
    return res


# --- llama-bench


def parse_bench(text: str) -> dict:
    """llama-bench's ``-o json`` list: ``pp_tok_s``/``pp_tok_s_std`` (the prompt test),
    ``tg_tok_s``/``tg_tok_s_std`` (the generation test), ``n_prompt``, ``n_gen``, ``threads``,
    ``model_type``, ``model_size``, ``model_n_params``, ``backends``, ``build_commit``, ``cpu_info``."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"no JSON in llama-bench's output:\n{_tail(text)}")
    rows = json.JSONDecoder().raw_decode(text[start:])[0]
    out: dict = {}
    for r in rows:
        kind = "pp" if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 else "tg" if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0 else None
        if kind is None:
            continue
        out[f"{kind}_tok_s"], out[f"{kind}_tok_s_std"] = r["avg_ts"], r.get("stddev_ts")
        out["n_prompt" if kind == "pp" else "n_gen"] = r["n_prompt" if kind == "pp" else "n_gen"]
        for k in ("n_threads", "model_type", "model_size", "model_n_params", "backends", "build_commit", "cpu_info"):
            if k in r:
                out[k] = r[k]
    return out


def bench(gguf, n_prompt: int = 128, n_gen: int = 64, threads: int = 2, repetitions: int = 5, log: Path | None = None) -> dict:
    """``llama-bench -m F -p n_prompt -n n_gen -t threads -r repetitions -o json``: prompt and
    generation tokens/s (``parse_bench``)."""
    cmd = [tool("llama-bench"), "-m", gguf, "-p", n_prompt, "-n", n_gen, "-t", threads, "-r", repetitions, "-o", "json"]
    out = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    if log is not None:
        Path(log).write_text(" ".join(map(str, cmd)) + "\n\n" + out.stderr + "\n" + out.stdout)
    if out.returncode != 0:
        raise LlamaCppError(f"llama-bench failed (exit {out.returncode}) on {gguf}:\n{_tail(out.stderr + out.stdout)}")
    try:
        return parse_bench(out.stdout)
    except (ValueError, KeyError) as e:
        raise LlamaCppError(f"llama-bench on {gguf}: {e}") from e


# --- convert_hf_to_gguf.py


def convert_hf(hf_folder, out, outtype: str = "bf16", log: Path | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py HF --outfile OUT --outtype outtype`` with this Python
    and the vendored ``gguf-py`` first on ``PYTHONPATH``."""
    conv = find_converter()
    if conv is None:
        raise LlamaCppError(
            f"llama.cpp's {CONVERT_SCRIPT} (with gguf-py) is not beside the tools nor in {default_home()}; "
            "run `python -m compress.eval.llamacpp build`"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tempfile.TemporaryDirectory(prefix="convert-view-") as td:
        src = converter_view(Path(hf_folder), Path(td))
        run_tool([sys.executable, conv / CONVERT_SCRIPT, src, "--outfile", tmp, "--outtype", outtype], log=log, env=env)
    tmp.replace(out)
    return out


def _byte_level_with_fallback(tok: dict) -> bool:
    """A BPE tokenizer.json whose pre-tokenizer is (or contains) ByteLevel and has byte_fallback on."""
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and any(p.get("type") == "ByteLevel" for p in pres)


def converter_view(hf_folder: Path, scratch: Path) -> Path:
    """``hf_folder`` itself, or (for a byte-level BPE with byte fallback on, see the module doc) a
    folder in ``scratch`` of links to its files with a ``tokenizer.json`` that has it off."""
    tj = hf_folder / "tokenizer.json"
    if not tj.is_file():
        return hf_folder
    tok = json.loads(tj.read_text(encoding="utf-8"))
    if not _byte_level_with_fallback(tok):
        return hf_folder
    view = scratch / hf_folder.name
    view.mkdir(parents=True)
    for f in hf_folder.iterdir():
        if f.name != "tokenizer.json":
            (view / f.name).symlink_to(f.resolve())
    tok["model"]["byte_fallback"] = False
    (view / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return view


# --- the file itself


def gguf_stats(path) -> dict:
    """What a GGUF file holds: ``file_bytes``, ``tensor_bytes``, ``n_elements``, ``bpw`` (tensor bits
    per weight over every tensor), ``types`` (ggml type -> {"tensors", "elements"})."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    types: dict = {}
    nbytes = nel = 0
    for t in r.tensors:
        name = t.tensor_type.name
        d = types.setdefault(name, {"tensors": 0, "elements": 0})
        d["tensors"] += 1
        d["elements"] += int(t.n_elements)
        nbytes += int(t.n_bytes)
        nel += int(t.n_elements)
    return {
        "file_bytes": Path(path).stat().st_size,
        "tensor_bytes": nbytes,
        "n_elements": nel,
        "bpw": nbytes * 8 / nel if nel else math.nan,
        "types": types,
    }


# ---------------------------------------------------------------------------------------------
# building them


def _extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(into, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(into)
    roots = [p for p in into.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise LlamaCppError(f"{archive.name}: expected one top folder, found {[p.name for p in roots]}")
    return roots[0]


def install_from_tree(src: Path, bin_dir: Path, dest: Path) -> Path:
    """Copy the four tools from ``bin_dir`` and the converter (script, ``conversion``, ``gguf-py``)
    from the llama.cpp tree ``src`` into ``dest`` (``dest/bin``)."""
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if missing:
        raise LlamaCppError(f"{bin_dir} lacks {', '.join(missing)}")
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        shutil.copy2(bin_dir / t, dest / "bin" / t)
    shutil.copy2(src / CONVERT_SCRIPT, dest / CONVERT_SCRIPT)
    for sub in ("conversion", "gguf-py"):
        if (src / sub).is_dir():
            shutil.rmtree(dest / sub, ignore_errors=True)
            shutil.copytree(src / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    (dest / "SOURCE").write_text(f"tools from {bin_dir}, converter from {src}\n")
    return dest


def build_tools(dest: Path | None = None, jobs: int | None = None, keep_source: bool = False, log=print) -> Path:
    """Download ``LLAMA_CPP_PYTHON``'s sdist, build the four tools (``CMAKE_FLAGS``) and install
    them with the converter into ``dest`` (default ``default_home()``). Returns ``dest``."""
    import time

    dest = Path(dest or default_home()).expanduser()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise LlamaCppError("cmake is not on the PATH (`pip install cmake` or the system package), and a C++ compiler is needed too")
    jobs = jobs or os.cpu_count() or 2
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest))
    try:
        log(f"downloading the {LLAMA_CPP_PYTHON} sdist (llama.cpp's source) from PyPI")
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", work, LLAMA_CPP_PYTHON])
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise LlamaCppError(f"pip downloaded no llama_cpp_python sdist into {work}")
        root = _extract(sdists[0], work / "src")
        src = root / "vendor" / "llama.cpp"
        if not (src / "CMakeLists.txt").is_file():
            raise LlamaCppError(f"{sdists[0].name} has no vendor/llama.cpp/CMakeLists.txt")
        build = src / "build"
        t0 = time.perf_counter()
        log(f"configuring llama.cpp ({build})")
        run_tool([cmake, "-S", src, "-B", build, *cmake_flags()], log=work / "configure.log")
        log(f"building {', '.join(TOOLS)} with {jobs} jobs (about 10 minutes on 2 cores)")
        run_tool([cmake, "--build", build, "--config", "Release", "-j", jobs, "--target", *TOOLS], log=work / "build.log")
        install_from_tree(src, build / "bin", dest)
        (dest / "SOURCE").write_text(f"{LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp; cmake {' '.join(cmake_flags())}\n")
        log(f"built in {time.perf_counter() - t0:.0f} s; installed in {dest}")
    finally:
        if keep_source:
            log(f"source and build kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compress.eval.llamacpp", description="llama.cpp's tools for GGUF comparisons")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help=f"download {LLAMA_CPP_PYTHON}'s sdist, build {', '.join(TOOLS)}, install them with the converter")
    b.add_argument("--dest", type=Path, default=None, help=f"install folder (default {default_home()})")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPU count)")
    b.add_argument("--keep-source", action="store_true", help="keep the extracted source and build folder")
    i = sub.add_parser("install-from", help="install from an already built llama.cpp tree (its build/bin) instead of building")
    i.add_argument("tree", type=Path, help="the llama.cpp source folder (with convert_hf_to_gguf.py and build/bin)")
    i.add_argument("--bin", type=Path, default=None, help="the folder of the built tools (default TREE/build/bin)")
    i.add_argument("--dest", type=Path, default=None)
    sub.add_parser("where", help="print the tools' folder and the converter's, or why they are absent")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            build_tools(a.dest, a.jobs, a.keep_source)
        elif a.cmd == "install-from":
            dest = install_from_tree(a.tree, a.bin or a.tree / "build" / "bin", Path(a.dest or default_home()))
            print(f"installed in {dest}")
        else:
            tools = find_tools()
            print(f"tools: {tools}" if tools else f"tools: none ({unavailable_reason()})")
            print(f"converter: {find_converter()}")
            return 0 if tools else 1
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
