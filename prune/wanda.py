"""Wanda: prune by weights and activations (Sun, Liu, Bair, Kolter, "A Simple and Effective
Pruning Approach for Large Language Models", ICLR 2024).

Score of weight (i, j): ``|W_ij| · ‖X_j‖₂``, the size of its contribution to the output on the
calibration inputs X (tokens, in); compared within each output row (the paper's "per output"
comparison group), or within each group of M columns for N:M. No weight update.

``sqnorm`` is Σ_tokens x_j² per input channel (in,), the engine's ``sqnorm`` statistic.
"""

from __future__ import annotations

import torch
from compress.prune.pattern import Pattern, select_mask


def wanda_score(W: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ (out, in)."""
    return W.float().abs() * sqnorm.float().clamp_min(0).sqrt()[None, :]


def wanda_prune(W: torch.Tensor, sqnorm: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (out, in), ``sqnorm`` (in,) -> (pruned W float32 (out, in), mask bool, True = kept)."""
    W = W.float()
    mask = select_mask(wanda_score(W, sqnorm), sparsity, pattern)
    return W * mask, mask
