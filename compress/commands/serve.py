"""`compress generate` (greedy decoding on a loaded checkpoint) and `compress bench` (kernel timings)."""

from typing import Annotated

import typer
from rich.markup import escape

from compress.commands.options import JsonOpt, KernelOpt, QuietOpt
from compress.commands.output import err, logger, print_json
from compress.errors import UsageError


def generate_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint folder (compressed or not), .gguf, hub id, or 'demo'.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate (greedy).")] = 32,
    kernel: KernelOpt = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="bfloat16, float16 or float32 (default: bf16 on a GPU; on the CPU the dtype the checkpoint stores, bf16 for our exports, so packed layers run the CPU integer kernels).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Greedy decoding with HF generate() on a loaded model; compressed layers run the chosen kernel."""
    from compress.api.serving import (
        generate,  # imports torch: only when the command runs, not at --help
    )

    res = generate(model, prompt, max_new_tokens, kernel=kernel, dtype=dtype, device=device, log=logger(quiet))
    if as_json:
        print_json(res)
        return
    print(res["text"])
    if not quiet:
        ran = ", ".join(f"{k} ({n} layers)" for k, n in res["kernels"].items()) or "no quantized layers"
        err.print(f"[dim]{res['new_tokens']} tokens in {res['seconds']:.2f} s ({res['tokens_per_s']:.1f} tokens/s) on {res['device']}, {res['dtype']}; kernels: {ran}[/dim]")


def bench_cmd(
    cpu: Annotated[bool, typer.Option("--cpu", help="Smoke run on the CPU (tiny shapes, tiny random model).")] = False,
    shapes: Annotated[list[str] | None, typer.Option("--shape", help="in x out, e.g. 4096x14336 (repeatable; default: the issue's four).")] = None,
    ms: Annotated[list[int] | None, typer.Option("--m", help="Tokens per call (repeatable; default 1 4 16 64 256 1024).")] = None,
    schemes: Annotated[list[str] | None, typer.Option("--scheme", help="w4a16, w8a16, w8a8 (repeatable; default all).")] = None,
    kernel: Annotated[list[str] | None, typer.Option("--kernel", help="Backends to time: torch, triton, cuda (repeatable; default all available).")] = None,
    model: Annotated[str, typer.Option("--model", help="Model for end-to-end greedy decoding tokens/s.")] = "demo",
    decode_tokens: Annotated[int | None, typer.Option("--decode-tokens", help="Tokens to decode end to end.")] = None,
    no_decode: Annotated[bool, typer.Option("--no-decode", help="Skip the end-to-end decoding.")] = False,
    reps: Annotated[int | None, typer.Option("--reps", help="Timed repetitions per point (median).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Kernel benchmark: time, bandwidth vs device copy, speedup over bf16 F.linear; decode tokens/s."""
    # torch and the kernels: only when the command runs, so `compress --help` stays fast
    import torch

    from compress.kernels import bench, requested_backend

    bad = sorted(set(schemes or ()) - set(bench.SCHEMES))
    if bad:
        raise UsageError(f"unknown --scheme {', '.join(bad)}; use {', '.join(bench.SCHEMES)}")
    if not cpu and not torch.cuda.is_available():
        raise UsageError("compress bench measures GPU kernels and this machine has no CUDA GPU; add --cpu for a smoke run on tiny shapes")
    if kernel:
        kernel = [requested_backend(k) or "torch" for k in kernel]
    log = (lambda m: None) if quiet else (lambda m: err.print(escape(m), highlight=False))
    res = bench.run(cpu, shapes, ms, tuple(schemes or bench.SCHEMES), kernel, reps, model, decode_tokens, not no_decode, log=log)
    if as_json:
        print_json(res)
