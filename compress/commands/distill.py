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
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the trained student (same format as STUDENT).")],
    teacher: Annotated[str | None, typer.Option("--teacher", help=(
        "The model to learn from: a folder, a .gguf file, a hub id, or 'demo'. Alone: the original STUDENT was compressed from "
        "(logit distillation, same architecture and vocabulary). With --prompts: any causal LM, which answers the prompts first "
        "(black-box)."))] = None,
    teacher_data: Annotated[str | None, typer.Option("--teacher-data", help=(
        "Black-box: a .jsonl of a teacher's responses (records with prompt and response, or chat messages ending with the "
        "assistant's); the student learns the responses (loss on their tokens only, chat template applied). No teacher model needed."))] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help=(
        "Black-box: a .jsonl (prompt or messages) or .txt (one per line) of prompts that --teacher answers first (cached), "
        "then the student learns its responses."))] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Black-box: the longest response the teacher writes to a prompt.")] = 256,
    response_temperature: Annotated[float, typer.Option("--response-temperature", help="Black-box: the teacher's sampling temperature (0: greedy).")] = 0.0,
    on_policy: Annotated[float, typer.Option("--on-policy", help=(
        "GKD: this share of the micro-batches trains on text the student writes itself from prompts cut from the windows "
        "(0 to 1; --set on_policy_tokens=, on_policy_every=); use with --loss jsd or reverse_kl."))] = 0.0,
    stream: Annotated[str | None, typer.Option("--stream", help=(
        "Train on windows of this .txt/.jsonl corpus read as training goes (larger than memory) instead of the calibration "
        "windows; needs --steps or --tokens."))] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Stop after this many tokens went through the student (a training budget).")] = None,
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
    """Train a compressed checkpoint to match the model it came from (knowledge distillation on calibration text; the evaluation split is never read while training), or to learn any model's text (black-box: --teacher-data, or --teacher with --prompts).

    Prints perplexity of the original, the student before and after. In a recipe,
    `- distill: {}` after the compressing passes does the same in one run.
    --data generated trains on text the teacher writes itself (no data needed)."""
    from compress.api import (
        distill,  # imports torch: only when the command runs, not at --help
    )

    from compress.distill.blackbox import BlackBox

    blackbox = BlackBox.from_options(teacher, teacher_data, prompts, max_new_tokens, response_temperature)
    opts = {"scope": scope, "loss": loss, "temperature": temperature, "train": train, "lr": lr, "teacher": teacher_cache,
            "on_policy": on_policy}
    opts.update({k: v for k, v in (("steps", steps), ("minutes", minutes), ("tokens", tokens), ("data", stream)) if v is not None})
    raw = {"model": teacher or student, "calibration": calibration.recipe(), "passes": [{"distill": opts}],
           "eval": {"perplexity": None} if no_eval else {"gates": gates.settings()}}
    recipe = load_recipe(raw, [f"passes.0.distill.{a}" for a in set_ or []])
    (_, cfg), = recipe.pass_configs()

    def produce():
        with RichHooks(report.quiet) as hooks:
            return distill(student, teacher, output, cfg, calibration=recipe.calibration, eval_cfg=recipe.eval, seed=seed or 0,
                           overwrite=overwrite, resume=resume, hooks=hooks, blackbox=blackbox)

    with_gates(produce, report)
