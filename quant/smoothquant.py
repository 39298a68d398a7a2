"""SmoothQuant: migrate activation outliers into the weights (Xiao et al., 2022, arXiv:2211.10438).

Per-token int8 activations lose precision when a few input channels carry outliers. With a
per-channel factor ``s`` folded into the op that produces ``X`` (``X diag(s)^-1``) and into the
weights (``W diag(s)``), the product is unchanged and the outliers shrink:

    s_j = max|X_j|^α / max_i |W_ij|^(1-α)        (α: the migration strength, 0.5 by default)

``max_i`` runs over every row of every Linear that reads ``X``. The weights are then quantized
per output channel (int8, symmetric) and the activations per token at run time (int8,
symmetric, dynamic): ``Y = (s_x · s_w) ⊙ (X_q W_qᵀ)`` with an int32 accumulator.

Shapes: X (tokens, in), W (out, in), s (in,).
"""

from __future__ import annotations

from typing import Sequence

import torch


def absmax_accumulate(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Running max|x| per channel (in,) over any number of (…, in) batches."""
    return torch.maximum(state, x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float())


def smooth_scales(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X|^α / max|W|^(1-α); channels that never fire keep s = 1."""
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp_min(1e-5)
