"""Mixed precision: each quantized Linear gets its own bit width (among ``widths``, e.g. 2, 3, 4
and 8) so that the weights average a bits budget (``gptq: {bits: 3.5}``), the widths going where
the measured error falls most per bit spent. Pure functions.

A layer's error at each width is measured before the sweep, on the uncompressed model
(``compress.quant.passes``' preview): the layer's output error on the calibration data,
tr(ΔW·H·ΔWᵀ) with the width's round-to-nearest ΔW, times the share of it that reaches the block
output (one probe), over the block output's typical energy: errors in units of the residual
stream, comparable across blocks (the low-rank allocation's lesson, ``compress.lowrank``).

``allocate_bits`` spends the budget with the greedy the low-rank rank allocation uses
(``compress.allocation.water_fill``): every layer starts at its narrowest width, and steps along
each layer's lower convex hull of (bits spent, error) are taken in order of error removed per bit
(a smaller step where the next one no longer fits). It never exceeds the budget, and on convex
error curves it is the optimum for the bits it spends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.allocation import water_fill


@dataclass
class LayerErrors:
    name: str
    params: int  # weights of the layer
    errors: dict[int, float] = field(default_factory=dict)  # bits -> error


def rtn_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW·H·ΔWᵀ): the layer's summed squared output error on the data H = Σ x xᵀ came from."""
    D = (W - Wq).double()
    return float(((D @ H.double()) * D).sum())


def options(L: LayerErrors) -> list[tuple[int, float, int]]:
    """(bits spent, error, width) of the layer's widths, narrowest first; a width that does not
    lower the error of a narrower one is dropped (never worth its bits)."""
    out: list[tuple[int, float, int]] = []
    for b, e in sorted(L.errors.items()):
        if not out or e < out[-1][1]:
            out.append((L.params * b, e, b))
    return out


def allocate_bits(layers: list[LayerErrors], budget: float) -> dict[str, int]:
    """Bits per layer with Σ params·bits ≤ budget·Σ params (``compress.allocation.water_fill``
    over each layer's widths). ValueError where even the narrowest widths exceed it."""
    total = sum(L.params for L in layers)
    opts = [options(L) for L in layers]
    narrowest = sum(o[0][0] for o in opts)
    if narrowest > budget * total + 1e-9:
        raise ValueError(f"a budget of {budget:g} bits is below the narrowest width every layer can take "
                         f"({narrowest / total:g} bits on average)")
    at = water_fill(opts, budget * total + 1e-9)
    return {L.name: o[a][2] for L, o, a in zip(layers, opts, at)}


def average_bits(layers: list[LayerErrors], bits: dict[str, int]) -> float:
    return sum(L.params * bits[L.name] for L in layers) / max(sum(L.params for L in layers), 1)
