"""`compress quantize`, `prune` and `lowrank`: one method on one model. Each builds a recipe from a
row of compress.recipe.METHODS and its options, and runs it like `compress run`."""

from typing import Annotated

import typer

from compress.commands.options import (
    Calibration,
    Gates,
    Job,
    LowrankMethodOpt,
    ModelArg,
    OutputOpt,
    PruneMethodOpt,
    QuantizeMethodOpt,
    Report,
    Targets,
    Tasks,
    eval_overrides,
    with_groups,
)
from compress.commands.run import run_recipe
from compress.errors import UsageError
from compress.recipe import get_method, load_recipe, method_passes

GROUPS = {"calibration": Calibration, "targets": Targets, "job": Job, "tasks": Tasks, "gates": Gates, "report": Report}


@with_groups(**GROUPS)
def quantize_cmd(
    model: ModelArg,
    output: OutputOpt,
    method: QuantizeMethodOpt = "gptq",
    bits: Annotated[float, typer.Option("--bits", help=(
        "Weight bits, 2-8 (vLLM serves 4 and 8). Fractional (e.g. 3.5, gptq/rtn): mixed precision, each layer 2, 3, 4 or 8 bits "
        "by its measured sensitivity, averaging this."))] = 4,
    group_size: Annotated[str, typer.Option("--group-size", help=(
        "Columns per scale: auto (per layer: 128 where it divides in_features, else the largest power of two down to 16 that "
        "does, else per channel), a number that divides every targeted layer, or -1 (per channel)."))] = "auto",
    asymmetric: Annotated[bool, typer.Option("--asym/--sym", help="Asymmetric (zero points) or symmetric.")] = False,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ: visit columns by activation order.")] = True,
    g_idx: Annotated[bool, typer.Option("--g-idx", help="GPTQ act-order with groups in visiting order, exported as g_idx (default: static groups, no g_idx).")] = False,
    alpha: Annotated[float, typer.Option("--alpha", help="SmoothQuant migration strength (0-1).")] = 0.5,
    objective: Annotated[str | None, typer.Option("--objective", help=(
        "GPTQ: fit each layer's quantized outputs to the original model's (original: GPTAQ, about twice the calibration "
        "time; measured best at 3 bits) or to its own on the compressed model's inputs (propagated, the default)."),
        metavar="original|propagated")] = None,
    outliers: Annotated[float | None, typer.Option("--outliers", help=(
        "GPTQ: keep this fraction of each layer's weights (e.g. 0.005; per input column the worst rounded) unquantized beside "
        "the codes (SpQR's dense-and-sparse); 32 bits each. Only compress.load reads such exports."), metavar="FRACTION")] = None,
    weak_columns: Annotated[str | None, typer.Option("--weak-columns", help=(
        "GPTQ: keep this many whole input columns per layer (e.g. 8), or this fraction of them (e.g. 0.01), unquantized "
        "beside the codes: those of largest H_jj·‖ΔW_j‖² (OWQ's weak columns), which absorb the other columns' rounding "
        "error; 16 bits per weight in them. Only compress.load reads such exports."), metavar="N|FRACTION")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help=(
        "Fuse QuaRot's randomized Hadamard rotations into the weights first (recipe: `- rotate: {}` before the quantizer): "
        "the same function, outliers spread over all columns; an ordinary checkpoint, lm_head untied."))] = False,
    r4: Annotated[bool, typer.Option("--r4", help=(
        "With --rotate: also QuaRot's R4, a Hadamard on each down_proj's input computed at run time (recipe: "
        "`rotate: {r4: true}`), for --activations 8. Only compress.load runs such exports."))] = False,
    r3: Annotated[bool, typer.Option("--r3", help=(
        "With --rotate and --kv-cache: also QuaRot's R3, a Hadamard on each head's queries and keys after RoPE (recipe: "
        "`rotate: {r3: true}`); changes no weight."))] = False,
    spinquant: Annotated[int | None, typer.Option("--spinquant", help=(
        "With --rotate: learn R1 and R2 for the quantizer instead of keeping QuaRot's random ones (SpinQuant: this many "
        "Cayley SGD steps on the Stiefel manifold, matching the original model's next-token distribution on the "
        "calibration windows; recipe: `rotate: {learn: {steps: 100}}`). The export is as ordinary as --rotate's. Trained for "
        "round-to-nearest error: before --method gptq, plain --rotate measured better."),
        metavar="STEPS", min=1)] = None,
    kv_cache: Annotated[int | None, typer.Option("--kv-cache", help=(
        "Round every key and value vector of the KV cache to 8 or 4 bits (per token and head) where compress.load runs the "
        "model (recipe: `kv_cache: {bits: 8}` on the quantizer); other runtimes serve the same weights with their own cache."),
        metavar="8|4")] = None,
    activations: Annotated[int | None, typer.Option("--activations", help=(
        "Also quantize each Linear's input per token to 8 (or 4) bits at run time (recipe: `activations: {bits: 8}`): with "
        "--bits 8 --group-size -1, W8A8 (like --method w8a8 without smoothing); with packed weights, WnA8 (e.g. W4A8), "
        "or W4A4 with 4 (compress.load only)."),
        metavar="8|4")] = None,
    embeddings: Annotated[int | None, typer.Option("--embeddings", help=(
        "Also quantize the token embedding and lm_head to 4 or 8 bits (recipe: `embeddings: {bits: 4}` on the quantizer): "
        "row-wise, symmetric, the Linears' group size; a tied lm_head reads the same table; gptq solves the head on its "
        "inputs. Loads in compress and, for untied models, vLLM (GPU). With --embeddings-tt: the lm_head's width."),
        metavar="4|8")] = None,
    embeddings_tt: Annotated[int | None, typer.Option("--embeddings-tt", help=(
        "Store the token embedding as a tensor train of this rank (TensorGPT's TT-SVD; recipe: `embeddings: {tt_rank: 64}` "
        "on the quantizer): the lookup builds each row from small cores. A tied lm_head is untied and kept dense, or at "
        "--embeddings 4|8 bits. Only compress.load reads such exports."), metavar="RANK")] = None,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Quantize one model with one method (builds a recipe and runs it)."""
    gptq_only = [flag for flag, given in (("--g-idx", g_idx), ("--outliers", outliers), ("--weak-columns", weak_columns)) if given]
    if gptq_only and "gptq" not in (p.name for p in get_method("quantize", method).passes):
        raise UsageError(f"{' and '.join(gptq_only)}: for the GPTQ methods only (--method gptq, awq+gptq)")
    opts = {"bits": bits, "group_size": group_size, "symmetric": not asymmetric, "act_order": act_order, "static_groups": not g_idx,
            "alpha": alpha, "embeddings": _embeddings(embeddings, embeddings_tt), "objective": objective,
            "outliers": outliers, "weak_columns": weak_columns, "activations": None if activations is None else {"bits": activations},
            "kv_cache": None if kv_cache is None else {"bits": kv_cache}}
    passes = _rotate(rotate, r4, r3, spinquant) + method_passes("quantize", method, opts, targets.ignore)
    run_method(model, output, passes, calibration, targets, job, tasks, gates, report)


def _rotate(rotate: bool, r4: bool, r3: bool, spinquant: int | None) -> list[dict]:
    """The rotate pass from --rotate, --r4, --r3 and --spinquant (each of the others needs --rotate)."""
    if (r4 or r3) and not rotate:
        raise UsageError(f"{'--r4' if r4 else '--r3'} adds an online rotation to --rotate's: give both")
    if spinquant is not None and not rotate:
        raise UsageError("--spinquant learns --rotate's rotations: give both")
    learn = {} if spinquant is None else {"learn": {"steps": spinquant}}
    return [{"rotate": {"r4": r4, "r3": r3, **learn}}] if rotate else []


def _embeddings(bits: int | None, tt_rank: int | None) -> dict | None:
    """The quantizer's ``embeddings`` option from --embeddings and --embeddings-tt (then the head's bits)."""
    if tt_rank is not None:
        return {"tt_rank": tt_rank} | ({"head_bits": bits} if bits is not None else {})
    return None if bits is None else {"bits": bits}


@with_groups(**GROUPS)
def prune_cmd(
    model: ModelArg,
    output: OutputOpt,
    method: PruneMethodOpt = "sparsegpt",
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of each targeted Linear's weights set to zero, in [0, 1); an N:M pattern implies 1 - N/M.")] = 0.5,
    pattern: Annotated[str, typer.Option("--pattern", help="unstructured (per output row) or N:M, e.g. 2:4 (N kept of every M inputs; sparse tensor cores run 2:4).")] = "unstructured",
    allocation: Annotated[str, typer.Option("--allocation", help="uniform (every layer the same) or owl (blocks with more activation outliers keep more; unstructured only).")] = "uniform",
    owl_lambda: Annotated[float, typer.Option("--owl-lambda", help="OWL: block sparsities span sparsity ± this.")] = 0.08,
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: an outlier is a score above this × the block's mean.")] = 5.0,
    structured: Annotated[bool, typer.Option("--structured", help=(
        "Remove whole heads, MLP channels, hidden dimensions and blocks instead of single weights: a smaller dense model "
        "every runtime loads. With --params or explicit widths (--hidden, --heads, --kv-heads, --intermediate, --layers)."))] = False,
    params: Annotated[str | None, typer.Option("--params", help="--structured: share of all parameters kept (embeddings included), e.g. 0.75 or 75%; the shape is searched.")] = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="--structured: the hidden size kept.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="--structured: query heads kept per block.")] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="--structured: key/value heads kept per block.")] = None,
    intermediate: Annotated[int | None, typer.Option("--intermediate", help="--structured: MLP channels kept per block.")] = None,
    layers: Annotated[int | None, typer.Option("--layers", help="--structured: blocks kept.")] = None,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Prune one model with one method (builds a recipe and runs it).

    Quantize afterwards in one sweep with a recipe: `- sparsegpt: {...}` then `- gptq: {...}` runs
    both in a joint solve. --structured writes a smaller dense model (recipe: `- prune_structured:
    {params: 0.75}`, then `- distill: {}` to recover)."""
    widths = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate, "layers": layers}
    if structured:
        if (method, sparsity, pattern, allocation) != ("sparsegpt", 0.5, "unstructured", "uniform"):
            raise UsageError("--structured removes whole structures; --method, --sparsity, --pattern and --allocation "
                             "apply to unstructured and N:M pruning")
        opts = {k: v for k, v in widths.items() if v is not None} | ({"params": _share(params)} if params is not None else {})
        if not opts:
            raise UsageError("--structured: give --params (e.g. 0.75) or the widths to keep (--hidden, --heads, --kv-heads, "
                             "--intermediate, --layers)")
        run_method(model, output, [{"prune_structured": opts}], calibration, targets, job, tasks, gates, report)
        return
    if params is not None or any(v is not None for v in widths.values()):
        raise UsageError("--params and the widths (--hidden, --heads, --kv-heads, --intermediate, --layers) need --structured")
    if pattern.strip().lower() not in ("unstructured", "none", "") and sparsity == 0.5:
        sparsity = None  # an N:M pattern sets its own, unless --sparsity says otherwise
    opts = {"sparsity": sparsity, "pattern": pattern, "allocation": allocation, "owl_lambda": owl_lambda, "owl_m": owl_m}
    run_method(model, output, method_passes("prune", method, opts, targets.ignore), calibration, targets, job, tasks, gates, report)


@with_groups(**GROUPS)
def lowrank_cmd(
    model: ModelArg,
    output: OutputOpt,
    reduction: Annotated[str, typer.Option("--reduction", help="Share of the targeted Linears' parameters to remove overall, in (0, 1): 0.2 or 20%.")] = "0.2",
    method: LowrankMethodOpt = "whitened",
    allocation: Annotated[str, typer.Option("--allocation", help=(
        "sensitivity (ranks where each parameter buys the most output accuracy, measured in a preview sweep) or uniform (every layer keeps the same share)."))] = "sensitivity",
    rank: Annotated[int | None, typer.Option("--rank", help="One rank for every targeted Linear, instead of --reduction.")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="Export B·A multiplied back into dense weights (any tool loads it; no size or speed gain).")] = False,
    *, calibration: Calibration, targets: Targets, job: Job, tasks: Tasks, gates: Gates, report: Report,
):
    """Replace each Linear by two smaller ones (W ≈ B·A, truncated SVD on the calibration activations) to remove a share of the parameters.

    The factored export loads with `compress eval` and compress.load; --merged writes plain dense
    weights. Quantize the factors in the same sweep with a recipe: `- lowrank: {...}` then
    `- gptq: {...}`."""
    opts = {"reduction": reduction, "allocation": allocation, "rank": rank}
    run_method(model, output, method_passes("lowrank", method, opts, targets.ignore), calibration, targets, job, tasks, gates, report,
               extra=["export.lowrank=merged"] if merged else [])


def _share(v: str) -> float:
    t = v.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"--params {v!r}: a share such as 0.75 or 75%") from None


def run_method(model: str, output: str, passes: list[dict], calibration: Calibration, targets: Targets, job: Job, tasks: Tasks,
               gates: Gates, report: Report, extra: list[str] = ()) -> None:
    """The recipe a one-method command builds, with its overrides (--seed, --device, the
    evaluation options, ``extra``, then --set, which wins), run."""
    raw = {
        "model": model,
        "seed": job.seed or 0,
        "calibration": calibration.recipe(),
        "passes": passes,
        "export": {"path": output, "overwrite": job.overwrite},
    }
    if targets.no_eval:
        raw["eval"] = {"perplexity": None}
    overrides = job.overrides() + eval_overrides(tasks, gates) + list(extra) + list(job.set_ or [])
    run_recipe(load_recipe(raw, overrides), job.resume, report, job.dry_run)
