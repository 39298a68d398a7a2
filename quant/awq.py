"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

A group of Linears reads one input ``X`` (tokens, in). Input channels with large activations
matter most, so before quantizing, each input channel ``j`` is scaled up by ``s_j`` in the
weights and down by the same factor in the op that produces ``X`` (a norm, or the previous
Linear): ``X W^T = (X diag(s)^-1) (W diag(s))^T``, the model's function is unchanged, and the
quantization grid of ``W diag(s)`` resolves the salient columns more finely. The scale is

    s = mean|X|^r / mean|Ŵ|^(1-r)        (duo scaling; plain AWQ: s = mean|X|^r)
    s ← s / sqrt(max(s) · min(s))        (centred around 1)

and ``r`` is chosen from a grid in [0, 1) by the error it leaves after quantization:

    r* = argmin_r  L(Q(W diag(s_r)) diag(s_r)^-1)

where ``L`` measures what the quantized weights do to the outputs (see ``search_scale``; the
engine passes either the real output of the module the Linears feed, or the exact output error
of the Linears themselves through ``H = XᵀX``: ``‖X Dᵀ‖² = tr(D H Dᵀ)``).

After the scales, the weight range of each (row, group) is clipped: the shrink ratio ``p`` of
``[p·min, p·max]`` that minimises the group's output error ``d_gᵀ H_gg d_g`` (the reference
implementation's ``auto_clip``, with every calibration token instead of a sample of them).

Shapes: W (out, in), X (tokens, in), H (in, in), s (in,), mean|X| (in,), mean|Ŵ| (in,).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from compress.quant.rtn import QuantScheme, fake_quantize, fit_qparams, minmax_params

from compress.utils import group_width


def activation_mean(absmean_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """mean|X| per input channel (in,) from the accumulated Σ|x| and the token count."""
    return absmean_sum / max(tokens, 1)


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """mean over all rows of ``|W| / max|W in its group|`` per input channel (in,): how large a
    column is relative to its quantization group (the 'duo' factor)."""
    rows = []
    for w in weights:
        out_f, in_f = w.shape
        gw = group_width(group_size, in_f)
        g = w.abs().reshape(out_f, in_f // gw, gw)  # (out, G, gw)
        rows.append((g / g.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(out_f, in_f))
    return torch.cat(rows).mean(dim=0)


def scales_for(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """s (in,) for exponent ``ratio``; ``w_mean=None`` is plain AWQ (activations only)."""
    s = x_mean.pow(ratio)
    if w_mean is not None:
        s = s / w_mean.pow(1 - ratio).clamp_min(1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def quantize_scaled(w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 (out, in): the effective weight after scaling and quantizing."""
    ws = w * s[None, :]
    out_f, in_f = ws.shape
    gw = scheme.group_width(in_f)
    g = ws.reshape(-1, gw)  # (out·G, gw)
    scale, zero = fit_qparams(g, scheme)
    q = fake_quantize(g, scale[:, None], zero[:, None], scheme.maxq).reshape(out_f, in_f)
    return q / s[None, :]


def search_scale(
    weights: Sequence[torch.Tensor],
    x_mean: torch.Tensor,
    scheme: QuantScheme,
    loss: Callable[[list[torch.Tensor]], float],
    grid: int = 20,
    duo: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The grid search of the scale exponent.

    weights  the group's weights, each (out_i, in), float32, unchanged by this function
    x_mean   mean|X| (in,)
    loss     maps the group's effective weights (``quantize_scaled`` of each) to an error;
             ``loss(weights)`` of the unquantized weights is the reference point 0
    Returns s (in,) of the best ratio and {"ratio", "loss", "loss_unscaled"}.
    """
    w_mean = weight_mean(weights, scheme.group_size) if duo else None
    best = (float("inf"), None, None)
    first = None
    for i in range(grid):
        r = i / grid
        s = scales_for(x_mean, w_mean, r)
        err = loss([quantize_scaled(w, s, scheme) for w in weights])
        if first is None:
            first = err  # r = 0 with duo is weight-only scaling; without duo it is plain RTN
        if err < best[0]:
            best = (err, r, s)
    if best[2] is None:  # every loss was nan/inf: leave the group unscaled
        return torch.ones_like(x_mean), {"ratio": None, "loss": None, "loss_r0": first}
    return best[2], {"ratio": best[1], "loss": best[0], "loss_r0": first}


def hessian_loss(weights: Sequence[torch.Tensor], H: torch.Tensor) -> Callable[[list[torch.Tensor]], float]:
    """loss(Ŵs) = Σ_i tr((Ŵ_i - W_i) H (Ŵ_i - W_i)ᵀ) = Σ_i ‖X (Ŵ_i - W_i)ᵀ‖², exact over all
    tokens that built H (in, in)."""

    def loss(qs: list[torch.Tensor]) -> float:
        total = 0.0
        for w, q in zip(weights, qs):
            d = q - w  # (out, in)
            total += float(((d @ H) * d).sum())
        return total

    return loss


def search_clip(
    w: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group), the clipped range ``[p·min, p·max]`` with the least output error
    ``d_gᵀ H_gg d_g`` over ``p = 1 - k/grid``, ``k < max_shrink·grid``.

    w (out, in) float32; H (in, in). Returns (lo, hi), each (out, G): the clip bounds
    (``lo <= 0 <= hi``). Clamping ``w`` to them and quantizing with min-max gives the chosen grid.
    """
    out_f, in_f = w.shape
    gw = scheme.group_width(in_f)
    G = in_f // gw
    wg = w.reshape(out_f, G, gw)
    xmin = wg.amin(-1).clamp(max=0)  # (out, G)
    xmax = wg.amax(-1).clamp(min=0)
    Hg = torch.stack([H[k * gw : (k + 1) * gw, k * gw : (k + 1) * gw] for k in range(G)])  # (G, gw, gw)
    best_err = torch.full((out_f, G), float("inf"))
    best_p = torch.ones(out_f, G)
    for k in range(max(1, int(max_shrink * grid))):
        p = 1 - k / grid
        s, z = minmax_params((p * xmin).reshape(-1), (p * xmax).reshape(-1), scheme)
        q = fake_quantize(wg.reshape(-1, gw), s[:, None], z[:, None], scheme.maxq).reshape(out_f, G, gw)
        d = (q - wg).transpose(0, 1)  # (G, out, gw)
        err = (torch.bmm(d, Hg) * d).sum(-1).T  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p * xmin, best_p * xmax


def clamp_to(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """w (out, in) clamped per (row, group) to [lo, hi] (out, G)."""
    out_f, in_f = w.shape
    gw = in_f // lo.shape[1]
    wg = w.reshape(out_f, -1, gw)
    return torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None]).reshape(out_f, in_f)
