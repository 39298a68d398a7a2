"""The algorithm: a pure function on tensors."""

import torch


def binarize(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> (signs (out, in) int8 in {-1, +1}, α (out,) float32) minimizing
    ‖W_r − α_r·s_r‖² per row: s = sign(W) (zeros as +1), α_r = mean_j |W_rj|."""
    W = W.float()
    signs = torch.where(W >= 0, 1, -1).to(torch.int8)
    return signs, W.abs().mean(dim=1)
