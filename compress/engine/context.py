"""What the stages of a sweep share, passed as one object instead of a dozen arguments.

``Sweep`` is the whole run (model, passes, plan, options, ranks); ``BlockRun`` is one block's
turn in it (the block, its calibration activations, the batch being run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from compress.engine.dist import World
from compress.engine.inputs import BlockInputs

if TYPE_CHECKING:  # annotations only: the protocol and the model source import nothing of the engine
    from compress.checkpoint.source import ModelSource
    from compress.passes import Pass


def _no_progress(done: int, total: int, what: str) -> None:
    pass


@dataclass
class SweepOptions:
    """How the sweep calibrates (the recipe's ``calibration`` section, and two switches for tests)."""

    batch_size: int = 8  # calibration windows per forward of a block
    # calibrate each Linear group on what the already-compressed groups feed it (q/k/v, o, gate/up,
    # down in turn); False: every Linear of a block on the block's input, one forward per block
    sequential: bool = True
    # windows the report's output error is measured on when no pass needs XᵀX itself (None: all;
    # 0: none): XᵀX costs a forward of the layer per token, so only that many windows pay it
    error_samples: int | None = None
    # keep down_proj's calibration inputs, so a finished block propagates without running gate/up
    # again (llama-style MLPs; ~15% faster on the demo for tokens × intermediate × 4 bytes)
    keep_mlp_inputs: bool = False
    # False: every block is calibrated on the uncompressed model's activations (each layer in
    # isolation, as one-shot scripts do); True: on the outputs of the compressed blocks before it
    propagate: bool = True
    keep: bool = False  # leave the compressed blocks in the model (tests, small models evaluated in memory)
    progress: Callable[[int, int, str], None] = _no_progress

    @classmethod
    def from_calibration(cls, cal, **kw) -> "SweepOptions":
        """From a recipe's ``CalibrationConfig``."""
        return cls(batch_size=cal.batch_size, sequential=cal.sequential, error_samples=cal.error_samples,
                   keep_mlp_inputs=cal.keep_mlp_inputs, propagate=cal.propagate, **kw)


@dataclass
class Sweep:
    """One layer-wise sweep over the decoder blocks."""

    source: "ModelSource"
    model: nn.Module  # ``source.skeleton()``: meta parameters, each block materialized in its turn
    passes: list["Pass"]  # the passes that run in the sweep (absorbed ones dropped), recipe order
    plan: dict[str, list["Pass"]]  # full Linear name -> the passes that apply to it
    blocks_path: str  # e.g. "model.layers"
    blocks: nn.ModuleList
    options: SweepOptions
    world: World = field(default_factory=World)
    needed: set[str] = field(default_factory=set)  # statistics the apply stage needs
    error_batches: int | None = None  # calibration batches the report's error is sampled on

    @property
    def model_type(self) -> str:
        return self.source.config.model_type

    @property
    def device(self) -> torch.device:
        return self.world.device

    def taking_part(self, stage: str) -> list["Pass"]:
        return [p for p in self.passes if p.in_stage(stage)]


@dataclass
class BlockRun:
    """One block's turn: the block, its activations and the calibration batch being run."""

    sweep: Sweep
    index: int
    block: nn.Module
    inputs: BlockInputs | None  # None: no calibration data (data-free passes)
    cursor: list[int] = field(default_factory=lambda: [0])  # the batch being run (read by replays)
    reference: nn.Module | None = None  # the uncompressed block, where a paired statistic needs it

    @property
    def prefix(self) -> str:
        return f"{self.sweep.blocks_path}.{self.index}."

    @property
    def kwargs(self) -> list[tuple[tuple, dict]]:
        """(args, kwargs) of this block's forward, per calibration batch."""
        return self.inputs.kwargs[self.index]

    def targeted(self, names: list[str], p: "Pass | None" = None) -> list[str]:
        """Those of ``names`` (Linears of this block) that the plan compresses (with ``p``)."""
        plan = self.sweep.plan
        return [n for n in names if self.prefix + n in plan and (p is None or p in plan[self.prefix + n])]
