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
from compress.distill.onpolicy import is_on_policy, pooled, prompt_len, refresh
from compress.distill.sources import Batch, Responses, Streamed, Windows, digest
from compress.distill.trainable import Prepared, restore, state
from torch import nn

from compress.errors import TrainingError, UsageError
from compress.utils import atomic_torch_save


def holdout_split(n: int, holdout: float, field: str, what: str, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the items kept for training, indices of the held-out ones): ``holdout`` of ``n``
    items, evenly spread, held out; a UsageError naming ``field`` where none would be left."""
    k = max(1, round(n * holdout))
    if n - k < 1:
        raise UsageError(f"{field}: {n} {what} leave none to train on once {k} are held out for early stopping; {fix}")
    held = torch.linspace(0, n - 1, k).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return keep, held


def split_windows(windows: torch.Tensor, holdout: float, field: str = "distill.holdout") -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): ``holdout`` of them, evenly spread, held out."""
    keep, held = holdout_split(len(windows), holdout, field, "calibration window(s)", "use more calibration.samples (at least 2)")
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


@torch.no_grad()
def heldout_responses(model: nn.Module, held: Responses, cfg: DistillConfig) -> tuple[float, float]:
    """Black-box distillation's held-out measure: the mean cross-entropy of the held-out
    responses' tokens (the prompts not counted) and its exponential, their perplexity."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for b in held.all_batches(cfg.batch_size):
        with autocast(dev, cfg.precision):
            logits = model(input_ids=b.x.to(dev), use_cache=False).logits
        nll += float(response_loss(logits, b.x.to(dev), b.mask.to(dev))) * int(b.mask.sum())
        n += int(b.mask.sum())
    model.train(was)
    return nll / max(n, 1), math.exp(nll / max(n, 1))


def response_loss(logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the logit positions ``mask`` marks (position t
    predicts token t + 1)."""
    per = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    m = mask[:, :-1].reshape(-1).to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1)


def planned_steps(cfg: DistillConfig, source) -> int:
    """Optimizer steps: ``steps``, or the steps ``tokens`` take (both: the fewer), else
    ``epochs`` passes over the source (a streamed corpus has no known length: it needs one of
    the first two)."""
    by_tokens = None
    if cfg.tokens:
        by_tokens = max(1, math.ceil(cfg.tokens / (source.tokens_per_item * cfg.batch_size * cfg.grad_accum)))
    if cfg.steps:
        return min(cfg.steps, by_tokens or cfg.steps)
    if by_tokens:
        return by_tokens
    if source.per_epoch is None:
        raise UsageError(f"distill.data: {cfg.data} is read as training goes, so its length is unknown; set distill.steps "
                         "or distill.tokens (the training budget)")
    return max(1, math.ceil(cfg.epochs * source.per_epoch / cfg.grad_accum))


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
    samples: Callable[[int, dict], None] | None = None  # on-policy: (step, the fresh pool) at each refresh


@dataclass(eq=False)
class TrainJob:
    """One distillation run: what it trains (the first seven fields), the optimizer and schedule
    over ``total`` steps, and ``st``, the state that ``state_path`` holds for a resume: step,
    tokens, seconds, curve, best weights, evaluations without improvement (``bad``), why it
    stopped, the held-out top-k, the on-policy pool and the fingerprint of the options and data.

    With a teacher (or its top-k) the loss is a divergence from it on the training windows;
    with neither (black-box distillation) ``train`` and ``held`` are ``Responses`` and the loss
    is the cross-entropy of the teacher's responses, the early stop on the held-out ones."""

    student: nn.Module
    teacher: nn.Module | None  # None where opts.topk holds its top-k, or black-box (no teacher but its text)
    train: torch.Tensor | Windows | Responses | Streamed  # (N, seq) training windows, or a source of batches
    held: torch.Tensor | Responses  # (M, seq) held-out windows, for early stopping (black-box: held-out responses)
    cfg: DistillConfig
    prep: Prepared
    opts: TrainOptions
    params: list[nn.Parameter] = field(init=False)
    dev: torch.device = field(init=False)
    source: Windows | Responses | Streamed = field(init=False)
    sft: bool = field(init=False)  # black-box: the responses' cross-entropy, no teacher
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
        self.source = Windows(self.train, self.cfg.batch_size, self.opts.seed) if isinstance(self.train, torch.Tensor) else self.train
        self.sft = self.teacher is None and self.opts.topk is None
        if self.sft and self.cfg.on_policy > 0:
            raise UsageError("distill.on_policy needs a teacher to score the student's samples; black-box distillation has only "
                             "its text (use on_policy: 0)")
        self.total = planned_steps(self.cfg, self.source)
        self.opt, self.sched = optimizer(self.prep, self.cfg, self.total)

    def begin(self) -> None:
        """Train mode (with gradient checkpointing where asked for), then the state: resumed from
        ``state_path``, or fresh (the held-out gap and perplexity before any step)."""
        cfg, student, opts = self.cfg, self.student, self.opts
        if cfg.grad_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train(cfg.grad_checkpointing)  # checkpointing only acts in train mode; the demo family has no dropout
        held = Windows(self.held, 1) if isinstance(self.held, torch.Tensor) else self.held
        fp = digest(self.source, held, extra=json.dumps([cfg.model_dump(mode="json"), opts.seed], sort_keys=True).encode())
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
        if held_topk is None and not self.sft:
            held_topk = teacher_topk(self.teacher, self.held, cfg.top_k, cfg.temperature, cfg.batch_size)
        st = {"fingerprint": fp, "step": 0, "tokens": 0, "seconds": 0.0, "bad": 0, "stopped": None, "held_topk": held_topk,
              "pool": {}}
        kl0, ppl0 = self.measure(st)
        return st | {"curve": [{"step": 0, "heldout_kl": round(kl0, 6), "heldout_ppl": round(ppl0, 4)}],
                     "best": {"step": 0, "kl": kl0, "ppl": ppl0, "params": state(self.student)}, "start": {"kl": kl0, "ppl": ppl0}}

    def measure(self, st: dict) -> tuple[float, float]:
        """The held-out measure early stopping watches (the gap to the teacher; black-box: the
        responses' cross-entropy) and the held-out perplexity."""
        if self.sft:
            return heldout_responses(self.student, self.held, self.cfg)
        return heldout(self.student, self.held, st["held_topk"], self.cfg)

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

    def batch_of(self, m: int) -> Batch:
        """Micro-batch ``m`` (counted over all epochs): the source's, or on-policy the
        student's own sequences from the pool."""
        if is_on_policy(m, self.cfg.on_policy):
            return pooled(self.st["pool"], m, prompt_len(self.source.seq_len, self.cfg))
        return self.source.batch(m)

    def loss_of(self, batch: Batch) -> torch.Tensor:
        """The training loss on ``batch``: to the teacher (online, or its cached top-k) where
        the batch's mask says (on-policy: the written tokens), plus the hidden-state and
        language-modelling terms where they have a weight; black-box: the responses'
        cross-entropy."""
        cfg, dev, topk = self.cfg, self.dev, self.opts.topk
        x = batch.x.to(dev)
        mask = batch.mask.to(dev) if batch.mask is not None else None
        hidden = cfg.hidden_weight > 0 and not self.sft
        with autocast(dev, cfg.precision):
            out = self.student(input_ids=x, use_cache=False, output_hidden_states=hidden)
            if self.sft:
                return response_loss(out.logits, x, mask)
            if topk is not None:
                loss = losses.topk_forward_kl(out.logits, topk[0][batch.idx].to(dev), topk[1][batch.idx].to(dev), cfg.temperature,
                                              cfg.alpha if cfg.loss == "skew_kl" else 0.0)
            else:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
                loss = losses.logit_loss(cfg.loss, out.logits, t_out.logits, cfg.temperature, cfg.beta, cfg.alpha, mask=mask)
                if hidden:
                    loss = loss + cfg.hidden_weight * losses.hidden_mse(list(out.hidden_states[1:]), self.teacher_hidden(t_out.hidden_states))
            if cfg.lm_weight > 0 and mask is None:  # not on the student's own samples
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
        if cfg.on_policy > 0 and st["step"] % cfg.on_policy_every == 0:
            st["pool"] = refresh(self.student, self.source, cfg, st["step"], self.opts.seed)
            if self.opts.samples is not None:
                self.opts.samples(st["step"], st["pool"])
        self.opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for a in range(cfg.grad_accum):
            batch = self.batch_of(st["step"] * cfg.grad_accum + a)
            loss = self.loss_of(batch)
            if not torch.isfinite(loss):
                self._diverged(loss)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            st["tokens"] += batch.x.numel()
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
            what = "responses' cross-entropy" if self.sft else "gap"
            self.opts.log(f"distill step {st['step']}/{self.total}: loss {step_loss:.4f}, held-out {what} {kl:.4f} and perplexity "
                          f"{ppl:.3f} (best {st['best']['kl']:.4f} at step {st['best']['step']}), {tps:,.0f} tokens/s")
        if cfg.minutes is not None and st["seconds"] >= cfg.minutes * 60 and st["stopped"] is None:
            st["stopped"] = "time"
        if cfg.tokens is not None and st["tokens"] >= cfg.tokens and st["stopped"] is None:
            st["stopped"] = "tokens"
        if st["step"] % cfg.save_every == 0:
            self.checkpoint()
        if self.opts.interrupt_at is not None and st["step"] == self.opts.interrupt_at:
            raise KeyboardInterrupt

    def evaluate(self, row: dict) -> tuple[float, float]:
        """The held-out gap and perplexity, also into ``row``; keep the best weights, or count one
        more evaluation without improvement (``patience`` of them stop the run where ``restore_best``)."""
        st = self.st
        kl, ppl = self.measure(st)
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
            "heldout_measure": "response_nll" if self.sft else "kl",
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
