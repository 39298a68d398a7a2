"""The training loop of model-scope distillation: the student (a compressed model, made trainable
by ``compress.distill.trainable``) learns to match the teacher on calibration windows.

* torch's AdamW and LambdaLR (linear warmup, then cosine to ``min_lr`` of each group's rate);
  quantization scales (log space) and weights are two parameter groups with their own rates;
* gradient accumulation, optional gradient checkpointing (transformers' own), bf16 autocast where
  the device has it;
* the teacher online (its logits per batch, exact) or cached once as its top-k (then freed);
* early stopping on the distillation gap (forward KL to the teacher's top-k, cached once) over a
  held-out slice of the calibration windows, measured before training too: the weights returned
  are the best seen there, never worse than the start; the held-out perplexity is recorded beside it;
* deterministic for a seed (the window order of each epoch is a permutation seeded by it, and the
  loop keeps no other randomness), and resumable: every ``save_every`` steps, and on Ctrl-C, the
  state (trained tensors, optimizer, scheduler, best weights, curve) goes to ``state_path``
  atomically; ``resume=True`` continues from it and reaches the same weights as an
  uninterrupted run;
* a non-finite loss stops with ``TrainingError`` (exit 5), the model back at its best weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from compress.distill import losses
from compress.distill.config import DistillConfig
from compress.distill.trainable import Prepared, restore, state
from torch import nn

from compress.errors import TrainingError, UsageError
from compress.utils import atomic_torch_save


def split_windows(windows: torch.Tensor, holdout: float, field: str = "distill.holdout") -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): ``holdout`` of them, evenly spread, held out."""
    n = len(windows)
    k = max(1, round(n * holdout))
    if n - k < 1:
        raise UsageError(f"{field}: {n} calibration window(s) leave none to train on once {k} are held out for early "
                         "stopping; use more calibration.samples (at least 2)")
    held = torch.linspace(0, n - 1, k).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return windows[keep], windows[held]


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for (auto: on a CUDA GPU that supports it), else nothing."""
    use = precision == "bf16" or precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def lr_lambda(total: int, warmup: float, min_lr: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` of the steps, then a cosine from 1 to ``min_lr``."""
    w = int(total * warmup)

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        t = min(1.0, (step - w) / max(1, total - w))
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@torch.no_grad()
def teacher_topk(teacher: nn.Module, windows: torch.Tensor, k: int, T: float, batch_size: int, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities (float32) and token ids (int32) at every position of
    every window: (N, seq, k) each."""
    vals, idx = [], []
    dev = next(teacher.parameters()).device
    for b in range(0, len(windows), batch_size):
        logits = teacher(input_ids=windows[b : b + batch_size].to(dev), use_cache=False).logits
        v, i = losses.teacher_topk(logits, k, T)
        vals.append(v.cpu())
        idx.append(i.cpu())
        if progress:
            progress(min(b + batch_size, len(windows)), len(windows))
    return torch.cat(vals), torch.cat(idx)


@torch.no_grad()
def heldout(model: nn.Module, windows: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor], cfg: DistillConfig) -> tuple[float, float]:
    """On the held-out windows: the distillation gap (forward KL to the teacher's cached top-k,
    at the training temperature) and the model's perplexity (next-token cross-entropy)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    kl, nll, n = 0.0, 0.0, 0
    for b in range(0, len(windows), cfg.batch_size):
        x = windows[b : b + cfg.batch_size].to(dev)
        with autocast(dev, cfg.precision):
            logits = model(input_ids=x, use_cache=False).logits
        kl += float(losses.topk_forward_kl(logits, topk[0][b : b + len(x)].to(dev), topk[1][b : b + len(x)].to(dev), cfg.temperature)) * len(x)
        nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        n += x[:, 1:].numel()
    model.train(was)
    return kl / len(windows), math.exp(nll / max(n, 1))


def _fingerprint(cfg: DistillConfig, train: torch.Tensor, held: torch.Tensor, seed: int) -> str:
    h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    for t in (train, held):
        h.update(t.numpy().tobytes())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def optimizer(prep: Prepared, cfg: DistillConfig, total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``prep``'s parameters (log-scales at ``scale_lr``, the rest at ``lr``) and its
    warmup-then-cosine schedule over ``total`` steps."""
    groups = [{"params": prep.groups["scales"], "lr": cfg.scale_lr}, {"params": prep.groups["weights"] + prep.groups["norms"], "lr": cfg.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup, cfg.min_lr))


def _no_progress(done: int, total: int, info: str) -> None:
    pass


def _no_log(msg: str) -> None:
    pass


@dataclass
class TrainOptions:
    """How ``train_model`` runs, beside what it trains (its keyword arguments)."""

    seed: int = 0  # seeds each epoch's window order, the loop's only randomness
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # the teacher's cached top-k over the training windows (then no teacher)
    held_topk: tuple[torch.Tensor, torch.Tensor] | None = None  # its top-k over the held-out windows; None: computed here
    state_path: Path | None = None  # the resumable state, saved every save_every steps and on Ctrl-C; None: not saved
    resume: bool = False  # continue from state_path where it exists
    progress: Callable[[int, int, str], None] = _no_progress  # (step, planned steps, loss and speed) after each step
    log: Callable[[str], None] = _no_log  # a line per held-out evaluation, and where it resumes
    interrupt_at: int | None = None  # raise KeyboardInterrupt after this step (tests of resume)
    # a structurally pruned student: the teacher's block each student block matches, and the
    # teacher's hidden dimensions the student kept (None: all) for the hidden-state loss
    hidden_map: tuple[list[int], torch.Tensor | None] | None = None


@dataclass(eq=False)
class TrainJob:
    """One distillation run: what it trains (the first seven fields), the optimizer and schedule
    over ``total`` steps, and ``st``, the state that ``state_path`` holds for a resume: step,
    tokens, seconds, curve, best weights, evaluations without improvement (``bad``), why it
    stopped, the held-out top-k and the fingerprint of the options and data."""

    student: nn.Module
    teacher: nn.Module | None  # None where opts.topk holds its top-k
    train: torch.Tensor  # (N, seq) training windows
    held: torch.Tensor  # (M, seq) held-out windows, for early stopping
    cfg: DistillConfig
    prep: Prepared
    opts: TrainOptions
    params: list[nn.Parameter] = field(init=False)
    dev: torch.device = field(init=False)
    n_micro: int = field(init=False)  # micro-batches per epoch
    total: int = field(init=False)  # planned optimizer steps
    opt: torch.optim.Optimizer = field(init=False)
    sched: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    st: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.params = self.prep.parameters()
        if not self.params:
            raise UsageError("distill.train: nothing to train in this model (no quantized, pruned or low-rank layer and no norm); "
                             "use train: weights to train the dense Linears")
        self.dev = next(self.student.parameters()).device
        self.n_micro = math.ceil(len(self.train) / self.cfg.batch_size)
        self.total = self.cfg.steps or max(1, math.ceil(self.cfg.epochs * self.n_micro / self.cfg.grad_accum))
        self.opt, self.sched = optimizer(self.prep, self.cfg, self.total)

    def begin(self) -> None:
        """Train mode (with gradient checkpointing where asked for), then the state: resumed from
        ``state_path``, or fresh (the held-out gap and perplexity before any step)."""
        cfg, student, opts = self.cfg, self.student, self.opts
        if cfg.grad_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train(cfg.grad_checkpointing)  # checkpointing only acts in train mode; the demo family has no dropout
        fp = _fingerprint(cfg, self.train, self.held, opts.seed)
        if opts.resume and opts.state_path is not None and opts.state_path.exists():
            self.st = self._resumed(fp)
        else:
            self.st = self._fresh(fp)

    def _resumed(self, fp: str) -> dict:
        path = self.opts.state_path
        st = torch.load(path, weights_only=False)
        if st["fingerprint"] != fp:
            raise UsageError(f"{path}: the interrupted distillation used other options or data; run without --resume to start over")
        restore(self.student, st["params"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.opts.log(f"distillation resumes at step {st['step']} of {self.total}")
        return st

    def _fresh(self, fp: str) -> dict:
        cfg, held_topk = self.cfg, self.opts.held_topk
        if held_topk is None:
            held_topk = teacher_topk(self.teacher, self.held, cfg.top_k, cfg.temperature, cfg.batch_size)
        kl0, ppl0 = heldout(self.student, self.held, held_topk, cfg)
        return {"fingerprint": fp, "step": 0, "tokens": 0, "seconds": 0.0,
                "curve": [{"step": 0, "heldout_kl": round(kl0, 6), "heldout_ppl": round(ppl0, 4)}],
                "best": {"step": 0, "kl": kl0, "ppl": ppl0, "params": state(self.student)}, "bad": 0, "stopped": None,
                "start": {"kl": kl0, "ppl": ppl0}, "held_topk": held_topk}

    def checkpoint(self) -> None:
        if self.opts.state_path is not None:
            atomic_torch_save({**self.st, "params": state(self.student), "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict()}, self.opts.state_path)

    def run(self) -> None:
        """Optimizer steps until the planned number or a stop; on Ctrl-C the state is saved first."""
        st = self.st
        t_start = time.time() - st["seconds"]
        try:
            while st["step"] < self.total and st["stopped"] is None:
                step_loss = self.step()
                st["seconds"] = time.time() - t_start
                self.after_step(step_loss)
        except KeyboardInterrupt:
            self.checkpoint()
            raise

    def batch_of(self, m: int) -> torch.Tensor:
        """The window indices of micro-batch ``m`` (counted over all epochs)."""
        epoch, j = divmod(m, self.n_micro)
        perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.opts.seed * 100_003 + epoch))
        return perm[j * self.cfg.batch_size : (j + 1) * self.cfg.batch_size]

    def loss_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The training loss on the windows ``idx``: to the teacher (online, or its cached top-k),
        plus the hidden-state and language-modelling terms where they have a weight."""
        cfg, dev, topk = self.cfg, self.dev, self.opts.topk
        x = self.train[idx].to(dev)
        hidden = cfg.hidden_weight > 0
        with autocast(dev, cfg.precision):
            out = self.student(input_ids=x, use_cache=False, output_hidden_states=hidden)
            if topk is not None:
                loss = losses.topk_forward_kl(out.logits, topk[0][idx].to(dev), topk[1][idx].to(dev), cfg.temperature,
                                              cfg.alpha if cfg.loss == "skew_kl" else 0.0)
            else:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
                loss = losses.logit_loss(cfg.loss, out.logits, t_out.logits, cfg.temperature, cfg.beta, cfg.alpha)
                if hidden:
                    loss = loss + cfg.hidden_weight * losses.hidden_mse(list(out.hidden_states[1:]), self.teacher_hidden(t_out.hidden_states))
            if cfg.lm_weight > 0:
                lm = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
                loss = loss + cfg.lm_weight * lm
        return loss

    def teacher_hidden(self, states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The teacher's block outputs the student's match: all of them, or for a structurally
        pruned student those of the blocks it kept, over the hidden dimensions it kept."""
        if self.opts.hidden_map is None:
            return list(states[1:])
        layers, dims = self.opts.hidden_map
        picked = [states[1 + i] for i in layers]
        return [h.index_select(-1, dims.to(h.device)) for h in picked] if dims is not None else picked

    def step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns its mean loss."""
        cfg, st = self.cfg, self.st
        self.opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for a in range(cfg.grad_accum):
            idx = self.batch_of(st["step"] * cfg.grad_accum + a)
            loss = self.loss_of(idx)
            if not torch.isfinite(loss):
                self._diverged(loss)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            st["tokens"] += idx.numel() * self.train.shape[1]
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.prep.apply_masks()
        st["step"] += 1
        return step_loss

    def _diverged(self, loss: torch.Tensor) -> NoReturn:
        restore(self.student, self.st["best"]["params"])
        raise TrainingError(
            f"distillation: the loss became {loss.item()} at step {self.st['step'] + 1}; training stopped and the model "
            f"is back at its best weights (step {self.st['best']['step']}); nothing was exported. Lower distill.lr "
            f"({self.cfg.lr}) or distill.scale_lr ({self.cfg.scale_lr}), or use precision: fp32"
        )

    def after_step(self, step_loss: float) -> None:
        """The curve's row and the progress of the step just taken; the held-out evaluation, the
        time limit, the periodic checkpoint and the test interruption where they fall due."""
        cfg, st = self.cfg, self.st
        row = {"step": st["step"], "loss": round(step_loss, 6), "lr": self.opt.param_groups[-1]["lr"]}
        st["curve"].append(row)
        tps = st["tokens"] / max(st["seconds"], 1e-9)
        self.opts.progress(st["step"], self.total, f"loss {step_loss:.4f} · {tps:,.0f} tok/s")
        if st["step"] % cfg.eval_every == 0 or st["step"] == self.total:
            kl, ppl = self.evaluate(row)
            self.opts.log(f"distill step {st['step']}/{self.total}: loss {step_loss:.4f}, held-out gap {kl:.4f} and perplexity "
                          f"{ppl:.3f} (best gap {st['best']['kl']:.4f} at step {st['best']['step']}), {tps:,.0f} tokens/s")
        if cfg.minutes is not None and st["seconds"] >= cfg.minutes * 60 and st["stopped"] is None:
            st["stopped"] = "time"
        if st["step"] % cfg.save_every == 0:
            self.checkpoint()
        if self.opts.interrupt_at is not None and st["step"] == self.opts.interrupt_at:
            raise KeyboardInterrupt

    def evaluate(self, row: dict) -> tuple[float, float]:
        """The held-out gap and perplexity, also into ``row``; keep the best weights, or count one
        more evaluation without improvement (``patience`` of them stop the run where ``restore_best``)."""
        st = self.st
        kl, ppl = heldout(self.student, self.held, st["held_topk"], self.cfg)
        row.update(heldout_kl=round(kl, 6), heldout_ppl=round(ppl, 4))
        if kl < st["best"]["kl"]:
            st["best"] = {"step": st["step"], "kl": kl, "ppl": ppl, "params": state(self.student)}
            st["bad"] = 0
        else:
            st["bad"] += 1
            if st["bad"] >= self.cfg.patience and self.cfg.restore_best:
                st["stopped"] = "early stop"
        return kl, ppl

    def finish(self) -> dict:
        """Back to the best weights (where ``restore_best``), out of train mode; the run's record."""
        cfg, st, student = self.cfg, self.st, self.student
        if cfg.restore_best and st["best"]["step"] != st["step"]:
            restore(student, st["best"]["params"])
        if cfg.grad_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
        student.eval()
        return {
            "steps": st["step"],
            "planned_steps": self.total,
            "tokens": st["tokens"],
            "seconds": round(st["seconds"], 1),
            "stopped": st["stopped"] or "steps",
            "best_step": st["best"]["step"],
            "heldout_kl_start": round(st["start"]["kl"], 6),
            "heldout_kl_best": round(st["best"]["kl"], 6),
            "heldout_ppl_start": round(st["start"]["ppl"], 4),
            "heldout_ppl_best": round(st["best"]["ppl"], 4),
            "curve": st["curve"],
        }


def train_model(student: nn.Module, teacher: nn.Module | None, train: torch.Tensor, held: torch.Tensor, cfg: DistillConfig,
                prep: Prepared, **options) -> dict:
    """Distill ``teacher`` (or its cached ``topk`` over ``train``) into ``student`` on ``train``
    windows, early-stopping on the distillation gap over ``held`` (against the teacher's top-k
    there, ``held_topk``, computed here when not given). ``options``: the fields of
    ``TrainOptions`` (seed, the cached top-k, the state file and resume, callbacks). Returns the
    run's record: curve, steps, tokens, seconds, why it stopped, held-out gap and perplexity
    before and at the best step."""
    job = TrainJob(student, teacher, train, held, cfg, prep, TrainOptions(**options))
    job.begin()
    job.run()
    return job.finish()
