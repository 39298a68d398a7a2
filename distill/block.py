"""Block-scope distillation: inside the layer-wise sweep, right after a block's compressing passes,
train that block to reproduce the original block's outputs on the cached calibration inputs
(block-wise reconstruction, as BRECQ and OmniQuant do). Only one block and its activations are
in memory, so it runs wherever the sweep runs; what it cannot see is the error that later blocks
and the head add (model scope trains against the logits for that)."""

from __future__ import annotations

import math

import torch
from compress.distill.config import DistillConfig
from compress.distill.loop import autocast, optimizer
from compress.distill.trainable import Prepared, restore, state
from torch import nn

from compress.errors import TrainingError
from compress.utils import first_output


def _nmse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖y − t‖² / ‖t‖²."""
    return (y.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def distill_block(block: nn.Module, teacher: nn.Module, hidden: list[torch.Tensor], kwargs: list[tuple[tuple, dict]],
                  cfg: DistillConfig, prep: Prepared, *, seed: int = 0, name: str = "block") -> dict:
    """Train ``prep``'s parameters of ``block`` so that block(x_b) ≈ teacher(x_b) for every
    calibration batch x_b (relative squared error). A share ``holdout`` of the batches (when
    there are two or more) is held out: the block keeps the weights with the lowest held-out
    error, the untrained ones included. Returns {"steps", "error_before", "error_after"}."""
    dev = hidden[0].device
    with torch.no_grad():
        targets = [first_output(teacher(h, *a, **k)).detach().float() for h, (a, k) in zip(hidden, kwargs)]
    nb = len(hidden)
    k = max(1, round(nb * cfg.holdout)) if nb >= 2 else 0
    held = torch.linspace(0, nb - 1, k).round().long().unique().tolist() if k else []
    fit = [b for b in range(nb) if b not in held] or list(range(nb))
    held = held or fit
    params = prep.parameters()
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(fit)))

    @torch.no_grad()
    def held_error() -> float:
        tot = 0.0
        for b in held:
            a, kw = kwargs[b]
            with autocast(dev, cfg.precision):
                tot += float(_nmse(first_output(block(hidden[b], *a, **kw)), targets[b]))
        return tot / len(held)

    before = held_error()
    best = (before, state(block))
    if not params:
        return {"steps": 0, "error_before": before, "error_after": before}
    opt, sched = optimizer(prep, cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = [fit[j] for j in torch.randperm(len(fit), generator=gen).tolist()]
            b = order.pop()
            a, kw = kwargs[b]
            opt.zero_grad(set_to_none=True)
            with autocast(dev, cfg.precision):
                loss = _nmse(first_output(block(hidden[b], *a, **kw)), targets[b])
            if not torch.isfinite(loss):
                restore(block, best[1])
                raise TrainingError(f"distillation of {name}: the loss became {loss.item()} at step {step + 1}; nothing was "
                                    f"exported. Lower distill.lr ({cfg.lr}) or distill.scale_lr ({cfg.scale_lr})")
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            prep.apply_masks()
    after = held_error()
    if cfg.restore_best and after > best[0]:
        restore(block, best[1])
        after = best[0]
    return {"steps": steps, "error_before": round(before, 8), "error_after": round(after, 8)}
