"""SqueezeLLM: non-uniform weight quantization with one codebook per output row.

Objective, per Linear: ``min_{T, C} ‖X Ŵᵀ − X Wᵀ‖²`` with ``Ŵ[r, j] = T[r, C[r, j]]``: each output
row ``r`` has a table ``T[r]`` of ``2^b`` float entries and each weight stores a ``b``-bit code, the
index of its entry; ``H = XᵀX`` from calibration inputs.

1. The tables (Kim, Hooper, Gholami et al., "SqueezeLLM: Dense-and-Sparse Quantization", ICML
   2024, §3.1, eq. 4): the output error of changing one weight alone by ``δ`` is ``H_jj δ²``, so
   each row's table is a 1-D k-means of its weights weighted by their sensitivity
   ``H_jj`` (the paper weights by the Fisher diagonal; the Hessian diagonal of the layer-wise
   objective is what the other solvers here see). 1-D k-means is solved nearly exactly by Lloyd's
   iterations started at the weighted quantiles (``fit_codebooks``).
2. The codes: with the tables fixed (fitted on the original weights), the columns are rounded one
   at a time to the nearest entry of their row's table and each rounding error is pushed into the
   columns not yet rounded through the inverse Hessian, GPTQ's column solver (``compress.obs``;
   Frantar et al., "GPTQ", ICLR 2023, Alg. 1) with a lookup in place of the uniform grid
   (``codebook_quantize``). The paper's own step 2 is plain rounding; the error feedback is what
   GPTQ adds over round-to-nearest on any grid.

Shapes: ``W`` (out, in); ``H`` (in, in); tables (out, 2^b), each row sorted ascending; codes
(out, in) uint8 (b ≤ 8).
"""

from __future__ import annotations

import torch
from compress.quant.gptq import activation_order

from compress.obs import blockwise_solve, inverse_cholesky, prepare_hessian

MAX_BITS = 8  # codes are uint8: a table has at most 2^8 entries


def _row_weights(W: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (in,) or (out, in), non-negative, broadcast to (out, in) float32; a row whose
    weights sum to 0 (no input ever active) weighs its weights equally instead."""
    h = weights.float().clamp_min(0).expand_as(W).clone()  # (out, in)
    h[h.sum(dim=1) <= 0] = 1
    return h


def quantile_init(W: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the weighted quantiles at ``(i + ½) / k``, i = 0..k−1: the ``k`` values of the row
    below which lie that share of its weight (the first sorted value whose cumulative weight reaches
    it). Returns (out, k) float32, rows ascending."""
    W = W.float()
    h = _row_weights(W, weights)
    vals, order = W.sort(dim=1)  # (out, in) each row ascending
    cum = h.gather(1, order).cumsum(dim=1)  # (out, in) cumulative weight in sorted order
    share = (torch.arange(k, device=W.device, dtype=torch.float32) + 0.5) / k  # (k,)
    targets = share[None, :] * cum[:, -1:]  # (out, k)
    idx = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp_max(W.shape[1] - 1)
    return vals.gather(1, idx)


def nearest_codes(W: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The index of the nearest entry of row r's table for every ``W[r, j]`` (ties: the lower
    entry). ``W`` (out, n), ``tables`` (out, K) rows ascending -> int64 (out, n)."""
    mid = (tables[:, 1:] + tables[:, :-1]) / 2  # (out, K-1) the decision boundaries
    return torch.searchsorted(mid.contiguous(), W.contiguous())  # count of boundaries < w


def fit_codebooks(W: torch.Tensor, weights: torch.Tensor, bits: int, iters: int = 30,
                  init: torch.Tensor | None = None) -> torch.Tensor:
    """Per output row, the ``2^bits`` entries minimizing ``Σ_j h_j (W[r, j] − T[r, c_j])²`` over
    the table and the assignment (weighted 1-D k-means, Lloyd's iterations from ``init``, default
    the weighted quantiles; at most ``iters``, fewer when no assignment changes). ``weights``: (in,)
    the sensitivity of each input column (diag H), or (out, in). An entry no weight is assigned to
    keeps its value. Returns float32 (out, 2^bits), rows ascending."""
    W = W.float()
    h = _row_weights(W, weights)
    tables = (quantile_init(W, h, 1 << bits) if init is None else init.float()).clone()
    codes = None
    for _ in range(iters):
        new = nearest_codes(W, tables)  # (out, in)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        num = torch.zeros_like(tables).scatter_add_(1, codes, h * W)  # Σ h·w per entry
        den = torch.zeros_like(tables).scatter_add_(1, codes, h)  # Σ h per entry
        tables = torch.where(den > 0, num / den.clamp_min(1e-30), tables).sort(dim=1).values
    return tables


def dequantize_codebook(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Ŵ[r, j] = tables[r, codes[r, j]]: (out, in) in the tables' dtype."""
    return tables.gather(1, codes.long())


class CodebookRounder:
    """The column step of ``compress.obs.blockwise_solve``: round column ``j`` (a position in the
    visiting order) to the nearest entry of each row's table, recording the codes."""

    def __init__(self, tables: torch.Tensor, in_features: int):
        self.tables = tables  # (out, K) float32, rows ascending
        self.mid = ((tables[:, 1:] + tables[:, :-1]) / 2).contiguous()  # (out, K-1)
        self.codes = torch.zeros(in_features, tables.shape[0], dtype=torch.int64, device=tables.device)  # row j: column visited j-th

    def __call__(self, j: int, w: torch.Tensor, current) -> torch.Tensor:
        c = torch.searchsorted(self.mid, w[:, None].contiguous())  # (out, 1)
        self.codes[j] = c[:, 0]
        return self.tables.gather(1, c)[:, 0]


def codebook_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    iters: int = 30,
    table_dtype: torch.dtype | None = None,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SqueezeLLM tables with GPTQ's error feedback, for ``W`` (out, in) given ``H`` (in, in).

    The tables are fitted on the original weights, weighted by ``diag H`` (``fit_codebooks``), and
    rounded to ``table_dtype`` (the dtype they are stored in; None: float32), so the solver
    compensates the values the checkpoint holds. Then columns are rounded to their row's nearest
    entry in order of decreasing ``H_jj`` (``act_order``) or in order, with the inverse-Hessian
    feedback of ``H + λI``, ``λ = damp · mean(diag H)`` (raised ×10 where not positive definite).
    Returns ``(codes uint8 (out, in), tables float32 (out, 2^bits), info {damp, loss})``."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name or 'layer'}: bits {bits}: a codebook has 2^bits entries and codes are uint8, so bits 1 to {MAX_BITS}")
    tables = fit_codebooks(W, torch.diag(H), bits, iters)
    if table_dtype is not None:
        tables = tables.to(table_dtype).float()  # monotonic rounding: rows stay ascending
    W, H = prepare_hessian(W, H)  # copies: the caller's H is left as it was
    W, H, perm = activation_order(W, H, act_order)
    U, damp_used = inverse_cholesky(H, damp, name)  # damps H in place
    del H
    rounder = CodebookRounder(tables.to(W.device), W.shape[1])
    _, losses = blockwise_solve(W, U, rounder, blocksize)
    codes = rounder.codes.T[:, torch.argsort(perm)].to(torch.uint8)  # (out, in) in natural column order
    return codes.contiguous(), tables, {"damp": damp_used, "loss": float(losses.sum())}
