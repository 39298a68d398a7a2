"""`compress eval` and `compress compare`: the same metrics on a model and its baseline."""

from typing import Annotated

import typer

from compress.commands.options import EvalData, Gates, Report, Tasks, with_groups
from compress.commands.output import RichHooks, with_gates
from compress.recipe import EvalConfig, load_recipe

GROUPS = {"ev": EvalData, "tasks": Tasks, "gates": Gates, "report": Report}


@with_groups(**GROUPS)
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder (compressed or not), .gguf, hub id, or 'demo'.")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="Also evaluate this model, same data and protocol; gates compare with it.")] = None,
    *, ev: EvalData, tasks: Tasks, gates: Gates, report: Report,
):
    """Evaluate a model (perplexity, lm-eval tasks) and --baseline with the same protocol; gates exit 4."""
    evaluate(model, baseline, "eval", ev, tasks, gates, report)


@with_groups(**GROUPS)
def compare_cmd(
    a: Annotated[str, typer.Argument(help="The reference checkpoint (the baseline), e.g. the original model.")],
    b: Annotated[str, typer.Argument(help="The checkpoint compared with it, e.g. a compressed one.")],
    *, ev: EvalData, tasks: Tasks, gates: Gates, report: Report,
):
    """Two checkpoints side by side: the same metrics on both, sizes, bits per parameter (B against A)."""
    evaluate(b, a, "compare", ev, tasks, gates, report)


def evaluate(model: str, baseline: str | None, kind: str, ev: EvalData, tasks: Tasks, gates: Gates, shown: Report) -> None:
    from compress.api import (
        eval_report,  # imports torch: only when a command runs, not at --help
    )

    cfg = eval_config(ev, tasks, gates)

    def produce():
        with RichHooks(shown.quiet) as hooks:
            return eval_report(model, baseline, cfg, seed=ev.seed or 0, kind=kind, hooks=hooks)

    with_gates(produce, shown)


def eval_config(ev: EvalData, tasks: Tasks, gates: Gates) -> EvalConfig:
    """The options as the recipe's eval section, validated like a recipe (errors name eval.<field>)."""
    names = tasks.names()
    perplexity = ev.perplexity
    if perplexity is None:
        perplexity = not names or ev.data != "builtin:pydoc"  # with tasks only, perplexity on request
    raw = {
        "perplexity": {"data": ev.data, "seq_len": ev.seq_len, "max_windows": ev.max_windows} if perplexity else None,
        "tasks": names, "limit": tasks.limit, "num_fewshot": ev.num_fewshot, "batch_size": ev.batch_size, "gates": gates.settings(),
        "cache": not tasks.no_cache,
    }
    return load_recipe({"eval": raw}).eval
