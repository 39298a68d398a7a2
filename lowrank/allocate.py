"""Rank allocation: spend a parameter budget across layers.

Each layer ℓ (in_ℓ × out_ℓ, dense cost D_ℓ = in·out) keeps r_ℓ components at (in + out) parameters
each (plus ``extra``, a sparse residual's nonzeros, when it has one), or stays dense when that
reaches D_ℓ (a factorization that large saves nothing). The budget is (1 − reduction) · Σ D_ℓ, and
the allocation never exceeds it.

* ``uniform``: every layer keeps the same share of its parameters, r = ⌊((1 − reduction)·D − extra)/(in+out)⌋;
* ``sensitivity``: greedy water-filling over every layer's error-vs-rank curve e_ℓ(r) (``errors``,
  or from the components' gains: e(r) = Σ_{i≥r} g_i / E_ℓ, the relative output error). Each curve
  is reduced to its lower convex hull in (parameters, error) over the ranks a layer may take
  (multiples, then dense); the steps along all hulls are bought in order of error removed per
  parameter while they fit. On convex curves with equal step costs this is the exact optimum
  of Σ_ℓ e_ℓ(r_ℓ) under the budget; otherwise it is optimal up to one step per layer (the
  knapsack's greedy bound), and the budget left by a step that does not fit is spent one
  multiple at a time. For whitened SVD e(r) = Σ_{i>r} σ_i² exactly; the pass scales it to
  what reaches the block output, measured at a few ranks (``lowrank.passes``).

Ranks are multiples of ``multiple`` (rounded down, at least one), so quantized factors' groups divide
them; a budget below one multiple per layer raises ``BudgetError``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from compress.allocation import water_fill


@dataclass
class LayerShape:
    name: str
    in_features: int
    out_features: int
    gains: torch.Tensor | None = None  # per component, in the order they are truncated
    total: float | None = None  # output energy (the error at rank 0)
    errors: torch.Tensor | None = None  # (k + 1,): the error at rank r = 0..k (instead of gains/total)
    extra: int = 0  # parameters a factored layer keeps besides its factors (a sparse residual's nonzeros)

    @property
    def dense(self) -> int:
        return self.in_features * self.out_features

    @property
    def unit(self) -> int:
        return self.in_features + self.out_features


def _round(r: int, multiple: int, cap: int) -> int:
    """r rounded down to a multiple, at least one multiple (a layer keeps something), at most cap."""
    return min(cap, max(multiple, (r // multiple) * multiple))


def _cost(layer: LayerShape, r: int) -> int:
    kept = r * layer.unit + layer.extra
    return min(layer.dense, kept)


def uniform_ranks(layers: list[LayerShape], reduction: float, multiple: int = 1) -> dict[str, int | None]:
    """{name: rank} with every layer at (1 − reduction) of its parameters; None = stays dense
    (only when reduction is 0 in effect: the rank reaches the break-even point). Every layer
    keeps at least ``multiple`` components."""
    return _within_budget(layers, {L.name: uniform_rank(L, reduction, multiple) for L in layers}, reduction, multiple)


def share_rank(L: LayerShape, reduction: float, multiple: int = 1) -> int:
    """The rank keeping (1 − reduction) of the layer's parameters, ⌊(1 − reduction)·D/(in + out)⌋,
    rounded as every rank is (it may reach the break-even point)."""
    return _round(int(((1 - reduction) * L.dense - L.extra) / L.unit), multiple, min(L.in_features, L.out_features))


def uniform_rank(L: LayerShape, reduction: float, multiple: int = 1) -> int | None:
    """One layer's uniform rank: ``share_rank``, or None where that reaches the break-even point
    (no budget check: ``uniform_ranks`` does it)."""
    r = share_rank(L, reduction, multiple)
    return None if _cost(L, r) >= L.dense else r


class BudgetError(ValueError):
    """The budget is smaller than one ``multiple`` of rank per layer."""


def _within_budget(layers, ranks, reduction, multiple):
    if parameters(layers, ranks) > (1 - reduction) * sum(L.dense for L in layers):
        raise BudgetError(f"reduction {reduction:g} leaves fewer parameters than a rank-{multiple} factorization of every layer")
    return ranks


def error_curve(L: LayerShape) -> torch.Tensor:
    """(k + 1,) float64: the layer's error at rank r = 0..k in the allocation's unit: ``errors``
    when given, else the relative output error Σ_{i≥r} gains_i / total."""
    if L.errors is not None:
        return L.errors.double()
    g = L.gains.double().clamp_min(0)
    tail = torch.cat([g.flip(0).cumsum(0).flip(0), g.new_zeros(1)])  # tail[r] = Σ_{i≥r} g_i
    return tail / max(L.total or float(g.sum()), 1e-300)


def _options(L: LayerShape, multiple: int) -> list[tuple[int, float, int | None]]:
    """(parameters, error, rank) of every rank the layer may take, cheapest first: multiples (the
    first is the least a layer keeps) below the break-even point, then dense (None, error 0);
    an option costing more than a cheaper one's error is dropped."""
    e, cap = error_curve(L), min(L.in_features, L.out_features)
    pts = [(_cost(L, r), float(e[r]), r) for r in range(_round(0, multiple, cap), cap + 1, multiple)]
    out: list[tuple[int, float, int | None]] = []
    for p in [p for p in pts if p[0] < L.dense] + [(L.dense, 0.0, None)]:
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def sensitivity_ranks(layers: list[LayerShape], reduction: float, multiple: int = 1) -> dict[str, int | None]:
    """{name: rank or None (dense)}: greedy water-filling over each layer's error curve
    (``error_curve``; module docstring). Every layer starts at its least option; the step buying
    the most error per parameter is taken next: to the layer's next vertex on its lower convex
    hull, or, once that no longer fits the budget, to the best option on the way that does."""
    budget = (1 - reduction) * sum(L.dense for L in layers)
    opts = [_options(L, multiple) for L in layers]
    at = water_fill(opts, budget)
    return _within_budget(layers, {L.name: o[a][2] for L, o, a in zip(layers, opts, at)}, reduction, multiple)


def parameters(layers: list[LayerShape], ranks: dict[str, int | None]) -> int:
    """Parameters the layers hold with these ranks (None: dense)."""
    return sum(L.dense if ranks[L.name] is None else _cost(L, ranks[L.name]) for L in layers)


def probed_errors(tail: torch.Tensor, probes: list[tuple[int, float]], scale: float = 1.0) -> torch.Tensor:
    """(k + 1,) float64: a layer's error at rank r = 0..k in block-output units.

    ``tail[r]``: the layer's own output error at rank r (Σ_{i≥r} σ_i² for whitened SVD);
    ``probes``: [(rank, share)], the share of the layer's error that reached the block output
    when it was factored at that rank. The share is interpolated piecewise linearly in
    log share against log tail[r] (a power law between two probes); below the highest rank
    probed the last segment's exponent continues, clamped to [0, 1] (a deeper cut never lets
    a smaller share through, and at most squares the error); above the highest rank probed its
    share stays. Returns tail · share / ``scale``, made
    non-increasing in r (keeping more components never costs error)."""
    pts = sorted((math.log(float(tail[r])), math.log(s)) for r, s in probes if float(tail[r]) > 0 and s > 0)
    if not pts:
        return tail.double() / scale
    x = tail.double().clamp_min(1e-300).log()  # log error: high at low ranks
    y = torch.full_like(x, pts[0][1])  # smaller errors than any probe's (higher ranks): its share
    slope = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        y = torch.where(x >= x0, y0 + slope * (x - x0), y)
    x1, y1 = pts[-1]
    y = torch.where(x >= x1, y1 + min(max(slope, 0.0), 1.0) * (x - x1), y)
    curve = tail.double() * y.exp() / scale
    return curve.flip(0).cummax(0).values.flip(0)  # curve[r] = max over ranks ≥ r


def probe_ranks(L: LayerShape, reduction: float, multiple: int = 1, count: int = 3) -> list[int]:
    """Up to ``count`` ranks to probe a layer at: its uniform rank (``share_rank``), then half
    of it and halfway to the break-even point (the ranks an allocation moves it to)."""
    cap = min(L.in_features, L.out_features)
    r = share_rank(L, reduction, multiple)
    top = max((k for k in range(r, cap + 1, multiple) if _cost(L, k) < L.dense), default=r)
    ranks = [r, _round(r // 2, multiple, cap), _round((r + top) // 2, multiple, cap)][:count]
    return sorted(set(ranks))
