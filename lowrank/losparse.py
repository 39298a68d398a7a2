"""LoSparse: a low-rank part plus a sparse residual, W ≈ B·A + S (Li et al. 2023, "LoSparse:
Structured Compression of Large Language Models based on Low-Rank and Sparse Approximation").

The objective is the output error on the calibration inputs X, ‖X(W − BA − S)ᵀ‖²_F with H = XᵀX,
under rank(BA) ≤ r and at most ``nonzeros`` nonzero entries in S. The paper learns both during
fine-tuning and prunes S column-wise by a sensitivity score; here, after training, the two are
fitted alternately on the calibration statistics (as robust PCA's alternating projections do):

1. given S, the best rank-r BA is the whitened truncated SVD of W − S (``lowrank.svd``, exact);
2. given BA, S is a sparse fit of the residual R = W − BA:
   * ``unstructured`` (default): SparseGPT (``prune.sparsegpt``, OBS on H) prunes R down to
     ``nonzeros`` entries, updating the kept ones to absorb what the pruned ones contributed;
   * ``column`` (the paper's structure): the input columns J with the largest ‖R_{:,j}‖²·H_jj are
     kept whole, at their least-squares values S_J = R·H_{:,J}·H_{J,J}⁻¹ (exact given J).

Starting from S = 0, step 1 is plain low-rank, so the result is never worse than the low-rank
factors alone at rank r plus the sparse fit of their residual. Float64 throughout.
"""

from __future__ import annotations

import torch
from compress.lowrank.svd import decompose
from compress.prune.sparsegpt import sparsegpt_prune

PATTERNS = ("unstructured", "column")


def output_error(M: torch.Tensor, H: torch.Tensor) -> float:
    """‖X·Mᵀ‖²_F = tr(M·H·Mᵀ) for M (out, in)."""
    M = M.double()
    return float(((M @ H.double()) * M).sum())


def sparse_fit(R: torch.Tensor, H: torch.Tensor, nonzeros: int, pattern: str = "unstructured", damp: float = 0.01,
               name: str = "layer") -> torch.Tensor:
    """S (out, in) float64 with at most ``nonzeros`` nonzero entries (``column``: whole columns,
    ⌊nonzeros / out⌋ of them) fitting R on the inputs: min ‖X(R − S)ᵀ‖²."""
    out_f, in_f = R.shape
    if nonzeros <= 0:
        return torch.zeros_like(R, dtype=torch.float64)
    if pattern == "column":
        cols = min(in_f, nonzeros // out_f)
        S = torch.zeros_like(R, dtype=torch.float64)
        if cols == 0:
            return S
        Hd = H.double()
        score = R.double().pow(2).sum(0) * torch.diagonal(Hd)  # (in,)
        J = torch.topk(score, cols).indices
        HJJ = Hd[J[:, None], J[None, :]]
        HJJ = HJJ + damp * float(torch.diagonal(HJJ).mean()) * torch.eye(cols, dtype=torch.float64, device=R.device)
        S[:, J] = torch.linalg.solve(HJJ, (R.double() @ Hd[:, J]).T).T  # R·H_{:,J}·H_{J,J}⁻¹
        return S
    if pattern != "unstructured":
        raise ValueError(f"unknown sparse pattern {pattern!r}; one of {', '.join(PATTERNS)}")
    sparsity = 1 - nonzeros / R.numel()
    res = sparsegpt_prune(R.float(), H.float(), sparsity, damp=damp, name=name)
    S = res.weight.double() * res.mask
    if int(res.mask.sum()) > nonzeros:  # per-block quotas round; drop the smallest extras
        keep = torch.topk((S.abs() * torch.diagonal(H.double()).sqrt()).flatten(), nonzeros).indices
        flat = torch.zeros(S.numel(), dtype=torch.float64, device=S.device)
        flat[keep] = S.flatten()[keep]
        S = flat.view_as(S)
    return S


def losparse(W: torch.Tensor, H: torch.Tensor, rank: int, nonzeros: int, pattern: str = "unstructured", damp: float = 0.01,
             iters: int = 2, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(B (out, rank), A (rank, in), S (out, in), info), float32: W ≈ B·A + S with at most
    ``nonzeros`` nonzero entries in S, fitted in ``iters`` alternations (module docstring).
    ``info``: the relative output error of the low-rank part alone (``lowrank_error``) and of
    the sum (``error``), and S's nonzero count."""
    W = W.double()
    total = max(output_error(W, H), 1e-300)
    S = torch.zeros_like(W)
    best = None
    for it in range(iters):
        B, A = decompose(W - S, "whitened", H, damp=damp, name=name).factors(rank)
        L = B.double() @ A.double()
        if it == 0:
            lowrank_error = output_error(W - L, H) / total
        S = sparse_fit(W - L, H, nonzeros, pattern, damp, name)
        err = output_error(W - L - S, H) / total
        if best is None or err < best[0]:
            best = (err, B, A, S)
    err, B, A, S = best
    info = {"lowrank_error": lowrank_error, "error": err, "sparse_nonzeros": int((S != 0).sum()), "sparse_pattern": pattern}
    return B, A, S.float(), info
