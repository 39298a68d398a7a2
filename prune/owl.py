"""OWL: outlier-weighted layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

Blocks whose weights carry more *outliers* keep more of them. A block's outlier ratio D is the
fraction of its Wanda scores ``|W_ij|·‖X_j‖₂`` (pooled over the block's pruned Linears) above
``M`` times their mean. The ratios are rescaled to the range [0, 2λ] and centred, and each
block's density is the target's plus its centred ratio:

    D'_l = 2λ · (D_l − min D) / (max D − min D)
    sparsity_l = S − (D'_l − mean D')

so the mean over blocks stays S (the total when blocks have equal sizes, as decoder blocks do).
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (pooled) above ``m`` × their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from per-block outlier ratios; the mean is ``sparsity``. Each value is
    kept inside [0, 1) (the clamp can only move the mean if λ is larger than the target allows)."""
    D = torch.tensor(ratios, dtype=torch.float64)
    span = D.max() - D.min()
    Dn = (D - D.min()) / span * 2 * lam if span > 0 else torch.zeros_like(D)
    s = sparsity - (Dn - Dn.mean())
    return [min(max(float(x), 0.0), 0.999) for x in s]
