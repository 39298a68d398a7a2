"""Distillation losses: pure functions on logits (..., vocab) and hidden states.

``p`` is the teacher's distribution, ``q`` the student's, both softened by the temperature T
(softmax(z / T)); every logit loss is the mean over token positions, multiplied by T² so its
gradient keeps the same scale whatever T (Hinton et al. 2015).

* ``forward_kl``  KL(p ‖ q): mass-covering, the classic KD objective (the default).
* ``reverse_kl``  KL(q ‖ p): mode-seeking (MiniLLM, Gu et al. 2024).
* ``jsd``         generalized Jensen-Shannon (GKD, Agarwal et al. 2024):
                  β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q; β→0 tends to forward
                  KL's behaviour, β→1 to reverse KL's (both scaled by β(1−β) near the ends).
* ``skew_kl``     KL(p ‖ α·p + (1−α)·q) (DistiLLM, Ko et al. 2024): forward KL against a mixture
                  that keeps the student's log-probabilities bounded where p has mass and q has
                  none, so early gradients stay stable.
* ``topk_forward_kl`` forward KL with the teacher kept only as its top-k probabilities, what a
                  cached teacher stores for a large vocabulary: KL over k + 1 outcomes, the k
                  tokens and "any other token" (mass 1 − Σ top-k for each side). Unlike a KL
                  against the top-k renormalised, it is minimised by q = p, so it does not pull the
                  student's mass onto the teacher's top tokens; it equals the full KL when k is the
                  vocabulary.
* ``hidden_mse``  per-block hidden-state MSE, normalised by the teacher's mean square (TED-style
                  layer-wise distillation), so blocks with a large residual stream do not dominate.

Log-probabilities are computed in float32 whatever the input dtype (softmax over 50k entries in
bfloat16 loses the tail).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


def _logp(z: torch.Tensor, T: float) -> torch.Tensor:
    return F.log_softmax(z.float() / T, dim=-1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per position (...,), from log-probabilities (0·log 0 = 0)."""
    a = logp_a.exp()
    return torch.where(a > 0, a * (logp_a - logp_b), torch.zeros_like(a)).sum(-1)


def _mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _mean(_kl(_logp(teacher, T), _logp(student, T)), mask) * T * T


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _mean(_kl(_logp(student, T), _logp(teacher, T)), mask) * T * T


def _mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1−w)·q), computed stably from log-probabilities."""
    if w <= 0:
        return logq
    if w >= 1:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log(1 - w))


def jsd(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    logp, logq = _logp(teacher, T), _logp(student, T)
    logm = _mixture(logp, logq, beta)
    per = beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    return _mean(per, mask) * T * T


def skew_kl(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, alpha: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    logp, logq = _logp(teacher, T), _logp(student, T)
    return _mean(_kl(logp, _mixture(logp, logq, alpha)), mask) * T * T


def logit_loss(name: str, student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, beta: float = 0.5,
               alpha: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss ``name`` (one of ``LOSSES``) between full logits."""
    if name == "forward_kl":
        return forward_kl(student, teacher, T, mask)
    if name == "reverse_kl":
        return reverse_kl(student, teacher, T, mask)
    if name == "jsd":
        return jsd(student, teacher, T, beta, mask)
    if name == "skew_kl":
        return skew_kl(student, teacher, T, alpha, mask)
    raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")


def teacher_topk(teacher: torch.Tensor, k: int, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position: (their log-probabilities at temperature
    T, float32; their ids, int32), each (..., k)."""
    vals, idx = _logp(teacher, T).topk(k, dim=-1)
    return vals, idx.to(torch.int32)


def _with_rest(logp_k: torch.Tensor) -> torch.Tensor:
    """k log-probabilities -> k + 1: the last one is log(1 − Σ p_k), "any other token"."""
    rest = (1 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
    return torch.cat([logp_k, rest], dim=-1)


def topk_forward_kl(student: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor, T: float = 1.0,
                    alpha: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) over the teacher's top-k tokens plus one outcome for all the others
    (``teacher_topk`` gives the teacher's side); ``alpha`` > 0: the skew variant,
    KL(p ‖ α·p + (1−α)·q) on the same k + 1 outcomes."""
    logp = _with_rest(top_logp.float())
    logq = _with_rest(_logp(student, T).gather(-1, top_idx.long()))
    if alpha > 0:
        logq = _mixture(logp, logq, alpha)
    return _mean(_kl(logp, logq), mask) * T * T


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² (each block's output hidden states)."""
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
