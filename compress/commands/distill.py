"""`compress distill`: train a finished compressed checkpoint against the model it came from."""

from typing import Annotated

import typer

from compress.commands.options import (
    Calibration,
    Gates,
    NoEvalOpt,
    OverwriteOpt,
    Report,
    SeedOpt,
    with_groups,
)
from compress.commands.output import RichHooks, with_gates
from compress.recipe import load_recipe


@with_groups(calibration=Calibration, gates=Gates, report=Report)
def distill_cmd(
    student: Annotated[str, typer.Argument(help="The compressed checkpoint to train (an export of compress, or any copy of the teacher's architecture).")],
    teacher: Annotated[str, typer.Option("--teacher", help="The original model it was compressed from: a folder, a .gguf file, a hub id, or 'demo'.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the trained student (same format as STUDENT).")],
    loss: Annotated[str, typer.Option("--loss", help="forward_kl, reverse_kl (MiniLLM), jsd (GKD, --set beta), skew_kl (DistiLLM, --set alpha).")] = "forward_kl",
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of both distributions.")] = 1.0,
    train: Annotated[str, typer.Option("--train", help=(
        "auto (quantized layers train their scales, pruned layers their surviving weights, low-rank factors their weights; norms "
        "always), scales, weights, or qat (latent weights through fake quantization, re-quantized at the end)."))] = "auto",
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one pass over the training windows).")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Stop after this many minutes of training.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of weights, factors and norms (scales: --set scale_lr=...).")] = 1e-4,
    teacher_cache: Annotated[str, typer.Option("--teacher-cache", help="online (teacher logits per batch) or topk (its top-k cached once, then freed).")] = "online",
    scope: Annotated[str, typer.Option("--scope", help="model (the only scope for a finished checkpoint; scope block runs in a recipe).")] = "model",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other distill option: --set grad_accum=8 (repeatable; see the recipe's distill pass).")] = None,
    no_eval: NoEvalOpt = False,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted distillation from its last checkpoint.")] = False,
    seed: SeedOpt = None,
    *, calibration: Calibration, gates: Gates, report: Report,
):
    """Train a compressed checkpoint to match the model it came from (knowledge distillation on calibration text; the evaluation split is never read while training).

    Prints perplexity of the original, the student before and after. In a recipe,
    `- distill: {}` after the compressing passes does the same in one run."""
    from compress.api import (
        distill,  # imports torch: only when the command runs, not at --help
    )

    opts = {"scope": scope, "loss": loss, "temperature": temperature, "train": train, "lr": lr, "teacher": teacher_cache}
    opts.update({k: v for k, v in (("steps", steps), ("minutes", minutes)) if v is not None})
    raw = {"model": teacher, "calibration": calibration.recipe(), "passes": [{"distill": opts}],
           "eval": {"perplexity": None} if no_eval else {"gates": gates.settings()}}
    recipe = load_recipe(raw, [f"passes.0.distill.{a}" for a in set_ or []])
    (_, cfg), = recipe.pass_configs()

    def produce():
        with RichHooks(report.quiet) as hooks:
            return distill(student, teacher, output, cfg, calibration=recipe.calibration, eval_cfg=recipe.eval, seed=seed or 0,
                           overwrite=overwrite, resume=resume, hooks=hooks)

    with_gates(produce, report)
