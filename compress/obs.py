"""The blockwise Optimal-Brain-Surgeon solver shared by GPTQ and SparseGPT.

Both methods minimise the layer's output error ``‖X Ŵᵀ − X Wᵀ‖²`` one input column at a time:
fix column ``j`` (round it, or mask it), then push its error, scaled by the inverse-Hessian
diagonal, into the columns not yet fixed. With ``U`` the upper Cholesky factor of ``H⁻¹``
(``H = XᵀX``), the update for column ``j`` is ``W[:, j:] -= e_j ⊗ U[j, j:]`` with
``e_j = (w_j − ŵ_j) / U[j, j]`` (Frantar & Alistarh, GPTQ 2022, Alg. 1; SparseGPT 2023, Alg. 1).
Columns are processed in blocks of ``blocksize``; inside a block the update is immediate, the rest
of the matrix gets one deferred rank-``blocksize`` update per block ("lazy batch" updates).

The methods differ only in the per-column step, which is a callback here.
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol

import torch


class ColumnStep(Protocol):
    def __call__(self, j: int, w: torch.Tensor, current: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Return the fixed value of column ``j`` (out,), given its current value ``w`` (out,).

        ``current(a, b)`` returns the current (error-updated) weights of columns ``[a, b)``,
        for steps that look ahead, like fitting a group's scale at its first column."""


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (never active in calibration: ``H_jj = 0``) get ``H_jj = 1`` and weight 0,
    so the factorisation exists and the solver leaves them alone."""
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_cholesky(H: torch.Tensor, damp: float, name: str = "", max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ I)⁻¹`` with ``λ = damp · mean(diag H)``.

    ``H`` is damped in place (pass a copy you own): for a 5632-wide layer each (in, in) float32
    temporary is 127 MB, and at most three are alive at once here (H, L, H⁻¹).
    When ``H + λI`` is not positive definite in float32 (few calibration tokens, collinear
    inputs), ``damp`` is multiplied by 10 and the factorisation retried, with a warning naming
    the layer. Returns ``(U, damp_used)``."""
    mean_diag = torch.diag(H).mean()
    diag = H.diagonal()
    applied = 0.0
    for attempt in range(max_tries):
        diag.add_((damp - applied) * mean_diag)
        applied = damp
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        if attempt + 1 < max_tries:
            warnings.warn(
                f"{name or 'layer'}: Hessian is not positive definite with dampening {damp:g}; "
                f"retrying with {max(damp * 10, 1e-4):g}",
                stacklevel=2,
            )
        damp = max(damp * 10, 1e-4)
    raise ValueError(
        f"{name or 'layer'}: the Hessian could not be factorised even with dampening {damp / 10:g}; "
        "use more calibration samples, or list the layer under `ignore`"
    )


def blockwise_solve(W: torch.Tensor, U: torch.Tensor, step: ColumnStep, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the OBS column loop over ``W`` (out, in) with the factor ``U`` (in, in).

    Returns ``(Ŵ, losses)``: the fixed weights (out, in) and each column's contribution to the
    output error, ``(w_j − ŵ_j)² / U_jj²`` summed over rows, halved (in,).

    The loop works on ``Wᵀ`` (in, out) so that a column of ``W`` is a contiguous row in memory:
    on a CPU, walking a column of a row-major matrix misses the cache at every element."""
    Wt = W.T.contiguous()  # (in, out): row j is column j of W
    in_f = Wt.shape[0]
    fixed = torch.zeros_like(Wt)
    losses = torch.zeros(in_f, dtype=W.dtype, device=W.device)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = Wt[i1:i2].clone()  # (b, out): updated eagerly inside the block
        E1 = torch.zeros_like(W1)  # scaled errors of the block's columns
        U1 = U[i1:i2, i1:i2]

        def current(a: int, b: int) -> torch.Tensor:
            # columns < i2 live in W1 (eager updates); the rest in Wt (deferred updates applied)
            inside = W1[max(a, i1) - i1 : min(b, i2) - i1]
            rows = inside if b <= i2 else torch.cat([inside, Wt[i2:b]], dim=0)
            return rows.T  # (out, b - a), as W's columns

        for i in range(i2 - i1):
            w = W1[i]
            d = U1[i, i]
            q = step(i1 + i, w, current)
            fixed[i1 + i] = q
            err = (w - q) / d  # (out,)
            losses[i1 + i] = (err**2).sum() / 2
            W1[i:] -= U1[i, i:, None] * err[None, :]
            E1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ E1  # the deferred rank-b update of the remaining columns
    return fixed.T, losses
