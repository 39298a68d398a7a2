"""The Python API under the CLI, one module per job: ``job`` (``run``: compress with a recipe),
``evaluation`` (evaluate and compare), ``inspection`` (what a checkpoint holds), ``distillation`` (train an
existing checkpoint against its original), ``serving`` (generate with a chosen kernel); ``common`` holds
what they share.

    import compress
    report = compress.run(compress.load_recipe("recipe.yaml", ["passes.0.gptq.bits=3"]))
    model = compress.load("out/smollm2-w4")
"""

from compress.api.common import Hooks, check_gates, write_reports
from compress.api.distillation import distill
from compress.api.evaluation import eval_report, evaluate
from compress.api.inspection import inspect_checkpoint
from compress.api.job import run
from compress.api.serving import generate

__all__ = ["Hooks", "check_gates", "distill", "eval_report", "evaluate", "generate", "inspect_checkpoint", "run", "write_reports"]
