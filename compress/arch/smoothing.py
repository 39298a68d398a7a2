"""Scale folding: the module plumbing the smoothing passes (AWQ, SmoothQuant; their adapters are
in ``quant/passes.py``, their algorithms in ``quant/awq.py`` and ``quant/smoothquant.py``) run on.

Both run in the engine's *smoothing stage*, on a whole decoder block before any of its Linears is
quantized: the engine collects their statistics on the block's calibration inputs, then each pass
folds per-channel scales into the block at the points of ``compress.arch.families`` (``Smooth``:
which norm or Linear feeds which Linears). Folding alone does not change what the block computes
(tests/compress/test_smoothing.py checks the logits); it changes what quantization loses.

Storage dtype: a folded norm weight is rounded to the checkpoint's dtype at once, and the Linears
are scaled by the factor the *rounded* weight really applies, so the exported (bf16) model
computes exactly what was calibrated.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.arch.families import Smooth
from compress.utils import first_output, get_module


@torch.no_grad()
def fold_scales(block: nn.Module, point: Smooth, s: torch.Tensor, plus_one: bool, dtype: torch.dtype) -> torch.Tensor:
    """Divide ``point.prev``'s output channels by ``s`` (in,) and multiply the input columns of
    ``point.linears`` by the same factors. Returns the factors applied to the Linears (``s``,
    corrected for the rounding of a norm's weight to ``dtype``)."""
    prev = get_module(block, point.prev)
    s = s.float()
    if isinstance(prev, nn.Linear):
        # a Linear producer is quantized (or stored) afterwards from these float32 rows
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
        applied = s
    else:
        w = prev.weight.data.float()
        gain = 1 + w if plus_one else w  # what the norm multiplies by
        offset = 1.0 if plus_one else 0.0
        stored = (gain / s - offset).to(dtype).float()  # what the checkpoint will hold
        new_gain = stored + offset
        # the factor the stored norm really divides by; a zero gain (dead channel) keeps s
        applied = torch.where(new_gain != 0, gain / new_gain, s)
        prev.weight.data.copy_(stored)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_((prev.bias.data.float() / applied).to(dtype).float())
    for name in point.linears:
        get_module(block, name).weight.mul_(applied[None, :])
    return applied


def scaled_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the input X diag(s)^-1: H / (s sᵀ)."""
    return H / s[:, None] / s[None, :]


def output_loss(block, point: Smooth, lins: list[nn.Linear], weights, probe, samples: int):
    """loss(Ŵs) = Σ ‖f(x; Ŵ) - f(x; W)‖² of the module ``point.inspect`` on ``samples``
    calibration windows, where f(·; Ŵ) runs it with the group's weights replaced."""
    module = get_module(block, point.inspect)
    calls = probe.module_inputs(point.inspect, samples)  # [(args, kwargs)] per batch
    ref = [first_output(module(*a, **k)) for a, k in calls]

    def loss(qs):
        for l, q in zip(lins, qs):
            l.weight.data = q
        try:
            err = float(sum(((first_output(module(*a, **k)) - r) ** 2).sum() for (a, k), r in zip(calls, ref)))
            return probe.reduce(err) if hasattr(probe, "reduce") else err  # under torchrun: summed over the ranks
        finally:
            for l, w in zip(lins, weights):
                l.weight.data = w

    return loss
