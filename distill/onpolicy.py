"""On-policy distillation (GKD, Agarwal et al. 2024): part of the training sequences are written
by the student itself, so it learns from the teacher where its own outputs take it, not only on
text it would not have written (the train/inference mismatch of off-policy distillation).

A share ``on_policy`` (λ) of the micro-batches is on-policy: micro-batch m is when
⌊(m+1)λ⌋ > ⌊mλ⌋ (exactly λ of them, spread evenly, the same in a resumed run). Every
``on_policy_every`` optimizer steps the pool is refreshed: for each on-policy micro-batch up to
the next refresh, the student (its weights at that step, in eval mode, no gradients) continues
the first ``seq_len - on_policy_tokens`` tokens of that micro-batch's windows by
``on_policy_tokens`` tokens sampled at ``on_policy_temperature`` through its KV cache
(``compress.generation.sample``, a generator seeded by the seed and the step). The teacher then
scores the written sequence online; the loss counts the positions that predict written tokens.
"""

from __future__ import annotations

import math

import torch
from compress.distill.config import DistillConfig
from compress.distill.sources import Batch
from torch import nn

from compress.generation import sample


def is_on_policy(m: int, share: float) -> bool:
    """Whether micro-batch ``m`` trains on the student's own samples (exactly ``share`` of them)."""
    return share > 0 and math.floor((m + 1) * share + 1e-9) > math.floor(m * share + 1e-9)


def written_mask(batch: int, length: int, prompt: int) -> torch.Tensor:
    """Logit positions that predict a written token: prompt - 1 and later."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, prompt - 1 :] = True
    return mask


def prompt_len(seq_len: int, cfg: DistillConfig) -> int:
    """Tokens of a window kept as the prompt of an on-policy sample."""
    return max(1, seq_len - cfg.on_policy_tokens)


def refresh(student: nn.Module, source, cfg: DistillConfig, step: int, seed: int) -> dict[int, torch.Tensor]:
    """The pool for optimizer steps ``step`` .. ``step + on_policy_every - 1``: micro-batch
    number -> the (B, seq_len) sequences the student wrote from that batch's prompts."""
    prompt = prompt_len(source.seq_len, cfg)
    first, last = step * cfg.grad_accum, (step + cfg.on_policy_every) * cfg.grad_accum
    wanted = [m for m in range(first, last) if is_on_policy(m, cfg.on_policy)]
    if not wanted:
        return {}
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    was = student.training
    student.eval()
    try:
        prompts = [source.batch(m).x[:, :prompt] for m in wanted]
        sizes = [len(p) for p in prompts]
        written = sample(student, torch.cat(prompts), source.seq_len - prompt, temperature=cfg.on_policy_temperature,
                         top_k=None, generator=g)
    finally:
        student.train(was)
    return dict(zip(wanted, written.split(sizes), strict=True))


def pooled(pool: dict[int, torch.Tensor], m: int, prompt: int) -> Batch:
    """Micro-batch ``m`` from the pool, its mask on the positions that predict written tokens."""
    x = pool[m]
    return Batch(x, written_mask(len(x), x.shape[1], prompt))
