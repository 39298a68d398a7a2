"""Benchmark: a data-free W8A8 run against loading and saving the model, in one run.

Issue 13's bar for recipes that need no data (plain RTN W8A8): the whole command within 3× of the
time it takes to load the checkpoint and save it again. Both are timed here on the same model, in
fresh processes, one after the other (``--repeat`` times, alternating, so a noisy machine hits
both alike):

* load + save: transformers ``from_pretrained`` (bf16, as stored) then ``save_pretrained``;
* W8A8: ``compress run`` with ``- rtn: {bits: 8, group_size: -1, activations: {bits: 8}}``, no
  evaluation (read, round, write the export).

    python benchmarks/bench_loadsave.py [--model demo] [--repeat 2] [--workdir /tmp/bench-loadsave]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOAD_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2])
"""


def timed(cmd: list[str]) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/bench-loadsave")
    args = ap.parse_args()
    from compress.checkpoint.source import resolve_model

    model = str(resolve_model(args.model))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    w8a8 = [sys.executable, "-m", "compress", "run", "--set", f"model={model}",
            "--set", "passes=[{rtn: {bits: 8, group_size: -1, activations: {bits: 8}}}]",
            "--set", "eval.perplexity=null", "-o", str(work / "w8a8"), "--overwrite"]
    rows: dict[str, list[float]] = {"load + save (transformers)": [], "compress W8A8 (rtn, data-free)": []}
    for _ in range(args.repeat):
        shutil.rmtree(work / "saved", ignore_errors=True)
        rows["load + save (transformers)"].append(timed([sys.executable, "-c", LOAD_SAVE, model, str(work / "saved")]))
        rows["compress W8A8 (rtn, data-free)"].append(timed(w8a8))
    best = {k: min(v) for k, v in rows.items()}
    for k, v in rows.items():
        print(f"{k:34s} best {best[k]:7.1f} s   runs {', '.join(f'{t:.1f}' for t in v)}")
    ratio = best["compress W8A8 (rtn, data-free)"] / best["load + save (transformers)"]
    print(f"ratio W8A8 / (load + save): {ratio:.2f} (bar: <= 3)")


if __name__ == "__main__":
    main()
