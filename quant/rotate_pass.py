"""The ``rotate`` pass: QuaRot's randomized Hadamard rotations fused into the weights
(``- rotate: {}`` before the quantizer; ``compress quantize MODEL --rotate``).

A model-scope pass (stage transform_model) before the layer-wise sweep: it reads the whole
checkpoint, folds the RMSNorm scales into the Linears after them, rotates the residual stream
(R1) and each attention head's values (R2) (``compress.quant.rotate``), and writes an ordinary
checkpoint computing the same function; the quantizer after it sees weights whose outliers are
spread over all columns. The rotations are fused offline, so a weight-only export is a plain
checkpoint transformers and vLLM load unchanged. A tied lm_head is untied (the final norm's scale
is folded into it): the export holds the head apart from the embedding.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict

from compress.api.common import storage_dtype
from compress.checkpoint.files import RETRY, write_model
from compress.checkpoint.source import read_metadata
from compress.errors import UsageError
from compress.passes import Pass, register
from compress.quant.rotate import UnsupportedFamily, check_family, rotate_state
from compress.utils import peak_rss_mb

ROTATION = "rotation"  # the compress.json / report section


class RotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0  # the random signs and orthogonal factors
    r1: bool = True  # the residual stream (hidden size)
    r2: bool = True  # each attention head's values and o_proj columns (head dim)


@register
class RotatePass(Pass):
    name = "rotate"
    Config = RotateConfig
    effects = frozenset({"rotate"})

    def in_stage(self, stage: str) -> bool:
        return stage == "transform_model"

    def needs_calibration(self) -> bool:
        return False

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
        if not (self.config.r1 or self.config.r2):
            raise UsageError(f"{where}: r1 and r2 both false: nothing to rotate")

    def transform_model(self, stage) -> dict:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        t0, log = time.time(), getattr(stage.hooks, "log", lambda m: None)
        stored = AutoConfig.from_pretrained(stage.checkpoint)
        dtype = storage_dtype(stored)
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint, dtype=torch.float32)
        state = rotate_state({k: v.detach() for k, v in model.state_dict().items()}, model.config, self.config.seed,
                             self.config.r1, self.config.r2)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        del model
        config = stored.__class__.from_dict({**stored.to_dict(), "tie_word_embeddings": False})
        with init_empty_weights(include_buffers=False):  # no random init of weights about to be replaced
            rotated = AutoModelForCausalLM.from_config(config, dtype=dtype)
        rotated.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
        section = {"kind": "randomized_hadamard", "seed": self.config.seed, "r1": self.config.r1, "r2": self.config.r2,
                   "untied_lm_head": tied, "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb()}
        log("rotation: norms folded, " + " and ".join(n for n, on in (("R1 on the residual stream", self.config.r1),
                                                                      ("R2 per attention head", self.config.r2)) if on)
            + (" (lm_head untied from the embedding)" if tied else ""))
        meta = {**read_metadata(stage.checkpoint), "format": "compress.checkpoint/1", ROTATION: section}
        write_model(stage.checkpoint, rotated, stage.output, meta, stage.overwrite, f"{RETRY} (the rotation is recomputed)")
        return {ROTATION: section}
