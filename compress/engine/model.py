"""Stage transform_model: after the sweep, passes that work on the whole checkpoint (model-scope
distillation now; structured pruning and fused rotations next) each read one checkpoint folder
and write the next. The sweep's export is the first; the last pass writes the run's target.

The intermediate checkpoints live beside the target as ``.<name>.student`` (the sweep's export:
what the model stage starts from) and ``.<name>.student<k>``; each pass keeps its resumable state
inside the folder it reads, so ``--resume`` continues the stage without running the sweep again.
The stage runs under the export path's lock (``compress.checkpoint.files.export_lock``: the one
``compress run`` holds already), and its files are written atomically.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.checkpoint.files import RETRY, disk_writes, export_lock
from compress.passes import Pass
from compress.utils import atomic_write_text

STAGE_FILE = "stage.json"  # in the sweep's export: the fingerprint of the passes that made it


@dataclass
class ModelStage:
    """What ``Pass.transform_model`` sees."""

    checkpoint: Path  # the checkpoint to transform (read it; keep resumable state in ``work``)
    original: Path  # the uncompressed model the run started from (a teacher)
    output: Path  # where to write the transformed checkpoint (atomically)
    calibration: torch.Tensor | None  # the calibration windows (N, seq_len)
    resume: bool
    overwrite: bool
    hooks: Any  # ``compress.api.common.Hooks``

    @property
    def work(self) -> Path:
        return self.checkpoint


def staged(target: Path, k: int = 0) -> Path:
    """The folder of the checkpoint that model-stage pass ``k`` reads (0: the sweep's export)."""
    return target.parent / f".{target.name}.student{k or ''}"


def sweep_done(target: Path, fingerprint: str) -> bool:
    """Whether the sweep's export beside ``target`` is complete and made by these passes."""
    stage = staged(target)
    try:
        return (stage / "report.json").is_file() and json.loads((stage / STAGE_FILE).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def mark_sweep_done(target: Path, fingerprint: str) -> None:
    with disk_writes(f"the compressed student is kept in {staged(target)}: {RETRY}"):
        atomic_write_text(staged(target) / STAGE_FILE, json.dumps({"fingerprint": fingerprint}))


def run_model_stage(passes: list[Pass], target: Path, stage: ModelStage) -> tuple[Path, dict]:
    """Each pass in turn, from the sweep's export to ``target``. Returns (the final checkpoint,
    the report sections the passes returned)."""
    sections: dict = {}
    with export_lock(target):  # held already under compress run: one run per export path
        for k, p in enumerate(passes):
            last = k == len(passes) - 1
            stage.checkpoint = staged(target, k)
            stage.output = target if last else staged(target, k + 1)
            sections.update(p.transform_model(stage))
    return stage.output, sections


def clean_model_stage(passes: list[Pass], target: Path) -> None:
    """Remove the intermediate checkpoints once the run is complete."""
    for k in range(len(passes)):
        shutil.rmtree(staged(target, k), ignore_errors=True)
