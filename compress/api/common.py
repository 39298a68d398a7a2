"""What every job of the API shares: the hooks it reports through, the reports it writes, the
gates it checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import GateError
from compress.eval.gates import failure_message
from compress.eval.report import (  # one schema for every report: eval/report.schema.json
    REPORT_SCHEMA,
    to_markdown,
)
from compress.utils import atomic_write_text

__all__ = ["REPORT_SCHEMA", "Hooks", "check_gates", "storage_dtype", "write_reports"]


class Hooks:
    """How the library talks to its caller (the CLI renders these with rich)."""

    def log(self, msg: str) -> None:
        pass

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        """``info``: a short status beside the bar (e.g. distillation's loss and tokens/s)."""


def storage_dtype(config) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (scales are stored in it too)."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return getattr(torch, dt) if isinstance(dt, str) else dt


def write_reports(report: dict, folder: Path) -> None:
    """``report.json`` and ``report.md`` into ``folder``, each written atomically."""
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", to_markdown(report))):
        atomic_write_text(Path(folder) / name, text)


def check_gates(report: dict) -> None:
    """Raise ``GateError`` (exit 4) naming every failing gate; the report rides on it as ``.report``."""
    ev = report.get("eval") or {}
    if ev.get("passed") is False:
        e = GateError(failure_message(ev["gates"]))
        e.report = report
        raise e
