"""Stage transform_model: passes that work on the whole checkpoint (structured pruning before the
sweep, model-scope distillation after it; fused rotations next) each read one checkpoint folder
and write the next.

A run is a chain of steps in recipe order (``plan_steps``): each model-scope pass is a step of its
own, and the consecutive passes that run in the layer-wise sweep are one step. The first step
reads the source model; each later step reads the folder the step before it wrote; the last step
writes the run's target. The intermediate checkpoints live beside the target as
``.<name>.student`` (step 0's output) and ``.<name>.student<k>``; each is marked complete with the
fingerprint of the passes that made it (``STAGE_FILE``), so ``--resume`` continues after the last
complete step. A pass keeps its resumable state in the folder it reads (``ModelStage.work``; the
first step, which reads the source, gets ``.<name>.state``). The steps run under the export path's
lock (``compress.checkpoint.files.export_lock``: the one ``compress run`` holds already), and
every file is written atomically.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.checkpoint.files import RETRY, disk_writes, export_lock
from compress.errors import UsageError
from compress.passes import Pass
from compress.utils import atomic_write_text

STAGE_FILE = "stage.json"  # in a step's output: the fingerprint of the passes that made it, and their report sections


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
    work: Path | None = None  # where the pass keeps resumable state (None: in ``checkpoint``)

    def __post_init__(self):
        self.work = self.work or self.checkpoint


@dataclass
class Step:
    """One step of a run: a model-scope pass, or the passes of one layer-wise sweep."""

    kind: str  # "model" or "sweep"
    passes: list[Pass]
    end: int  # the index after its last pass in the recipe (the fingerprint covers passes[:end])


def plan_steps(passes: list[Pass]) -> list[Step]:
    """The run's steps in recipe order (module docstring). One sweep at most: a model-scope pass
    between two groups of sweep passes would need a second sweep over a changed model."""
    steps: list[Step] = []
    for k, p in enumerate(passes):
        kind = "model" if p.in_stage("transform_model") else "sweep"
        if kind == "sweep" and steps and steps[-1].kind == "sweep":
            steps[-1].passes.append(p)
            steps[-1].end = k + 1
        else:
            steps.append(Step(kind, [p], k + 1))
    kinds = [s.kind for s in steps]
    if kinds.count("sweep") > 1:
        first = kinds.index("sweep")
        between = next(s.passes[0].name for s in steps[first:] if s.kind == "model")
        raise UsageError(f"passes: {between} runs on the whole model between two groups of layer-wise passes; put it first "
                         "(structured pruning) or last (distillation)")
    return steps


def staged(target: Path, k: int = 0) -> Path:
    """The folder of the checkpoint that model-stage pass ``k`` reads (0: the sweep's export)."""
    return target.parent / f".{target.name}.student{k or ''}"


def state_folder(target: Path) -> Path:
    """Where the first step keeps its resumable state when it is a model-scope pass (it reads the source)."""
    return target.parent / f".{target.name}.state"


def step_done(folder: Path, fingerprint: str) -> dict | None:
    """The report sections saved with step output ``folder`` if it is complete and made by these
    passes, else None."""
    try:
        saved = json.loads((folder / STAGE_FILE).read_text())
        return saved.get("sections", {}) if saved["fingerprint"] == fingerprint else None
    except (OSError, ValueError, KeyError):
        return None


def mark_step_done(folder: Path, fingerprint: str, sections: dict | None = None) -> None:
    with disk_writes(f"the intermediate checkpoint is kept in {folder}: {RETRY}"):
        atomic_write_text(folder / STAGE_FILE, json.dumps({"fingerprint": fingerprint, "sections": sections or {}}))


def run_model_pass(p: Pass, target: Path, stage: ModelStage) -> dict:
    """One model-scope pass from ``stage.checkpoint`` to ``stage.output``; its report sections."""
    with export_lock(target):  # held already under compress run: one run per export path
        return p.transform_model(stage)


def clean_steps(steps: list[Step], target: Path) -> None:
    """Remove the intermediate checkpoints once the run is complete."""
    for k in range(len(steps)):
        shutil.rmtree(staged(target, k), ignore_errors=True)
    shutil.rmtree(state_folder(target), ignore_errors=True)
