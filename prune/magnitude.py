"""Magnitude pruning: drop the weights of smallest |w| (the baseline every method is measured
against; no calibration data). Per output row, or N of every M columns.

Objective: keep the largest weights, ``score_ij = |W_ij|``.
"""

from __future__ import annotations

import torch
from compress.prune.pattern import Pattern, select_mask


def magnitude_prune(W: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (out, in) -> (pruned W float32 (out, in), mask bool (out, in), True = kept)."""
    W = W.float()
    mask = select_mask(W.abs(), sparsity, pattern)
    return W * mask, mask
