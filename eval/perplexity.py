"""Perplexity on non-overlapping windows: exp(mean next-token NLL).

Protocol (the one the issues' figures use): the evaluation text is tokenized once, cut into
consecutive windows of ``seq_len`` tokens (the tail is dropped), each window is scored on its own
(no context carried over), and every window contributes its ``seq_len - 1`` predicted tokens.

``perplexity`` runs the whole model in memory; ``compress.eval.layerwise`` scores the same
windows one decoder block at a time (for models larger than memory) and sums the NLL with the
same ``next_token_nll``, so the two agree to float rounding.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Summed NLL of tokens 1..T-1 of each window: ``logits`` (B, T, V), ``x`` (B, T) int64;
    token t+1 is predicted from positions <= t."""
    logits = logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()


def summary(nll: float, windows: torch.Tensor, t0: float, mode: str) -> dict:
    """The result dict both paths return; ``mode``: ``model`` (whole model) or ``layerwise``."""
    count = windows[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": len(windows),
        "seconds": round(time.time() - t0, 2),
        "mode": mode,
    }


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=lambda done, total: None) -> dict:
    """``windows`` (n, T) int64 -> {"perplexity", "nll", "tokens", "windows", "seconds", "mode": "model"}."""
    t0 = time.time()
    nll = 0.0
    model.eval()
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]
        nll += next_token_nll(model(input_ids=x, use_cache=False).logits, x)  # logits (B, T, V)
        progress(min(i + batch_size, len(windows)), len(windows))
    return summary(nll, windows, t0, "model")
