"""The layer-wise engine and its stages (see docs/architecture.md).

``sweep`` runs the stages over the decoder blocks, ``plan`` decides which pass touches which
Linear, ``observe`` collects statistics with hooks, ``inputs`` holds the calibration activations,
``dist`` shares the work between torchrun ranks.
"""

from compress.engine.sweep import BlockInputs, BlockResult, LayerReport, check_plan, compress_blocks

__all__ = ["BlockInputs", "BlockResult", "LayerReport", "check_plan", "compress_blocks"]
