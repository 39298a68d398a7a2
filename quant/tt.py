"""Tensor-train (TT) decomposition of an embedding table: TT-SVD, and rows read back from the cores.

The table E (V, D) is held as a TT-matrix (Oseledets 2011, "Tensor-Train Decomposition", SIAM J.
Sci. Comput.; the tensorized embedding layout of Hrinchuk et al. 2020): the vocabulary is padded to
V' = v_1·…·v_d ≥ V rows (the rows V..V'-1 are zero), the width factored exactly as D = d_1·…·d_d,
and every entry is a product of d small matrices

    E[i, j] = G_1[:, i_1, j_1, :] · G_2[:, i_2, j_2, :] ⋯ G_d[:, i_d, j_d, :]        (a 1 × 1 product)

with cores G_k of shape (r_{k-1}, v_k, d_k, r_k), r_0 = r_d = 1; (i_1, …, i_d) are the digits of
row i in the mixed radix (v_1, …, v_d), i_1 the most significant (row-major, as ``reshape`` reads
them), and (j_1, …, j_d) those of column j in (d_1, …, d_d). Stored: Σ_k r_{k-1}·v_k·d_k·r_k
numbers in place of V·D.

TT-SVD: reshape E to (v_1, …, v_d, d_1, …, d_d), interleave to (v_1, d_1, …, v_d, d_d) and merge
pairs into the d-way tensor T (v_1 d_1, …, v_d d_d); then d - 1 sequential truncated SVDs, each of
the remainder C unfolded as (r_{k-1} v_k d_k, rest): its left singular vectors (r_k of them) are
G_k, and diag(S)·Vᴴ is carried on. Each step keeps at most ``max_rank`` singular values and, with
``rel_error`` ε, the fewest whose discarded tail is at most ε‖E‖_F / √(d-1), so that
‖E - Ê‖_F ≤ ε‖E‖_F (Oseledets' Theorem 2.2). With neither, nothing is truncated and Ê = E up to
rounding.

TensorGPT (Xu, Xu & Mandic 2023) compresses a pretrained LLM's token embeddings with TT, training-
free; this file holds the whole table as one TT-matrix (the rows share the cores), the layout a
lookup reads with d small gathers and products per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD_SHARE = 0.01  # at most this share of padding rows buys a more balanced vocabulary factorization


@dataclass(frozen=True)
class TTShape:
    """How the table is factored: ``vocab`` (v_1, …, v_d), product V' ≥ ``num_embeddings`` (V),
    and ``dim`` (d_1, …, d_d), product exactly D."""

    num_embeddings: int
    vocab: tuple[int, ...]
    dim: tuple[int, ...]

    @property
    def padded(self) -> int:
        return math.prod(self.vocab)

    @property
    def embedding_dim(self) -> int:
        return math.prod(self.dim)


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """``d`` factors of ``n``, ascending, whose largest is as small as it can be (1s where ``n``
    has too few prime factors: a prime n gives (1, …, 1, n))."""
    if d == 1:
        return (n,)
    low = math.ceil(round(n ** (1 / d), 9))  # the largest factor is at least the d-th root
    for g in range(n // low, 0, -1):  # f = n / g, the largest factor, ascending; the others (≤ f) factor g
        if n % g == 0 and (rest := balanced_factors(g, d - 1))[-1] <= n // g:
            return (*rest, n // g)
    return (*(1,) * (d - 1), n)


def factorize(n: int, d: int, pad: float = PAD_SHARE) -> tuple[int, ...]:
    """``d`` ascending factors of the n' in [n, n + ⌊pad·n⌋] whose largest factor is smallest (the
    smallest such n'): a vocabulary is padded with zero rows where that balances its factors
    (997 → 10·10·10), width is factored exactly (``pad=0``)."""
    best, low = balanced_factors(n, d), math.ceil(round(n ** (1 / d), 9))
    for m in range(n + 1, n + int(pad * n) + 1):
        if best[-1] <= low:
            break  # as balanced as any n' can be
        f = balanced_factors(m, d)
        if f[-1] < best[-1]:
            best = f
    return best


def tt_shape(num_embeddings: int, embedding_dim: int, cores: int = 3) -> TTShape:
    """The factorization of a (num_embeddings, embedding_dim) table into ``cores`` cores."""
    return TTShape(num_embeddings, factorize(num_embeddings, cores), factorize(embedding_dim, cores, pad=0.0))


def tensorize(E: torch.Tensor, shape: TTShape) -> torch.Tensor:
    """E (V, D) -> T (v_1 d_1, …, v_d d_d), T[(i_1 j_1), …, (i_d j_d)] = E[i, j], padding rows zero."""
    V, D = E.shape
    d = len(shape.vocab)
    Ep = E.new_zeros(shape.padded, D)
    Ep[:V] = E
    t = Ep.reshape(*shape.vocab, *shape.dim)  # (v_1, …, v_d, d_1, …, d_d)
    t = t.permute([p for k in range(d) for p in (k, d + k)])  # (v_1, d_1, …, v_d, d_d)
    return t.reshape([v * q for v, q in zip(shape.vocab, shape.dim)])


def truncation_rank(S: torch.Tensor, max_rank: int | None, delta: float) -> int:
    """How many of the descending singular values ``S`` to keep: the fewest whose discarded tail
    ‖S[r:]‖₂ is at most ``delta`` (at least 1), at most ``max_rank``."""
    tail = S.flip(0).pow(2).cumsum(0).flip(0).sqrt()  # tail[r] = ‖S[r:]‖₂
    r = int((tail > delta).sum()) if delta > 0 else len(S)  # tail is non-increasing
    return max(1, min(r, max_rank or len(S), len(S)))


def tt_svd(E: torch.Tensor, shape: TTShape, max_rank: int | None = None, rel_error: float | None = None) -> list[torch.Tensor]:
    """TT-SVD of E (V, D): the cores G_k (r_{k-1}, v_k, d_k, r_k), in E's dtype (float32 at least).
    ``max_rank`` caps every r_k; ``rel_error`` ε bounds ‖E - Ê‖_F / ‖E‖_F (see the module docstring)."""
    dtype = torch.promote_types(E.dtype, torch.float32)
    T = tensorize(E.to(dtype), shape)  # (v_1 d_1, …, v_d d_d)
    d, n = len(shape.vocab), T.shape
    delta = rel_error * float(torch.linalg.vector_norm(T)) / math.sqrt(d - 1) if rel_error else 0.0
    cores, r, C = [], 1, T
    for k in range(d - 1):
        U, S, Vh = torch.linalg.svd(C.reshape(r * n[k], -1), full_matrices=False)  # (r_{k-1} v_k d_k, rest)
        rk = truncation_rank(S, max_rank, delta)
        cores.append(U[:, :rk].reshape(r, shape.vocab[k], shape.dim[k], rk))
        C, r = S[:rk, None] * Vh[:rk], rk  # (r_k, rest)
    cores.append(C.reshape(r, shape.vocab[-1], shape.dim[-1], 1))
    return cores


def ranks(cores: list[torch.Tensor]) -> list[int]:
    """(r_1, …, r_{d-1}): the ranks between the cores."""
    return [g.shape[-1] for g in cores[:-1]]


def tt_parameters(cores: list[torch.Tensor]) -> int:
    return sum(g.numel() for g in cores)


def row_digits(ids: torch.Tensor, vocab: tuple[int, ...]) -> torch.Tensor:
    """ids (N,) -> (N, d): each row index in the mixed radix ``vocab``, most significant first."""
    out = []
    for v in reversed(vocab):
        out.append(ids % v)
        ids = ids // v
    return torch.stack(out[::-1], dim=-1)


def tt_rows(cores: list[torch.Tensor], ids: torch.Tensor, vocab: tuple[int, ...]) -> torch.Tensor:
    """The rows ``ids`` (any shape, < V') of the table: (*ids.shape, D), in the cores' dtype.

    Each row's digits select one slice per core, contracted left to right: after core k the N rows
    are x (N, d_1⋯d_k, r_k). The rows whose digit i_k is the same share the slice G_k[:, i_k]
    (r_{k-1}, d_k, r_k): sorted by that digit, each run of them is one matrix product
    (rows·d_1⋯d_{k-1}, r_{k-1}) @ (r_{k-1}, d_k r_k), at most v_k per core. No slice is copied
    per row, and only the N rows asked for are formed (memory: the largest x, N × d_1⋯d_k × r_k)."""
    flat = ids.reshape(-1)
    N = len(flat)
    digits = row_digits(flat, vocab)  # (N, d)
    x, order = cores[0][0, digits[:, 0]], torch.arange(N, device=flat.device)  # x (N, d_1, r_1): row order[n] at n
    for k in range(1, len(cores)):
        g = cores[k]  # (r_{k-1}, v_k, d_k, r_k)
        keys, by = torch.sort(digits[order, k], stable=True)
        x, order = x[by], order[by]
        values, counts = torch.unique_consecutive(keys, return_counts=True)
        parts = [xs.reshape(-1, g.shape[0]) @ g[:, v].reshape(g.shape[0], -1)  # (n·d_1⋯d_{k-1}, d_k r_k)
                 for xs, v in zip(x.split(counts.tolist()), values.tolist())]
        x = torch.cat(parts).reshape(N, -1, g.shape[-1])  # (N, d_1⋯d_k, r_k)
    out = torch.empty_like(x).index_copy_(0, order, x)  # back to the order of ids
    return out.reshape(*ids.shape, -1)  # r_d = 1


def lookup_width(cores: list[torch.Tensor]) -> int:
    """Numbers ``tt_rows`` holds per row at its widest: max_k d_1⋯d_k · r_k."""
    width, out = 1, 1
    for g in cores:
        width *= g.shape[2]
        out = max(out, width * g.shape[3])
    return out


def tt_full(cores: list[torch.Tensor], shape: TTShape) -> torch.Tensor:
    """The whole table Ê (V, D), padding rows dropped: the cores contracted in turn, then the
    interleaved (v_1, d_1, …, v_d, d_d) order undone."""
    d = len(cores)
    t = cores[0].reshape(-1, cores[0].shape[-1])  # (v_1 d_1, r_1)
    for g in cores[1:]:
        t = (t @ g.reshape(g.shape[0], -1)).reshape(-1, g.shape[-1])  # (v_1 d_1 ⋯ v_k d_k, r_k)
    t = t.reshape([s for k in range(d) for s in (shape.vocab[k], shape.dim[k])])  # (v_1, d_1, …, v_d, d_d)
    t = t.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])  # (v_1, …, v_d, d_1, …, d_d)
    return t.reshape(shape.padded, shape.embedding_dim)[: shape.num_embeddings]
