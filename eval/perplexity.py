"""Perplexity on non-overlapping windows: exp(mean next-token NLL).

Protocol (the one the issues' figures use): the evaluation text is tokenized once, cut into
consecutive windows of ``seq_len`` tokens (the tail is dropped), each window is scored on its own
(no context carried over), and every window contributes its ``seq_len - 1`` predicted tokens.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=lambda done, total: None) -> dict:
    """``windows`` (n, T) int64 -> {"perplexity", "nll", "tokens", "windows", "seconds"}."""
    t0 = time.time()
    nll, count = 0.0, 0
    model.eval()
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
        # token t+1 is predicted from positions <= t
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
        progress(min(i + batch_size, len(windows)), len(windows))
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": len(windows),
        "seconds": round(time.time() - t0, 2),
    }
