"""Benchmark: GGUF files of the demo model, llama.cpp's quantizer against ours, measured by llama.cpp.

    python benchmarks/bench_gguf.py                               # bf16 + llama.cpp's q4_0 q4_k_m q3_k_m q2_k
    python benchmarks/bench_gguf.py --types q4_k_m,q2_k
    python benchmarks/bench_gguf.py --ours out/gguf               # + OUT/<type>/model.gguf from our exporter
    python benchmarks/bench_gguf.py --ours gptq=out/gguf --no-baseline

Protocol (issue 24), every file measured the same way by ``measure``:

* the demo model (SmolLM2-135M-Instruct, its bf16 HF folder) converted once with llama.cpp's
  ``convert_hf_to_gguf.py --outtype bf16``;
* an importance matrix made once with ``llama-imatrix`` over the whole calibration split of
  ``builtin:pydoc`` (512-token chunks);
* ``llama-quantize`` of the bf16 GGUF to each type, without and with the imatrix;
* ``llama-perplexity -c 512 -b 512`` on the evaluation split (``len // 512`` windows; the tail
  is dropped; each window scores its second half, so the figure is not ``compress eval``'s);
* ``llama-bench -p 128 -n 64 -t 2``: prompt and generation tokens/s;
* file size, and bits per weight over every tensor (from the GGUF's tensor table).

Texts are the splits' documents joined with blank lines (``WORK/calibration.txt``,
``WORK/eval.txt``). Files and measurements are cached in ``--work`` (default /tmp/gguf_bench):
a measurement is redone when its file changes (size or mtime) or with ``--remeasure``.
Prints a markdown table and writes JSON (``--out``, default benchmarks/results/gguf-demo.json).

Our exporter's files: ``--ours DIR`` (``DIR/<type>/model.gguf``), or from Python
``measure_gguf(path)`` for one file (same protocol, same cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from compress.eval import llamacpp as lc

TYPES = ("q4_0", "q4_k_m", "q3_k_m", "q2_k")
DATA = "builtin:pydoc"
CTX = 512
N_PROMPT, N_GEN = 128, 64
DEFAULT_WORK = Path("/tmp/gguf_bench")
MEASURE_VERSION = 1
BUSY_CORES = 0.25  # other processes kept more than this many cores busy during llama-bench: its figures are low  # bump when `measure` changes what it measures


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_texts(work: Path) -> dict[str, Path]:
    """The calibration and evaluation splits as text files (rewritten only when they change)."""
    from compress.data import load_texts

    out = {}
    for split, name in (("calibration", "calibration.txt"), ("eval", "eval.txt")):
        text = "\n\n".join(load_texts(DATA, split))
        p = work / name
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
        out[split] = p
    return out


def count_tokens(hf_folder: Path, text_file: Path) -> int:
    """Tokens of the text with the model's own tokenizer, no special tokens (the demo's GGUF adds
    no BOS: llama.cpp's converter turns add_bos off for its 49152-token vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder)
    return len(tok(text_file.read_text(), add_special_tokens=False)["input_ids"])


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children),
    or None where /proc/stat is absent."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def speed(gguf: Path, work: Path, threads: int, repetitions: int) -> dict:
    """llama-bench of one file, and ``other_cores_busy``: the cores that other processes kept busy
    meanwhile on average (machine busy time less llama-bench's own, over the wall time)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    res = lc.bench(gguf, n_prompt=N_PROMPT, n_gen=N_GEN, threads=threads, repetitions=repetitions,
                   log=work / "logs" / f"{gguf.parent.name}-{gguf.stem}.bench.log")
    c1, wall = _cpu_seconds(), time.perf_counter() - t0
    if c0 and c1:
        res["other_cores_busy"] = round(max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / wall, 2)
    return res


def measure(gguf: Path, eval_text: Path, work: Path, threads: int = 2, repetitions: int = 5, remeasure: bool = False,
            remeasure_speed: bool = False) -> dict:
    """Everything the table shows for one GGUF file: size, bits/weight, types, llama-perplexity
    on ``eval_text`` (512-token windows) and llama-bench speed. Cached by file size and mtime;
    ``remeasure_speed`` runs llama-bench again on a cached entry (perplexity is deterministic)."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "threads": threads, "reps": repetitions,
           "text": str(eval_text), "text_size": eval_text.stat().st_size, "version": MEASURE_VERSION,
           "tools": {t: [lc.tool(t).stat().st_size, lc.tool(t).stat().st_mtime_ns] for t in ("llama-perplexity", "llama-bench")}}
    cache = work / "measure" / (str(gguf).strip("/").replace("/", "__") + ".json")
    if cache.is_file() and not remeasure:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            if remeasure_speed:
                log(f"llama-bench {gguf}")
                sp = cached["result"]["speed"] = speed(gguf, work, threads, repetitions)
                cache.write_text(json.dumps(cached, indent=1))
                log(f"  pp {sp.get('pp_tok_s', float('nan')):.1f} tg {sp.get('tg_tok_s', float('nan')):.1f} tok/s "
                    f"(other processes: {sp.get('other_cores_busy')} cores)")
            return cached["result"]
    logs = work / "logs"
    log(f"measuring {gguf}")
    res = {"file": str(gguf), **lc.gguf_stats(gguf)}
    ppl = lc.perplexity(gguf, eval_text, ctx=CTX, threads=threads, log=logs / f"{gguf.parent.name}-{gguf.stem}.ppl.log")
    res["perplexity"] = {k: v for k, v in ppl.items() if k != "running"}
    res["speed"] = speed(gguf, work, threads, repetitions)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "result": res}, indent=1))
    log(f"  ppl {ppl['ppl']:.4f} over {ppl.get('chunks')} chunks ({ppl['seconds']} s); "
        f"pp {res['speed'].get('pp_tok_s', float('nan')):.1f} tg {res['speed'].get('tg_tok_s', float('nan')):.1f} tok/s")
    return res


def measure_gguf(gguf, work: Path = DEFAULT_WORK, threads: int = 2, repetitions: int = 5) -> dict:
    """The hook for our exporter: measure one GGUF file (e.g. ``OUT/model.gguf`` of
    ``compress quantize demo --gguf TYPE -o OUT``) exactly as the table's rows are measured."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return measure(Path(gguf), write_texts(work)["eval"], work, threads, repetitions)


def quantize_cached(src: Path, dst: Path, qtype: str, imatrix: Path | None, work: Path, threads: int) -> dict:
    """llama-quantize once per (type, imatrix); its parsed log is kept beside the file."""
    meta = dst.with_suffix(".quantize.json")
    if dst.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    log(f"llama-quantize {qtype}{' with the imatrix' if imatrix else ''} -> {dst}")
    res = lc.quantize(src, dst, qtype, imatrix=imatrix, threads=threads, log=work / "logs" / f"{dst.parent.name}-{qtype}.quantize.log")
    meta.write_text(json.dumps(res, indent=1))
    return res


def type_summary(q: dict) -> dict:
    """Tensor count per final ggml type (from llama-quantize's log)."""
    out: dict = {}
    for t in q["tensors"].values():
        out[t["to"]] = out.get(t["to"], 0) + 1
    return dict(sorted(out.items()))


def fallback_summary(fallbacks: list[dict]) -> dict:
    """llama-quantize's fallbacks grouped by wanted -> got type: count, row lengths, the tensor
    kinds (names without the block number)."""
    out: dict = {}
    for f in fallbacks:
        d = out.setdefault(f"{f['wanted']}->{f['got']}", {"count": 0, "ncols": [], "tensors": []})
        d["count"] += 1
        kind = ".".join(x for x in f["tensor"].split(".") if not x.isdigit() and x != "blk")
        if f["ncols"] not in d["ncols"]:
            d["ncols"].append(f["ncols"])
        if kind not in d["tensors"]:
            d["tensors"].append(kind)
    return out


def parse_ours(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for s in specs:
        label, _, path = s.rpartition("=") if "=" in s else ("ours", "", s)
        out.append((label or "ours", Path(path).expanduser()))
    return out


def table(rows: list[dict]) -> str:
    head = "| type | method | file MiB | bits/weight | ppl | Δppl vs bf16 | pp tok/s | tg tok/s |"
    lines = [head, "|" + "---|" * 8]
    base = next((r["perplexity"]["ppl"] for r in rows if r["method"] == "convert (bf16)"), None)
    for r in rows:
        ppl = r["perplexity"]["ppl"]
        d = f"{(ppl / base - 1) * 100:+.1f}%" if base and r["method"] != "convert (bf16)" else ""
        sp = r["speed"]
        busy = " *" if sp.get("other_cores_busy", 0) > BUSY_CORES else ""
        lines.append(
            f"| {r['type']} | {r['method']} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.2f} | {ppl:.4f} ± {r['perplexity']['ppl_stderr']:.3f} | {d} "
            f"| {sp.get('pp_tok_s', float('nan')):.1f} ± {sp.get('pp_tok_s_std') or 0:.1f} | {sp.get('tg_tok_s', float('nan')):.1f} ± {sp.get('tg_tok_s_std') or 0:.1f}{busy} |"
        )
    if busy_rows := [r["speed"].get("other_cores_busy", 0) for r in rows if r["speed"].get("other_cores_busy", 0) > BUSY_CORES]:
        lines.append(f"\n\\* measured while other processes kept {min(busy_rows):.2f}-{max(busy_rows):.2f} cores busy: "
                     "rerun with --remeasure-speed on an idle machine")
    return "\n".join(lines)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated llama-quantize types (default {','.join(TYPES)})")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of GGUF files, logs and measurements")
    ap.add_argument("--ours", action="append", default=[], metavar="[LABEL=]DIR",
                    help="our exporter's files: DIR/<type>/model.gguf for each type (repeatable; label default 'ours')")
    ap.add_argument("--no-baseline", action="store_true", help="skip llama.cpp's quantizations (bf16 is still measured)")
    ap.add_argument("--no-imatrix", action="store_true", help="skip the llama.cpp quantizations with an imatrix")
    ap.add_argument("--imatrix-chunks", type=int, default=None, help="limit llama-imatrix to this many 512-token chunks (default: the whole calibration text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
    ap.add_argument("--remeasure", action="store_true", help="measure again even where a cached measurement exists")
    ap.add_argument("--remeasure-speed", action="store_true", help="run llama-bench again on cached measurements (e.g. once the machine is idle)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gguf-demo.json")
    return ap.parse_args(argv)


def _imatrix(a, work: Path, bf16: Path, texts: dict) -> tuple[Path, dict]:
    """llama-imatrix over the calibration text, once (cached in ``work``)."""
    im, meta = work / "imatrix.gguf", work / "imatrix.json"
    if not (im.is_file() and meta.is_file()):
        log(f"llama-imatrix over {texts['calibration']} -> {im}")
        info = lc.imatrix(bf16, texts["calibration"], im, ctx=CTX, threads=a.threads, chunks=a.imatrix_chunks,
                          log=work / "logs" / "imatrix.log")
        meta.write_text(json.dumps(info))
        log(f"  {info.get('chunks')} chunks in {info['seconds']} s")
    return im, json.loads(meta.read_text())


def _baseline(a, work: Path, bf16: Path, texts: dict, types: list[str]) -> tuple[list[dict], dict, dict | None]:
    """llama.cpp's own quantizer at each type, with and without the imatrix, measured."""
    rows: list[dict] = []
    quant_logs: dict = {}
    im, imatrix_info = (None, None) if a.no_imatrix else _imatrix(a, work, bf16, texts)
    for qt in types:
        for method, imx, sub in (("llama.cpp", None, "llamacpp"), ("llama.cpp + imatrix", im, "llamacpp-imatrix")):
            if method.endswith("imatrix") and im is None:
                continue
            dst = work / sub / f"{qt}.gguf"
            q = quantize_cached(bf16, dst, qt, imx, work, a.threads)
            quant_logs[f"{sub}/{qt}"] = {"fallbacks": fallback_summary(q["fallbacks"]), "types": type_summary(q),
                                         "quant_mib": q.get("quant_mib"), "quant_bpw": q.get("quant_bpw"), "seconds": q.get("seconds")}
            rows.append({"type": qt, "method": method, **measure(dst, texts["eval"], work, a.threads, a.reps, a.remeasure, a.remeasure_speed)})
    return rows, quant_logs, imatrix_info


def _ours(a, work: Path, texts: dict, types: list[str]) -> list[dict]:
    rows = []
    for label, folder in parse_ours(a.ours):
        for qt in types:
            f = folder / qt / "model.gguf"
            if not f.is_file():
                log(f"{label}: no {f}; skipped")
                continue
            rows.append({"type": qt, "method": label, **measure(f, texts["eval"], work, a.threads, a.reps, a.remeasure, a.remeasure_speed)})
    return rows


def _print(rows, note, imatrix_info, n_cal_tokens, quant_logs) -> None:
    print()
    print(table(rows))
    print()
    print(note)
    if imatrix_info:
        print(f"imatrix: {imatrix_info.get('chunks')} chunks × {CTX} tokens of the calibration split ({n_cal_tokens} tokens)")
    falls = {k: v["fallbacks"] for k, v in quant_logs.items() if v["fallbacks"]}
    if falls:
        print("llama-quantize fallbacks (row length not a multiple of the type's block):")
        for k, fb in falls.items():
            print(f"  {k}: " + "; ".join(f"{d['count']} {kk} (ncols {d['ncols']}: {', '.join(d['tensors'])})" for kk, d in fb.items()))
        print("final tensor types:")
        for k, v in quant_logs.items():
            print(f"  {k}: {v['types']}")


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if (why := lc.unavailable_reason()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from compress.checkpoint.source import resolve_model

    hf = resolve_model("demo", log=log)
    texts = write_texts(work)
    n_eval_tokens, n_cal_tokens = count_tokens(hf, texts["eval"]), count_tokens(hf, texts["calibration"])
    log(f"demo: {hf}; evaluation text {n_eval_tokens} tokens, calibration text {n_cal_tokens} tokens")

    bf16 = work / "bf16.gguf"
    if not bf16.is_file():
        log(f"convert_hf_to_gguf.py {hf} -> {bf16}")
        t0 = time.perf_counter()
        lc.convert_hf(hf, bf16, "bf16", log=work / "logs" / "convert.log")
        log(f"  converted in {time.perf_counter() - t0:.0f} s")

    rows: list[dict] = [{"type": "bf16", "method": "convert (bf16)", **measure(bf16, texts["eval"], work, a.threads, a.reps, a.remeasure, a.remeasure_speed)}]
    quant_logs, imatrix_info = {}, None
    if not a.no_baseline:
        base, quant_logs, imatrix_info = _baseline(a, work, bf16, texts, types)
        rows += base
    rows += _ours(a, work, texts, types)

    order = {t: i for i, t in enumerate(["bf16", *types])}
    rank = {"convert (bf16)": 0, "llama.cpp": 1, "llama.cpp + imatrix": 2}  # then ours, by label
    rows.sort(key=lambda r: (order.get(r["type"], 99), rank.get(r["method"], 3), r["method"]))
    ppl0 = rows[0]["perplexity"]
    chunks = ppl0.get("chunks")
    used = chunks * CTX if chunks else None
    note = (
        f"llama-perplexity: {chunks} chunks × {CTX} tokens = {used} of the evaluation text's {n_eval_tokens} tokens "
        f"({'the whole text' if used == n_eval_tokens else f'the last {n_eval_tokens - used} tokens dropped'}); "
        f"each chunk scores its second half, {ppl0.get('scored_tokens')} predicted tokens in all"
    )
    _print(rows, note, imatrix_info, n_cal_tokens, quant_logs)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "protocol": {
            "model": "demo (SmolLM2-135M-Instruct, bf16 HF folder) -> convert_hf_to_gguf.py --outtype bf16",
            "data": DATA, "ctx": CTX, "perplexity": f"llama-perplexity -c {CTX} -b {CTX} -t {a.threads}",
            "speed": f"llama-bench -p {N_PROMPT} -n {N_GEN} -t {a.threads} -r {a.reps}",
            "imatrix": f"llama-imatrix -c {CTX} over the calibration split" + (f", {a.imatrix_chunks} chunks" if a.imatrix_chunks else ""),
            "llama_cpp": lc.LLAMA_CPP_PYTHON + " sdist (vendored llama.cpp)",
            "tools": str(lc.find_tools()), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "eval_tokens": n_eval_tokens, "calibration_tokens": n_cal_tokens, "note": note, "imatrix": imatrix_info,
        "rows": rows, "quantize": quant_logs, "seconds": round(time.perf_counter() - t_start, 1),
    }, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
