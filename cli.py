"""`compress`: the command line. Wiring only: each command lives in compress/commands/ (it builds a
recipe or config, calls compress.api, prints); this file assembles the app and formats errors once.

Exit codes (stable): 0 ok; 1 internal error; 2 bad usage or recipe; 3 input missing or
unreadable; 4 a quality gate failed; 5 training diverged (a non-finite loss; nothing exported); 6 a rank of a
torchrun job failed; 130 interrupted.
"""

import warnings

import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from compress.commands import distill, evaluate, inspect, methods, run, serve
from compress.commands.options import DebugOpt
from compress.commands.output import err
from compress.errors import CompressError


def exit_code(e: BaseException) -> int:
    """Say on stderr what went wrong, in one paragraph, and return the exit code: a CompressError's
    own, 130 for an interrupt, 1 for anything unexpected. Messages are escaped: a `[a, b]` in
    them is text, not rich markup."""
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted: finished blocks are kept beside the export path; rerun the same command with --resume to continue")
        return 130
    if isinstance(e, CompressError):
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {escape(str(e))} (rerun with --debug for the traceback)", highlight=False)
    return 1


class CompressGroup(TyperGroup):
    """The app's group of commands: an error from any command is formatted here, once.

    Here rather than around ``app()`` in main(), so that the app invoked any other way (Typer's
    CliRunner in the tests) exits with the same codes and messages as the shell command."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise  # Typer's own: --help, usage errors (exit 2 with the usage line)
        except (Exception, KeyboardInterrupt) as e:
            if ctx.params.get("debug"):
                raise  # --debug: the traceback
            raise typer.Exit(exit_code(e)) from None


app = typer.Typer(
    cls=CompressGroup,
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


@app.callback()
def _options(debug: DebugOpt = False):
    """Compress Hugging Face LLM checkpoints layer by layer (quantize, prune, low-rank), evaluate, and export."""
    if not debug:
        warnings.simplefilter("ignore", FutureWarning)


app.command("run")(run.run_cmd)
app.command("quantize")(methods.quantize_cmd)
app.command("prune")(methods.prune_cmd)
app.command("lowrank")(methods.lowrank_cmd)
app.command("distill")(distill.distill_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("compare")(evaluate.compare_cmd)
app.command("inspect")(inspect.inspect_cmd)
app.command("demo-model")(inspect.demo_model_cmd)
app.command("generate")(serve.generate_cmd)
app.command("bench")(serve.bench_cmd)


def main() -> None:
    """The `compress` console script (and `python -m compress`)."""
    app()


if __name__ == "__main__":
    main()
