"""The layer-wise engine and its stages (docs/architecture.md draws them).

``sweep`` runs the stages over the decoder blocks; ``plan`` decides which pass touches which
Linear; ``block`` is one block's stages; ``observe`` collects statistics with hooks; ``inputs``
holds the calibration activations; ``preview`` is the look at the whole model first; ``model``
runs the model-scope stage after the sweep; ``dist`` shares the work between torchrun ranks.
"""

from compress.engine.context import Sweep, SweepOptions
from compress.engine.inputs import BlockInputs, capture_inputs
from compress.engine.plan import check_plan
from compress.engine.records import BlockResult, LayerReport
from compress.engine.sweep import compress_blocks

__all__ = ["BlockInputs", "BlockResult", "LayerReport", "Sweep", "SweepOptions", "capture_inputs", "check_plan", "compress_blocks"]
