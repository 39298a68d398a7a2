"""GPTQ: accurate post-training quantization with second-order error feedback.

Objective, per Linear: ``min_Ŵ ‖X Ŵᵀ − X Wᵀ‖²`` over ``Ŵ`` on the quantization grid, with
``H = XᵀX`` from calibration inputs. Columns are rounded one at a time and each rounding error is
pushed into the not-yet-rounded columns through the inverse Hessian (see ``compress.obs``).
Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023, Algorithm 1.

Options beyond the paper's core loop:

* ``act_order``: visit columns in order of decreasing ``H_jj`` (largest activations first). Groups
  are then formed in that order, so each column's group is recorded in ``g_idx`` (exported; the
  runtime gathers scales through it).
* A group's scale and zero point are fitted when the loop reaches its first column, on the
  weights as they are *then* (already carrying the error of earlier columns).
* ``static_groups``: instead, fit every group's scale and zero point up front on the original
  weights, groups being consecutive columns. Combined with ``act_order`` this keeps the column
  visiting order but needs no ``g_idx`` (plain grouping: every runtime serves it).
"""

from __future__ import annotations

import torch

from compress.obs import blockwise_solve, inverse_cholesky, prepare_hessian
from compress.quant.rtn import QuantResult, QuantScheme, check_group_size, fit_qparams, quantize_codes


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "",
) -> QuantResult:
    """Quantize ``W`` (out, in) given ``H`` (in, in) = Σ xxᵀ over calibration inputs."""
    out_f, in_f = W.shape
    if not check_group_size(in_f, scheme.group_size):
        raise ValueError(f"{name}: group_size {scheme.group_size} does not divide in_features {in_f}")
    W, H = prepare_hessian(W, H)  # copies: the caller's H is left as it was
    perm = torch.arange(in_f)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm[:, None], perm[None, :]]  # one gather: no second (in, in) copy
    U, damp_used = inverse_cholesky(H, damp, name)  # damps H in place
    del H

    gw = scheme.group_width(in_f)
    G = scheme.groups(in_f)
    # kept transposed, (G, out) and (in, out), so the per-column reads and writes are contiguous
    scale = torch.zeros(G, out_f)
    zero = torch.zeros(G, out_f)
    codes = torch.zeros(in_f, out_f)  # row j: the codes of the column visited j-th
    if static_groups:  # natural groups, fitted once on the original weights
        Wn = W[:, torch.argsort(perm)]  # (out, in) in original column order
        for g in range(G):
            scale[g], zero[g] = fit_qparams(Wn[:, g * gw : (g + 1) * gw], scheme)
    group_of = (perm // gw) if static_groups else (torch.arange(in_f) // gw)  # visiting position -> group

    def step(j: int, w: torch.Tensor, current) -> torch.Tensor:
        # j is a position in visiting order; with act_order (not static), groups follow that order
        g = int(group_of[j])
        if not static_groups and j % gw == 0:
            scale[g], zero[g] = fit_qparams(current(j, j + gw), scheme)
        s, z = scale[g], zero[g]
        codes[j] = quantize_codes(w, s, z, scheme.maxq)
        return (codes[j] - z) * s

    _, losses = blockwise_solve(W, U, step, blocksize)
    invperm = torch.argsort(perm)
    q = codes.T[:, invperm]
    g_idx = group_of[invperm].to(torch.int32)  # natural order: arange(in) // gw unless act-order groups
    return QuantResult(
        q=q.to(torch.int32),
        scale=scale.T.contiguous(),
        zero=zero.T.contiguous().to(torch.int32),
        g_idx=g_idx,
        scheme=scheme,
        act_order=act_order and not static_groups,  # only then is g_idx needed
        info={"damp": damp_used, "loss": float(losses.sum())},
    )
