"""What the sweep hands on: each Linear's report, each finished block and the compressed modules
outside the blocks (the exporter's input)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class LayerReport:
    name: str
    passes: list[str]
    rel_output_error: float | None  # ‖X(Ŵ−W)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs it saw
    info: dict = field(default_factory=dict)


@dataclass
class BlockResult:
    index: int
    prefix: str  # e.g. "model.layers.3."
    module: nn.Module  # the compressed block (weights on the CPU until the sink frees them)
    layers: list[LayerReport]
    seconds: float


@dataclass
class OutsideResult:
    """The modules outside the blocks that passes compressed (``Pass.apply_outside``)."""

    module: nn.Module  # holds each compressed module at its full name (model.embed_tokens, lm_head)
    layers: list[LayerReport]
    seconds: float
    replaces: list[str]  # the source's tensors they stand in for (the exporter does not copy them)
    phase: str = "before"  # "before" block 0, or "after" the last block (a head solved on its inputs)
