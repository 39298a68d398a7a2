"""Rank allocation: spend a parameter budget across layers.

Each layer ℓ (in_ℓ × out_ℓ, dense cost D_ℓ = in·out) keeps r_ℓ components at (in + out) parameters
each, or stays dense when r_ℓ·(in + out) ≥ D_ℓ (a factorization that large saves nothing). The
budget is (1 − reduction) · Σ D_ℓ, and the allocation never exceeds it.

* ``uniform``: every layer keeps the same share of its parameters, r = ⌊(1 − reduction) · D/(in+out)⌋;
* ``sensitivity``: water-filling over the components' measured output errors. Component i of layer
  ℓ is worth g_ℓi / (E_ℓ · (in_ℓ + out_ℓ)): the share of the layer's output energy E_ℓ it restores,
  per parameter it costs. One threshold τ keeps every component worth at least τ; the smallest τ
  whose total fits the budget wins (found by bisection over the sorted worths). For whitened SVD
  the gains are σ², so this is the exact greedy optimum of Σ_ℓ relative output error under the
  budget (up to one component of slack).

Ranks are multiples of ``multiple`` (rounded down, at least one), so quantized factors' groups divide
them; a budget below one multiple per layer raises ``BudgetError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerShape:
    name: str
    in_features: int
    out_features: int
    gains: torch.Tensor | None = None  # per component, in the order they are truncated
    total: float | None = None  # output energy (the error at rank 0)

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
    return layer.dense if r * layer.unit >= layer.dense else r * layer.unit


def uniform_ranks(layers: list[LayerShape], reduction: float, multiple: int = 1) -> dict[str, int | None]:
    """{name: rank} with every layer at (1 − reduction) of its parameters; None = stays dense
    (only when reduction is 0 in effect: the rank reaches the break-even point). Every layer
    keeps at least ``multiple`` components."""
    return _within_budget(layers, {L.name: uniform_rank(L, reduction, multiple) for L in layers}, reduction, multiple)


def share_rank(L: LayerShape, reduction: float, multiple: int = 1) -> int:
    """The rank keeping (1 − reduction) of the layer's parameters, ⌊(1 − reduction)·D/(in + out)⌋,
    rounded as every rank is (it may reach the break-even point)."""
    return _round(int((1 - reduction) * L.dense / L.unit), multiple, min(L.in_features, L.out_features))


def uniform_rank(L: LayerShape, reduction: float, multiple: int = 1) -> int | None:
    """One layer's uniform rank: ``share_rank``, or None where that reaches the break-even point
    (no budget check: ``uniform_ranks`` does it)."""
    r = share_rank(L, reduction, multiple)
    return None if r * L.unit >= L.dense else r


class BudgetError(ValueError):
    """The budget is smaller than one ``multiple`` of rank per layer."""


def _within_budget(layers, ranks, reduction, multiple):
    if parameters(layers, ranks) > (1 - reduction) * sum(L.dense for L in layers):
        raise BudgetError(f"reduction {reduction:g} leaves fewer parameters than a rank-{multiple} factorization of every layer")
    return ranks


def sensitivity_ranks(layers: list[LayerShape], reduction: float, multiple: int = 1) -> dict[str, int | None]:
    """{name: rank or None (dense)} by water-filling over the components' worth (module docstring)."""
    budget = (1 - reduction) * sum(L.dense for L in layers)
    worth = []
    for L in layers:
        g = L.gains.double().clamp_min(0)
        worth.append(g / max(L.total or float(g.sum()), 1e-300) / L.unit)
    cap = [min(L.in_features, L.out_features) for L in layers]

    def ranks_at(tau: float) -> list[int]:
        return [_round(int((w >= tau).sum()), multiple, c) for w, c in zip(worth, cap)]

    def cost(rs: list[int]) -> int:
        return sum(_cost(L, r) for L, r in zip(layers, rs))

    cand = torch.cat(worth).unique().sort(descending=True).values  # thresholds, most kept last
    lo, hi = -1, len(cand)  # cost(ranks_at(cand[lo])) fits; cand[hi] does not (sentinels)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(ranks_at(float(cand[mid]))) <= budget:
            lo = mid
        else:
            hi = mid
    rs = ranks_at(float(cand[lo])) if lo >= 0 else ranks_at(float("inf"))  # the least: one multiple each
    return _within_budget(layers, {L.name: (None if r * L.unit >= L.dense else r) for L, r in zip(layers, rs)}, reduction, multiple)


def parameters(layers: list[LayerShape], ranks: dict[str, int | None]) -> int:
    """Parameters the layers hold with these ranks (None: dense)."""
    return sum(L.dense if ranks[L.name] is None else _cost(L, ranks[L.name]) for L in layers)
