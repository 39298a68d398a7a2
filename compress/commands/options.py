"""Every shared option of the commands, declared once: `Annotated` aliases, and option groups.

A group is a dataclass whose fields are options of one concept (the report, the gates, the
calibration data, ...); ``@with_groups(report=Report)`` adds its fields to a command and hands the
command one ``Report``. A new option of a concept is one field here. Defaults sit on the field or
on the command's parameter (Typer forbids them inside ``Annotated``).

No ``from __future__ import annotations`` here: Typer and `with_groups` read these annotations as
objects.
"""

import dataclasses
import functools
import inspect
import json
from pathlib import Path
from typing import Annotated

import typer

from compress.errors import UsageError
from compress.recipe import method_help

# --- output and process
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (and nothing else there).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
MarkdownOpt = Annotated[Path | None, typer.Option("--markdown", help="Also write the Markdown summary (for CI job summaries) to this file.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the recipe's).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help=(
    "Where the engine computes: auto (the first CUDA GPU if any, else the CPU), cpu, cuda, cuda:N (overrides the recipe's)."))]
# --- a compressing job's recipe and export folder
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")]
MaxShardSizeOpt = Annotated[str | None, typer.Option("--max-shard-size", help=(
    "Largest safetensors shard of the export, as transformers writes them: 4GB (default), 500MB, 2GiB or bytes "
    "(export.max_shard_size); one file when the export fits."))]
TargetOpt = Annotated[str | None, typer.Option("--target", help=(
    "The runtime the export is for: vllm, vllm-cpu, transformers or compress (export.target). Checked before any work: "
    "a scheme that runtime cannot load exits 2 naming what works instead (e.g. symmetric for vllm-cpu)."))]
GgufOpt = Annotated[str | None, typer.Option("--gguf", metavar="TYPE", help=(
    "Write OUT/model.gguf for llama.cpp instead of compressed-tensors (export.type): q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, "
    "q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k. The quantizer (rtn, gptq, awq) solves on llama.cpp's own grid for each tensor, "
    "as llama.cpp's mix assigns the types."))]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished block.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and stop.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: --set passes.0.gptq.bits=3 (repeatable).")]
ModelArg = Annotated[str, typer.Argument(help="A checkpoint folder, a .gguf file, a hub id, or 'demo'.")]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Export folder.")]
# --- the --method of the one-method commands: choices and help from compress.recipe.METHODS
QuantizeMethodOpt = Annotated[str, typer.Option("--method", help=method_help("quantize"))]
PruneMethodOpt = Annotated[str, typer.Option("--method", help=method_help("prune"))]
LowrankMethodOpt = Annotated[str, typer.Option("--method", help=method_help("lowrank"))]
# --- calibration and targets of the one-method commands (quantize, prune, lowrank; distill's data)
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration samples.")]
CalSeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample.")]
CalDataOpt = Annotated[str, typer.Option("--data", help=(
    "Calibration data: builtin:pydoc, a .txt/.jsonl/.parquet file, a hub dataset, or 'generated' (--samples sequences of "
    "--seq-len tokens the model writes itself; calibration.generate sets the sampling)."))]
NoTextCheckOpt = Annotated[bool, typer.Option("--no-text-check", help=(
    "Calibrate on the data even where it does not look like text (not UTF-8, control characters, far more tokens per "
    "character than English gives): calibration.check_text: false."))]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Layers to leave alone (name, suffix or re:regex; repeatable).")]
NoEvalOpt = Annotated[bool, typer.Option("--no-eval", help="Skip the before/after perplexity.")]
# --- evaluation and gates
TasksOpt = Annotated[str | None, typer.Option("--tasks", help="lm-eval tasks, comma-separated: lm-eval's own (where their data is reachable) or the offline pydoc_ppl, pydoc_lastword.")]
TaskFileOpt = Annotated[list[str] | None, typer.Option("--task-file", help="An lm-eval task YAML, or a folder of them (repeatable).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="At most this many examples per lm-eval task.")]
FewshotOpt = Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples per lm-eval prompt (default: the task's own).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Evaluate again even where a cached result exists.")]
MaxPplOpt = Annotated[str | None, typer.Option("--max-ppl-increase", help="Gate: fail (exit 4) when a perplexity rises more than this over the baseline, e.g. 5%.")]
MinRecoveryOpt = Annotated[list[str] | None, typer.Option("--min-recovery", help="Gate: every metric keeps at least this share of the baseline's (0.97), or METRIC=0.97 (repeatable).")]
MaxDropOpt = Annotated[list[str] | None, typer.Option("--max-drop", help="Gate: METRIC=DROP, the largest absolute drop allowed, e.g. acc=0.02 (repeatable).")]
PplDataOpt = Annotated[str, typer.Option("--data", help="Perplexity text: builtin:pydoc (its evaluation split) or any text file.")]
PplSeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per perplexity window.")]
MaxWindowsOpt = Annotated[int | None, typer.Option("--max-windows", help="Perplexity on at most this many windows.")]
PplOpt = Annotated[bool | None, typer.Option("--perplexity/--no-perplexity", help="Windowed perplexity (default: on, unless only --tasks/--task-file are given).")]
EvalBatchOpt = Annotated[int, typer.Option("--batch-size", help="lm-eval requests per forward pass.")]
# --- serving
KernelOpt = Annotated[str | None, typer.Option("--kernel", help="Kernel backend: torch, cpu (int4/int8 CPU kernels, bf16 compute), triton or cuda (default: the fastest for the device, or $COMPRESS_KERNEL); sparse24 requires 2:4 semi-structured weights (2:4 checkpoints, CUDA GPUs of compute capability 8.0+, bf16/fp16; automatic there unless --kernel torch).")]


# ---------------------------------------------------------------- option groups

@dataclasses.dataclass
class Report:
    """How the report is shown."""

    markdown: MarkdownOpt = None
    as_json: JsonOpt = False
    quiet: QuietOpt = False


@dataclasses.dataclass
class Gates:
    """Quality gates against the baseline."""

    max_ppl_increase: MaxPplOpt = None
    min_recovery: MinRecoveryOpt = None
    max_drop: MaxDropOpt = None

    def settings(self) -> dict:
        """The gate options as the recipe's eval.gates mapping (validated with the recipe)."""
        gates: dict = {"max_ppl_increase": self.max_ppl_increase} if self.max_ppl_increase is not None else {}
        for opt, vals in (("min_recovery", self.min_recovery), ("max_drop", self.max_drop)):
            mixed = f"--{opt.replace('_', '-')}: give either one number or METRIC=VALUE pairs, not both"
            for v in vals or []:
                if "=" in v:
                    if not isinstance(gates.get(opt, {}), dict):
                        raise UsageError(mixed)
                    metric, _, val = v.partition("=")
                    gates.setdefault(opt, {})[metric.strip()] = val.strip()
                else:
                    if opt in gates:
                        raise UsageError(mixed)
                    gates[opt] = v
        return gates


@dataclasses.dataclass
class Tasks:
    """lm-eval tasks and the evaluation cache."""

    tasks: TasksOpt = None
    task_file: TaskFileOpt = None
    limit: LimitOpt = None
    no_cache: NoCacheOpt = False

    def names(self) -> list[str]:
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()] + list(self.task_file or [])


@dataclasses.dataclass
class Job:
    """A compressing job's recipe overrides, output policy and seed."""

    set_: SetOpt = None
    overwrite: OverwriteOpt = False
    resume: ResumeOpt = False
    dry_run: DryRunOpt = False
    seed: SeedOpt = None
    device: DeviceOpt = None
    max_shard_size: MaxShardSizeOpt = None
    target: TargetOpt = None
    gguf: GgufOpt = None

    def overrides(self) -> list[str]:
        """--seed, --device, --max-shard-size, --target and --gguf as recipe overrides (before the --set ones, which win)."""
        pairs = (("seed", self.seed), ("device", self.device), ("export.max_shard_size", self.max_shard_size), ("export.target", self.target),
                 ("export.type", self.gguf))
        return [f"{k}={v}" for k, v in pairs if v is not None]


@dataclasses.dataclass
class Calibration:
    """Calibration data of the one-method commands."""

    samples: SamplesOpt = 128
    seq_len: CalSeqLenOpt = 512
    data: CalDataOpt = "builtin:pydoc"
    no_text_check: NoTextCheckOpt = False

    def recipe(self) -> dict:
        return {"data": self.data, "samples": self.samples, "seq_len": self.seq_len, "check_text": not self.no_text_check}


@dataclasses.dataclass
class Targets:
    """Which layers a one-method command leaves alone, and whether it evaluates."""

    ignore: IgnoreOpt = None
    no_eval: NoEvalOpt = False


@dataclasses.dataclass
class EvalData:
    """What eval and compare measure, and how."""

    data: PplDataOpt = "builtin:pydoc"
    seq_len: PplSeqLenOpt = 512
    max_windows: MaxWindowsOpt = None
    perplexity: PplOpt = None
    num_fewshot: FewshotOpt = None
    batch_size: EvalBatchOpt = 1
    seed: SeedOpt = None


def eval_overrides(tasks: Tasks, gates: Gates) -> list[str]:
    """The evaluation options of run and the one-method commands as --set overrides (so the saved
    recipe holds them)."""
    out, names, settings = [], tasks.names(), gates.settings()
    if names:
        out.append("eval.tasks=" + json.dumps(names))
    if tasks.limit is not None:
        out.append(f"eval.limit={tasks.limit}")
    if settings:
        out.append("eval.gates=" + json.dumps(settings))
    if tasks.no_cache:
        out.append("eval.cache=false")
    return out


def with_groups(**groups: type):
    """Give a command the options of option groups.

    ``@with_groups(report=Report)`` appends Report's fields to the command's signature as
    keyword-only options (Typer builds the command from the signature) and calls the command with
    ``report=Report(...)`` built from them, in place of those options."""

    def deco(command):
        fields = {name: dataclasses.fields(cls) for name, cls in groups.items()}
        sig = inspect.signature(command)
        own = [p for p in sig.parameters.values() if p.name not in groups]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type, default=f.default)
                 for name in groups for f in fields[name]]

        @functools.wraps(command)
        def wrapper(**options):  # Typer passes every option by name
            for name, cls in groups.items():
                options[name] = cls(**{f.name: options.pop(f.name) for f in fields[name]})
            return command(**options)

        wrapper.__signature__ = sig.replace(parameters=own + added)
        return wrapper

    return deco
