"""`compress run`: a recipe file (or the embedded default) run end to end."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from compress.commands.options import (
    Gates,
    Job,
    Report,
    Tasks,
    eval_overrides,
    with_groups,
)
from compress.commands.output import RichHooks, print_json, with_gates
from compress.recipe import DEFAULT_RECIPE, Recipe, dump_recipe, load_recipe


@with_groups(job=Job, tasks=Tasks, gates=Gates, report=Report)
def run_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML; omitted: the embedded default (demo model, GPTQ W4 g64).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Export folder (export.path).")] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", help=(
        "Data-parallel calibration over N processes on this machine: execs `torchrun --standalone --nproc-per-node N -m compress run ...` "
        "(gloo on CPUs, nccl on GPUs; one GPU per rank). Same as launching with torchrun yourself."), min=1)] = None,
    *, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Run a recipe: compress, export, evaluate before vs after (gates: exit 4), print the report."""
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        exec_torchrun(nproc)
    overrides = list(job.set_ or [])
    if output:
        overrides.append(f"export.path={output}")
    if job.overwrite:
        overrides.append("export.overwrite=true")
    overrides += job.overrides() + eval_overrides(tasks, gates)
    rec = load_recipe(recipe if recipe is not None else DEFAULT_RECIPE, overrides)
    run_recipe(rec, job.resume, report, job.dry_run)


def run_recipe(recipe: Recipe, resume: bool, shown: Report, dry_run: bool) -> None:
    """Print the resolved recipe (--dry-run), or run it and print its report."""
    from compress.api import (
        run,  # imports torch: only when a command runs, not at --help
    )

    if dry_run:
        if shown.as_json:
            print_json(recipe.resolved())
        else:
            print(dump_recipe(recipe), end="")
        return

    def produce():
        with RichHooks(shown.quiet) as hooks:
            return run(recipe, resume=resume, hooks=hooks)  # raises GateError after saving the report

    with_gates(produce, shown)


def exec_torchrun(nproc: int) -> None:
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
