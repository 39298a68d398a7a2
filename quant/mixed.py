"""Mixed precision: each quantized Linear gets its own bit width (among ``widths``, e.g. 2, 3, 4
and 8) so that the weights average a bits budget (``gptq: {bits: 3.5}``), the widths going where
the measured error falls most per bit spent. Pure functions.

A layer's error at each width is measured before the sweep, on the uncompressed model
(``compress.quant.passes``' preview): the layer's output error on the calibration data,
tr(ΔW·H·ΔWᵀ) with the width's round-to-nearest ΔW, times the share of it that reaches the block
output (one probe), over the block output's typical energy: errors in units of the residual
stream, comparable across blocks (the low-rank allocation's lesson, ``compress.lowrank``).

``allocate_bits`` is the Lagrangian greedy: every layer starts at its cheapest width; steps along
each layer's lower convex hull of (bits spent, error) are taken in order of error removed per bit
until the next would exceed the budget. The allocation never exceeds the budget, and on convex
error curves it is the optimum for the bits it spends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerErrors:
    name: str
    params: int  # weights of the layer
    errors: dict[int, float] = field(default_factory=dict)  # bits -> error


def rtn_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW·H·ΔWᵀ): the layer's summed squared output error on the data H = Σ x xᵀ came from."""
    D = (W - Wq).double()
    return float(((D @ H.double()) * D).sum())


def _hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of (bits, error) points sorted by bits, error decreasing along it."""
    pts = sorted(points)
    hull: list[tuple[int, float]] = []
    for b, e in pts:
        if hull and e >= hull[-1][1]:  # more bits, no less error: never worth it
            continue
        while len(hull) >= 2:
            (b1, e1), (b2, e2) = hull[-2], hull[-1]
            if (e1 - e2) / (b2 - b1) <= (e1 - e) / (b - b1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((b, e))
    return hull


def allocate_bits(layers: list[LayerErrors], budget: float) -> dict[str, int]:
    """Bits per layer with Σ params·bits ≤ budget·Σ params, chosen greedily along each layer's
    convex hull by error removed per bit. ValueError where even the cheapest widths exceed it."""
    total = sum(L.params for L in layers)
    allowed = budget * total
    hulls = {L.name: _hull(list(L.errors.items())) for L in layers}
    at = {L.name: 0 for L in layers}
    params = {L.name: L.params for L in layers}
    spent = sum(params[n] * h[0][0] for n, h in hulls.items())
    if spent > allowed + 1e-9:
        raise ValueError(f"a budget of {budget:g} bits is below the narrowest width every layer can take "
                         f"({spent / total:g} bits on average)")
    while True:
        best, gain = None, 0.0
        for n, h in hulls.items():
            i = at[n]
            if i + 1 < len(h):
                (b0, e0), (b1, e1) = h[i], h[i + 1]
                cost = params[n] * (b1 - b0)
                if spent + cost <= allowed + 1e-9 and (e0 - e1) / cost > gain:
                    best, gain = n, (e0 - e1) / cost
        if best is None:
            break
        i = at[best]
        spent += params[best] * (hulls[best][i + 1][0] - hulls[best][i][0])
        at[best] = i + 1
    return {n: hulls[n][at[n]][0] for n in hulls}


def average_bits(layers: list[LayerErrors], bits: dict[str, int]) -> float:
    return sum(L.params * bits[L.name] for L in layers) / max(sum(L.params for L in layers), 1)
