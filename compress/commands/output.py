"""What the commands print: a report as rich tables or one JSON object on stdout (and Markdown on
request); progress bars and log lines on stderr."""

import json
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from compress.commands.options import Report
from compress.errors import GateError
from compress.eval.report import (
    distill_summary,
    report_title,
    layer_errors,
    lowrank_summary,
    to_markdown,
)

err = Console(stderr=True)  # resolves sys.stderr at each write, so CliRunner captures it


def logger(quiet: bool) -> Callable[[str], None]:
    """Log lines, dimmed on stderr; nothing with --quiet."""
    return (lambda m: None) if quiet else (lambda m: err.print(f"[dim]{escape(m)}[/dim]"))


class RichHooks:
    """compress.api's hooks as progress bars per task on stderr; silent with --quiet."""

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
            (self.bar.console if self.bar else err).print(f"[dim]{escape(msg)}[/dim]")

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if not self.bar:
            return
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total, description=f"{task} {info}" if info else task)


def print_json(obj) -> None:
    print(json.dumps(obj))


def emit(report: dict, shown: Report) -> None:
    """The report on stdout (JSON or tables) and, with --markdown, as Markdown in a file."""
    if shown.markdown is not None:
        shown.markdown.parent.mkdir(parents=True, exist_ok=True)
        shown.markdown.write_text(to_markdown(report))
    if shown.as_json:
        print_json(report)
    else:
        print_report(report)


def with_gates(produce: Callable[[], dict], shown: Report) -> None:
    """Run ``produce()`` -> report and print it. A failed gate still prints (and saves) the report,
    then raises GateError (exit 4) naming every failing gate."""
    from compress.api import (
        check_gates,  # compress.api imports torch: not at `compress --help`
    )

    try:
        report = produce()
    except GateError as e:  # run/quantize: the report is saved in the export; show it too
        if getattr(e, "report", None) is not None:
            emit(e.report, shown)
        raise
    if "rank" in report:  # a rank > 0 of a torchrun job: rank 0 prints the report
        return
    emit(report, shown)
    check_gates(report)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)


def _metrics_table(ev: dict, title: str, cols: tuple[str, str]) -> Table:
    """One row per metric: the model's value, and with a baseline its value, change and recovery."""
    has_base = "baseline" in ev
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
    return t


def _sizes(report: dict, kind: str, cols: tuple[str, str]) -> list[tuple[str, int | None, float | None]]:
    """(label, bytes on disk, bits per parameter) of each checkpoint the report compares."""
    if kind == "run":
        return [(cols[0], report["model"].get("size_bytes"), None),
                (cols[1], report["export"]["size_bytes"], report["export"]["bits_per_parameter"])]
    checkpoints = report.get("checkpoints") or {}
    return [(label, c["size_bytes"], c["bits_per_parameter"]) for label in ("baseline", "model") if (c := checkpoints.get(label))]


def _timing_line(report: dict, ev: dict) -> str:
    """Time per stage, where it ran, peak memory and which results came from the cache."""
    tm = report.get("time", {})
    parts = [f"{k.removesuffix('_s').replace('compress', 'compression').replace('distill', 'distillation')} {tm[k]:.0f} s"
             for k in ("compress_s", "distill_s", "eval_s", "total_s") if k in tm]
    cached = sorted({c for label in ("baseline", "model") for c in ev.get(label, {}).get("cached", [])})
    run = report.get("run")
    where = "" if not run else (f" on {run['device']}" + (f" × {run['world_size']} ranks ({run.get('backend')})" if run["world_size"] > 1 else "")
                                + (" (activations in CPU memory)" if run.get("activations") == "cpu" else ""))
    return ", ".join(parts) + where + f", peak RSS {report['peak_rss_mb']:.0f} MB" + (f"; cached: {', '.join(cached)}" if cached else "")


def print_report(report: dict) -> None:
    """A report of any kind (run, eval, compare) as rich tables on stdout."""
    out = Console()
    ev = report.get("eval") or {}
    kind = report.get("kind", "run")
    if kind == "run":
        title = f"compress: {report['model']['path']} -> {report['export']['path']}"
        cols = ("original", "compressed")
    else:
        title = report_title(report, ev, kind)
        cols = ("baseline", "model")
    out.print(_metrics_table(ev, title, cols) if ev.get("metrics") else title)
    sizes = _sizes(report, kind, cols)
    if sizes:
        out.print("size on disk: " + ", ".join(f"{label} {size / 1e6:.1f} MB" + (f" ({bpp:.2f} bits/param)" if bpp else "") for label, size, bpp in sizes))
    export = report.get("export") or {}
    if export.get("sparsity"):
        sp = export["sparsity"]
        out.print(f"sparsity: {sp['global_sparsity']:.1%} of {sp['layers']} pruned layers' weights ({sp['structure']})")
    if export.get("lowrank"):
        out.print(lowrank_summary(export["lowrank"]))
    if report.get("distill"):
        out.print(distill_summary(report["distill"]), highlight=False)
    kind_err, worst = layer_errors(report.get("layers", []))
    if worst:
        out.print(f"highest relative {kind_err} error: " + ", ".join(f"{l['name']} {e:.4f}" for l, e in worst[:5]))
    for g in ev.get("gates", []):
        out.print(("[green]pass[/green] " if g["passed"] else "[bold red]FAIL[/bold red] ") + g["message"], highlight=False)
    out.print(_timing_line(report, ev))


def print_checkpoint(info: dict) -> None:
    """What `compress inspect` shows of a checkpoint: size, parameters, and each kind of layer."""
    out = Console()
    out.print(f"{info['path']}  ({info['model_type']})")
    out.print(f"size on disk {info['size_bytes'] / 1e6:.1f} MB, {info['parameters'] / 1e6:.1f} M parameters, {info['bits_per_parameter']:.2f} bits/parameter")
    for s in info.get("schemes", []):
        kind = "symmetric" if s["symmetric"] else "asymmetric"
        g = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
        what = f"{info['quantized_layers'] - ('embeddings' in info) - len(info.get('tt_embedding', {}))} layers"  # embeddings: own lines
        if s.get("embedding"):
            what = "token embedding" + (" (the tied lm_head reads it)" if info.get("embeddings", {}).get("tied_head") else "")
        out.print(f"  {what}: int{s['bits']} {kind}, {g}{', act-order g_idx' if s['act_order'] else ''}; runs on: {s['runtime']}")
    for name, tt in info.get("tt_embedding", {}).items():
        out.print(f"  {name}: tensor train {'·'.join(map(str, tt['vocab_factors']))} × {'·'.join(map(str, tt['dim_factors']))}, "
                  f"ranks {tt['ranks']}, {tt['parameters'] / 1e6:.2f} M parameters in its cores; runs on: compress", highlight=False)
    if info.get("sparsity"):
        sp = info["sparsity"]
        out.print(f"  {sp['layers']} layers pruned: {sp['structure']}, {sp['global_sparsity']:.1%} of their weights are zero (stored dense)")
    if info.get("lowrank"):
        out.print("  " + lowrank_summary(info["lowrank"]) + ("" if info["lowrank"]["export"] == "merged" else "; loads with compress only"))
    if info.get("structured"):
        st, shape = info["structured"], lambda s: f"hidden {s['hidden']}, heads {s['heads']}/{s['kv_heads']}, MLP {s['intermediate']}, {s['layers']} blocks"
        out.print(f"  structurally pruned: {shape(st['shape_after'])} (was {shape(st['shape_before'])}); "
                  f"{st['params_after'] / st['params_before']:.1%} of {st['params_before'] / 1e6:.1f} M parameters")
    if info.get("ignore"):
        out.print(f"  left unquantized: {', '.join(info['ignore'][:8])}{' ...' if len(info['ignore']) > 8 else ''}")
    rt = info.get("runtimes")
    if rt:
        out.print(f"loads in: {', '.join(rt['loads'])}", highlight=False)
        for runtime, r in rt.get("refuses", {}).items():
            out.print(f"  not {runtime}: {escape(r['why'])}", highlight=False)
