"""Benchmark (issue 26): distillation without the calibration text's teacher logits on the demo.

One Wanda 2:4 student (the demo pruned on the builtin split, 128 × 512), then, each in its own
`compress distill` process, evaluated on the builtin evaluation split:

* ``off``: off-policy logit distillation on the 128 calibration windows (the default);
* ``on``: the same steps with ``--on-policy 0.5`` (GKD: half the micro-batches on 128 tokens the
  student writes after the first 384 of a window, refreshed every 8 steps);
* ``blackbox``: black-box, the student trained on the demo's own greedy answers (at most 200
  tokens) to ``benchmarks/data/pydoc_prompts.txt`` (two prompts per topic of the builtin
  calibration split), the loss on the answers' tokens; no teacher logits.

    python benchmarks/bench_distill_modes.py [off on blackbox] [--loss forward_kl] [--steps 16]

Prints one JSON line per run: perplexity before and after, steps, tokens, time, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORK = Path("/tmp/bench-distill-modes")
PROMPTS = Path(__file__).parent / "data" / "pydoc_prompts.txt"


def cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", *args, "--json", "--quiet", "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-800:], "cmd": " ".join(args)}
    return json.loads(r.stdout)


def student() -> Path:
    out = WORK / "wanda24"
    if not (out / "report.json").exists():
        rep = cli("prune", "demo", "--method", "wanda", "--pattern", "2:4", "-o", str(out))
        if "error" in rep:
            raise SystemExit(rep["error"])
    return out


def summary(name: str, rep: dict) -> dict:
    if "error" in rep:
        return {"name": name, **rep}
    d = rep["distill"]
    keep = ("steps", "tokens", "seconds", "stopped", "best_step", "heldout_measure", "heldout_kl_start", "heldout_kl_best",
            "heldout_ppl_start", "heldout_ppl_best", "on_policy", "examples", "perplexity", "peak_rss_mb", "total_s")
    return {"name": name, **{k: d[k] for k in keep if k in d}, "report_peak_rss_mb": rep.get("peak_rss_mb")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", default=["off", "on", "blackbox"])
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--steps", default="16")
    a = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    s = str(student())
    common = ["--steps", a.steps]
    runs = {
        "off": ["distill", s, "--teacher", "demo", "--loss", a.loss, *common],
        "on": ["distill", s, "--teacher", "demo", "--loss", a.loss, "--on-policy", "0.5", *common],
        "blackbox": ["distill", s, "--teacher", "demo", "--prompts", str(PROMPTS), "--max-new-tokens", "200", *common],
    }
    for name in a.runs:
        print(json.dumps(summary(name, cli(*runs[name], "-o", str(WORK / name)))), flush=True)


if __name__ == "__main__":
    main()
