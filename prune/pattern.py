"""Sparsity patterns and the mask selection every pruning method shares.

A pattern is ``unstructured`` (each output row keeps ``in - round(sparsity · in)`` weights, as
the Wanda and SparseGPT references prune per row) or ``N:M`` (every group of M consecutive input
columns of a row keeps at most N weights: 2:4 is what sparse tensor cores run). Masks are bool
tensors, True where a weight is kept. Scores are per weight, higher = more important; the
methods differ only in the score (|W|, |W|·‖X_j‖₂, w²/[H⁻¹]_jj).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    n: int | None = None  # kept per group (None: unstructured)
    m: int | None = None  # group width

    @property
    def structured(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies, 1 - N/M (None when unstructured)."""
        return None if self.m is None else 1 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"


def parse_pattern(text: str) -> Pattern:
    """``unstructured`` or ``N:M`` with 0 < N < M; ValueError says what is accepted."""
    t = str(text).strip().lower()
    if t in ("unstructured", "none", ""):
        return Pattern()
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", t)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"{text!r} is not a sparsity pattern; use 'unstructured' or N:M with 0 < N < M, e.g. '2:4' or '4:8'")
    return Pattern(int(m[1]), int(m[2]))


def prune_count(sparsity: float, start: int, end: int) -> int:
    """Weights of a row to prune among columns [start, end) so that every prefix of the row is
    pruned to round(sparsity · prefix): blocks of any widths add up to round(sparsity · in)."""
    return round(sparsity * end) - round(sparsity * start)


def keep_top(score: torch.Tensor, prune: int) -> torch.Tensor:
    """Mask (rows, k) keeping all but the ``prune`` lowest scores of each row."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if prune > 0:
        idx = torch.topk(score, prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask (rows, k) keeping the ``n`` highest scores of every ``m`` consecutive columns."""
    rows, k = score.shape
    g = score.reshape(rows, k // m, m)  # (rows, groups, m)
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(2, torch.topk(g, n, dim=2).indices, True)
    return mask.reshape(rows, k)


def select_mask(score: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """The mask (out, in) a one-shot method keeps: per row, or N of every M."""
    if pattern.structured:
        return keep_n_of_m(score, pattern.n, pattern.m)
    return keep_top(score, prune_count(sparsity, 0, score.shape[1]))


def check_pattern(in_features: int, pattern: Pattern) -> str | None:
    if pattern.structured and in_features % pattern.m:
        return f"pattern {pattern}: M {pattern.m} does not divide in_features {in_features}"
    return None
