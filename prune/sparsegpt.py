"""SparseGPT: one-shot pruning with second-order weight reconstruction (Frantar & Alistarh,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023, Alg. 1).

Objective, per Linear: ``min ‖X Ŵᵀ − X Wᵀ‖²`` over ``Ŵ`` with the requested zeros, ``H = XᵀX``.
It is GPTQ's column loop (``compress.obs.blockwise_solve``) with "mask" where GPTQ has "round":

* adaptive mask selection: at the first column of every block of ``blocksize`` columns (every
  M columns for N:M), choose which of the block's weights to drop by ``w² / [U_jj]²`` (``U`` the
  upper Cholesky factor of ``H⁻¹``, so ``U_jj² = [H⁻¹]_jj`` after the earlier columns are
  fixed): the output error of removing weight w alone, computed on the *current* weights, which
  already carry the compensation of the columns before;
* each column: zero the dropped rows, keep the rest; the solver pushes the error into the
  columns not yet visited.

Unstructured sparsity is chosen per output row (each block prunes its share of every row, the
shares adding up to ``round(sparsity · in)`` per row). With a ``QuantScheme`` the kept weights
are also rounded on GPTQ's grid in the same loop (the paper's joint sparse + quantized mode):
GPTQ's ``ColumnRounder`` is the step, the mask decides which rows round to the zero point.
With ``sparsity = 0`` and a scheme this is exactly ``gptq_quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from compress.prune.pattern import (
    Pattern,
    check_pattern,
    keep_n_of_m,
    keep_top,
    prune_count,
)
from compress.quant.gptq import ColumnRounder
from compress.quant.rtn import QuantResult, QuantScheme, check_group_size

from compress.obs import blockwise_solve, inverse_cholesky, prepare_hessian


@dataclass
class PruneResult:
    """weight  float32 (out, in)  the pruned (and, jointly quantized: dequantized) weight
    mask    bool    (out, in)  True where a weight is kept
    quant   QuantResult | None the codes, when quantized in the same loop"""

    weight: torch.Tensor
    mask: torch.Tensor
    quant: QuantResult | None = None
    info: dict = field(default_factory=dict)


def group_order(diag: torch.Tensor, width: int) -> torch.Tensor:
    """Visiting order (in,) by decreasing activation energy ``H_jj`` of runs of ``width``
    consecutive columns (width 1: GPTQ's act-order). Runs stay whole, so an N:M group is
    visited column after column and its mask can be chosen at its first column."""
    energy = diag.reshape(-1, width).sum(dim=1)  # (in / width,)
    runs = torch.argsort(energy, descending=True)
    return (runs[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: Pattern = Pattern(),
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    scheme: QuantScheme | None = None,
    static_groups: bool = True,
    name: str = "",
) -> PruneResult:
    """Prune ``W`` (out, in) given ``H`` (in, in) = Σ xxᵀ; with ``scheme``, also quantize the kept
    weights in the same loop. ``act_order`` visits the N:M groups of M columns by decreasing
    ``H_jj`` (unstructured patterns keep the natural order)."""
    out_f, in_f = W.shape
    if check_pattern(in_f, pattern):
        raise ValueError(f"{name}: {check_pattern(in_f, pattern)}")
    if scheme is not None and not check_group_size(in_f, scheme.group_size):
        raise ValueError(f"{name}: group_size {scheme.group_size} does not divide in_features {in_f}")
    fit_on = None
    if scheme is not None and static_groups:
        # static group scales are fitted up front: on the weights as pruning alone leaves them
        # (zeros, and the kept weights carrying the pruning error), not on the dense W, whose
        # range is not the survivors' (measured: lower output error at 50% and 2:4)
        fit_on = sparsegpt_prune(W, H, sparsity, pattern, blocksize=blocksize, damp=damp, act_order=act_order, name=name).weight
    # act-order visits N:M groups whole; unstructured masks stay in natural order: sorted by
    # energy, a block's per-row quota would fall on each row's most active columns (measured:
    # worse, 18.30 vs 18.11 at 50% on the demo model)
    act_order = act_order and pattern.structured
    m = pattern.m or 1
    if pattern.structured:  # mask choices stay inside a solver block: a multiple of M columns
        blocksize = max(m, blocksize - blocksize % m)
    W, H = prepare_hessian(W, H)  # copies: the caller's H is left as it was
    perm = group_order(torch.diag(H), m) if act_order else torch.arange(in_f)
    if act_order:
        W, H = W[:, perm], H[perm[:, None], perm[None, :]]
    U, damp_used = inverse_cholesky(H, damp, name)  # damps H in place
    del H
    d2 = torch.diag(U) ** 2  # (in,): [H⁻¹]_jj as each column is reached
    keep = torch.ones(in_f, out_f, dtype=torch.bool)  # (in, out), like the solver's Wᵀ
    rounder = None
    if scheme is not None:
        rounder = ColumnRounder(W, perm, scheme, static_groups, None if fit_on is None else fit_on[:, perm])

    def step(j: int, w: torch.Tensor, current) -> torch.Tensor:
        if pattern.structured:
            if j % m == 0:
                score = current(j, j + m) ** 2 / d2[j : j + m]  # (out, m)
                keep[j : j + m] = keep_n_of_m(score, pattern.n, m).T
        elif j % blocksize == 0:
            b = min(j + blocksize, in_f)
            score = current(j, b) ** 2 / d2[j:b]  # (out, b - j)
            keep[j:b] = keep_top(score, prune_count(sparsity, j, b)).T
        if rounder is not None:
            return rounder(j, w, current, keep[j])
        return torch.where(keep[j], w, torch.zeros_like(w))

    fixed, losses = blockwise_solve(W, U, step, blocksize)
    invperm = torch.argsort(perm)
    mask = keep.T[:, invperm].contiguous()
    info = {"damp": damp_used, "loss": float(losses.sum())}
    if rounder is None:
        return PruneResult(fixed[:, invperm].contiguous(), mask, None, info)
    q = rounder.result(act_order, info)
    return PruneResult(q.dequantize(), mask, q, info)
