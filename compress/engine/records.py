"""What the sweep hands on: each Linear's report and each finished block (the exporter's input)."""

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
