"""The options of the ``distill`` pass (the recipe's ``- distill: {...}``, and ``compress distill``)."""

from __future__ import annotations

from typing import Literal

from compress.distill.losses import LOSSES
from compress.distill.trainable import TRAIN_MODES
from pydantic import BaseModel, ConfigDict, Field, model_validator

Loss = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
assert set(Loss.__args__) == set(LOSSES)
Train = Literal["auto", "scales", "weights", "qat"]
assert set(Train.__args__) == set(TRAIN_MODES)


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # model: the whole student against the whole teacher on logits, after the sweep; block:
    # inside the sweep, each block right after its compressing passes against the original
    # block's outputs on the cached calibration inputs (memory flat in model size)
    scope: Literal["model", "block"] = "model"
    loss: Loss = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, gt=0, lt=1)  # jsd's mixture weight of the teacher
    alpha: float = Field(0.1, ge=0, lt=1)  # skew_kl's share of the teacher in the mixture
    hidden_weight: float = Field(0.0, ge=0)  # + this × per-block hidden-state MSE (scope model)
    lm_weight: float = Field(0.0, ge=0)  # + this × the language-modelling loss on the calibration text
    train: Train = "auto"  # what trains: by layer (auto), scales, weights (+ masks), qat
    # optimizer steps (scope model: in all; scope block: per block); null: `epochs` passes over
    # the training windows (model) or the calibration batches (block)
    steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    minutes: float | None = Field(None, gt=0)  # stop after this much training time (model scope)
    lr: float = Field(1e-4, gt=0)  # weights, factors, norms and biases (AdamW)
    scale_lr: float = Field(2e-3, gt=0)  # quantization scales, in log space: ≈ relative change per step
    warmup: float = Field(0.1, ge=0, lt=1)  # share of the steps with a linear warmup, then cosine
    min_lr: float = Field(0.1, ge=0, le=1)  # the cosine ends at this share of the learning rates
    batch_size: int = Field(1, ge=1)  # windows per forward (model scope)
    grad_accum: int = Field(4, ge=1)  # forwards per optimizer step
    max_grad_norm: float | None = Field(1.0, gt=0)
    grad_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% slower
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU that has it, else fp32
    holdout: float = Field(0.1, gt=0, lt=1)  # share of the calibration windows held out for early stopping
    eval_every: int = Field(8, ge=1)  # steps between held-out evaluations
    patience: int = Field(3, ge=1)  # evaluations without improvement before stopping early
    restore_best: bool = True  # end with the weights best on the held-out slice (false: the last ones)
    teacher: Literal["online", "topk"] = "online"  # topk: the teacher's top-k cached once (to disk), then freed
    top_k: int = Field(64, ge=1)
    save_every: int = Field(16, ge=1)  # steps between resumable checkpoints
    # stop once this many tokens went through the student (with steps: whichever comes first;
    # alone: the steps it takes, over as many epochs as needed)
    tokens: int | None = Field(None, ge=1)
    # train on windows of this .txt/.jsonl corpus, read as training goes (never all in memory;
    # compress.distill.stream) instead of the calibration windows; its first heldout_windows
    # windows are held out for early stopping. Needs steps or tokens (or epochs: passes over it)
    data: str | None = None
    heldout_windows: int = Field(16, ge=1)
    # on-policy distillation (GKD): this share of the micro-batches trains on sequences the
    # student writes itself, from prompts cut from the training windows (their first
    # seq_len - on_policy_tokens tokens), refreshed every on_policy_every steps, the loss on the
    # written tokens only; 0: off-policy (the windows as they are)
    on_policy: float = Field(0.0, ge=0, le=1)
    on_policy_tokens: int = Field(128, ge=1)
    on_policy_every: int = Field(8, ge=1)
    on_policy_temperature: float = Field(1.0, ge=0)  # the student's sampling temperature (0: greedy)

    @model_validator(mode="after")
    def _consistent(self):
        if self.teacher == "topk":
            if self.loss not in ("forward_kl", "skew_kl"):
                raise ValueError(f"loss {self.loss!r} needs the student's whole distribution against the teacher's; "
                                 "teacher: topk supports forward_kl and skew_kl (use teacher: online)")
            if self.hidden_weight > 0:
                raise ValueError("hidden_weight needs the teacher's hidden states: use teacher: online")
        if self.on_policy > 0 and self.teacher != "online":
            raise ValueError("on_policy: the teacher scores the student's own samples as they are written; use teacher: online")
        if self.data and self.teacher != "online":
            raise ValueError("data: a streamed corpus is read as training goes, so the teacher's top-k cannot be cached "
                             "beforehand; use teacher: online")
        if self.scope == "block" and (self.hidden_weight > 0 or self.lm_weight > 0 or self.teacher != "online" or self.minutes
                                      or self.on_policy > 0 or self.data or self.tokens):
            raise ValueError("scope: block trains each block on its output MSE; hidden_weight, lm_weight, teacher, minutes, tokens, "
                             "data and on_policy apply to scope: model")
        return self
