"""The ``rotate`` pass: QuaRot's randomized Hadamard rotations fused into the weights
(``- rotate: {}`` before the quantizer; ``compress quantize MODEL --rotate``).

A model-scope pass (stage transform_model) before the layer-wise sweep: it reads the whole
checkpoint, folds the RMSNorm scales into the Linears after them, rotates the residual stream
(R1) and each attention head's values (R2) (``compress.quant.rotate``), and writes an ordinary
checkpoint computing the same function; the quantizer after it sees weights whose outliers are
spread over all columns. The rotations are fused offline, so a weight-only export is a plain
checkpoint transformers and vLLM load unchanged. A tied lm_head is untied (the final norm's scale
is folded into it): the export holds the head apart from the embedding.

``learn: {...}`` trains R1 and each layer's R2 for the quantizer after the pass instead of keeping
the random ones (SpinQuant: Cayley SGD on the orthogonal group, ``compress.quant.spinquant``), on
the calibration windows; the learned matrices are fused the same way.

``r4: true`` adds QuaRot's R4 for activation quantization (W4A8): a Hadamard R on each down_proj's
input, W_down ← W_down·R offline and x ↦ x·R at run time (``compress.quant.online``; compress.json
``rotation.r4``). That product is not foldable into a weight, so such an export is no longer an
ordinary checkpoint: only compress.load computes it, and the export says so (transformers made
to refuse, vLLM listed as refusing: ``compress.checkpoint.export.ONLINE_WHY``).
"""

from __future__ import annotations

import time

import torch
from compress.distill.loop import split_windows
from compress.quant import kv_cache, online, spinquant
from compress.quant.rotate import (
    UnsupportedFamily,
    check_family,
    fold_norms,
    initial_rotations,
    rotate_state,
)
from pydantic import BaseModel, ConfigDict, Field

from compress.api.common import storage_dtype
from compress.checkpoint.files import RETRY, write_model
from compress.checkpoint.source import read_metadata
from compress.errors import UsageError
from compress.passes import Pass, register
from compress.utils import peak_rss_mb

ROTATION = "rotation"  # the compress.json / report section


class LearnConfig(BaseModel):
    """SpinQuant: R1 and each layer's R2 trained for the quantizer after the pass
    (``compress.quant.spinquant``), from the seed's randomized Hadamard matrices."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1)  # Cayley SGD steps, each on batch_size calibration windows
    lr: float = Field(1.5, gt=0)  # SpinQuant's rate; a step also turns at most about a radian
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(2, ge=1)
    seq_len: int | None = Field(256, ge=16)  # the windows' first tokens trained on (None: whole windows)
    holdout: float = Field(0.0625, gt=0, lt=1)  # share of the windows that scores the rotations (best kept)
    topk: int = Field(64, ge=1)  # the original model's next-token distribution kept per position
    eval_every: int = Field(25, ge=1)


class RotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0  # the random signs and orthogonal factors
    r1: bool = True  # the residual stream (hidden size)
    r2: bool = True  # each attention head's values and o_proj columns (head dim)
    # R4: a Hadamard on each down_proj's input, computed online (compress.quant.online), for
    # activation quantization (W4A8); only compress.load runs such an export
    r4: bool = False
    # R3: a Hadamard on each head's queries and keys after RoPE, online (compress.quant.kv_cache),
    # for a quantized KV cache (kv_cache on the quantizer); no weight changes
    r3: bool = False
    # SpinQuant's learned R1/R2 (``learn: {}`` or ``learn: {steps: 100}``; --spinquant STEPS); None: QuaRot's
    learn: LearnConfig | None = None


@register
class RotatePass(Pass):
    name = "rotate"
    Config = RotateConfig
    effects = frozenset({"rotate"})

    def in_stage(self, stage: str) -> bool:
        return stage == "transform_model"

    def needs_calibration(self) -> bool:
        return self.config.learn is not None

    def validate(self, k, job):
        where = f"passes.{k}.{self.name}"
        before = [p.name for p in job.passes[:k] if p.name != "prune_structured"]
        if before:
            raise UsageError(f"{where}: rotations change the weights the layer-wise passes compress; put it before them (after "
                             f"structured pruning at most), not after {before[-1]}")
        try:
            check_family(job.model_config)
        except UnsupportedFamily as e:
            raise UsageError(f"{where}: {e}") from None
        if not (self.config.r1 or self.config.r2 or self.config.r3 or self.config.r4):
            raise UsageError(f"{where}: r1, r2, r3 and r4 all false: nothing to rotate")
        if self.config.r3 and not any(getattr(p.config, "kv_cache", None) is not None for p in job.passes[k + 1:]):
            raise UsageError(f"{where}: r3 rotates queries and keys for a quantized KV cache; set kv_cache: {{bits: 8|4}} on the "
                             "quantizer after it (--kv-cache), or drop r3")
        if self.config.r4:
            self._check_online(where, k, job)
        if self.config.learn is not None:
            self.target = self._check_learn(where, k, job)

    def transform_model(self, stage) -> dict:
        from transformers import AutoConfig, AutoModelForCausalLM

        t0, log = time.time(), getattr(stage.hooks, "log", lambda m: None)
        stored = AutoConfig.from_pretrained(stage.checkpoint)
        dtype = storage_dtype(stored)
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint, dtype=torch.float32)
        folded = fold_norms({k: v.detach() for k, v in model.state_dict().items()}, model.config)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        config = stored.__class__.from_dict({**stored.to_dict(), "tie_word_embeddings": False})
        del model
        learned = self._learn(folded, config, stage, log) if self.config.learn is not None else None
        state = rotate_state(folded, config, self.config.seed, self.config.r1, self.config.r2, folded=True,
                             matrices=learned[:2] if learned else None)
        r4 = self._online(state, config)
        rotated = _model_from(config, state, dtype)
        section = {"kind": "spinquant" if learned else "randomized_hadamard", "seed": self.config.seed, "r1": self.config.r1,
                   "r2": self.config.r2, **({"learned": learned[2]} if learned else {}), **({"r4": r4} if r4 else {}),
                   **({"r3": kv_cache.r3_section(config, self.config.seed)} if self.config.r3 else {}),
                   "untied_lm_head": tied, "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb()}
        log("rotation: norms folded, " + ", ".join(n for n, on in (("R1 on the residual stream", self.config.r1),
                                                                   ("R2 per attention head", self.config.r2),
                                                                   ("both learned (SpinQuant)", learned),
                                                                   ("R3 online on queries and keys", self.config.r3),
                                                                   ("R4 online on down_proj's input", r4)) if on)
            + (" (lm_head untied from the embedding)" if tied else ""))
        meta = {**read_metadata(stage.checkpoint), "format": "compress.checkpoint/1", ROTATION: section}
        write_model(stage.checkpoint, rotated, stage.output, meta, stage.overwrite, f"{RETRY} (the rotation is recomputed)")
        return {ROTATION: section}

    def _check_learn(self, where: str, k: int, job) -> spinquant.Target:
        """SpinQuant's preconditions; the quantization it trains for (the first quantizer after it)."""
        if not (self.config.r1 and self.config.r2):
            raise UsageError(f"{where}.learn: SpinQuant learns R1 and R2 together; keep r1 and r2 true, or drop learn")
        if job.calibration is None:
            raise UsageError(f"{where}.learn: the rotations train on the calibration windows; set calibration.samples > 0")
        split_windows(job.calibration, self.config.learn.holdout, f"{where}.learn.holdout")
        quant = next((p for p in job.passes[k + 1:] if "quantize" in p.effects), None)
        if quant is None or not hasattr(quant.config, "bits"):
            raise UsageError(f"{where}.learn: the rotations are trained for the quantizer after them; add one (gptq, rtn, awq), "
                             "or drop learn")
        c = quant.config
        acts = getattr(c, "activations", None)
        return spinquant.Target(bits=int(c.bits), group_size=getattr(c, "group_size", -1), symmetric=getattr(c, "symmetric", True),
                                act_bits=None if acts is None else acts.bits)

    def _learn(self, folded: dict, config, stage, log) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """SpinQuant on the norm-folded float model (the teacher: its function is the original's)."""
        lc = self.config.learn
        state = {k: v.float() for k, v in folded.items()}
        r4 = self._online(state, config)  # training sees R4 where the export will have it
        model = _model_from(config, state, torch.float32)  # casts R4-rotated float64 weights too
        online.install(model, r4)
        windows = stage.calibration if lc.seq_len is None else stage.calibration[:, : lc.seq_len]
        train, held = split_windows(windows, lc.holdout, "rotate.learn.holdout")
        r1, r2 = initial_rotations(config, self.config.seed)
        r2 = r2.expand(config.num_hidden_layers, *r2.shape).clone()
        target = getattr(self, "target", None) or spinquant.Target()
        log(f"rotate.learn: SpinQuant, {lc.steps} Cayley SGD steps on {len(train)} windows of {train.shape[1]} tokens, "
            f"for W{target.bits}" + (f"A{target.act_bits}" if target.act_bits else "") + f" g{target.group_size}")
        opts = spinquant.LearnOptions(steps=lc.steps, lr=lc.lr, momentum=lc.momentum, batch_size=lc.batch_size, topk=lc.topk,
                                      eval_every=lc.eval_every, seed=self.config.seed)
        return spinquant.learn_rotations(spinquant.Problem.of(model, target), train, held, r1, r2, opts, log)

    def _check_online(self, where: str, k: int, job) -> None:
        if not any("quantize" in p.effects for p in job.passes[k + 1:]):
            raise UsageError(f"{where}: r4 (an online rotation only compress.load computes) needs a quantizer after it "
                             "(gptq, rtn, awq): its export is then marked for compress.load alone; drop r4 otherwise")
        target = getattr(job.export, "target", None)
        if getattr(job.export, "format", None) == "gguf" or target not in (None, "compress"):
            runtime = "llama.cpp (GGUF)" if target is None else target
            raise UsageError(f"{where}: r4 is an online rotation only compress.load computes, not {runtime}; drop r4 (--r4), "
                             "or export for compress (--target compress)")

    def _online(self, state: dict, config) -> dict | None:
        """R4: every down_proj weight W <- W·R in ``state`` (float64); compress.json's ``r4``."""
        if not self.config.r4:
            return None
        n, seed = config.intermediate_size, self.config.seed
        s, factors = online.signs(n, seed), online.hadamard_factors(n, seed)
        for k in [k for k in state if k.endswith(f".{online.DOWN}.weight")]:
            state[k] = online.apply_factored(state[k].double(), s, factors)
        return online.section(n, seed)


def _model_from(config, state: dict, dtype: torch.dtype):
    """A model of ``config`` holding ``state`` (cast to ``dtype``), no random init on the way."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model
