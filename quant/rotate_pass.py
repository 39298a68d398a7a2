"""The ``rotate`` pass: QuaRot's randomized Hadamard rotations fused into the weights
(``- rotate: {}`` before the quantizer; ``compress quantize MODEL --rotate``).

A model-scope pass (stage transform_model) before the layer-wise sweep: it reads the whole
checkpoint, folds the RMSNorm scales into the Linears after them, rotates the residual stream
(R1) and each attention head's values (R2) (``compress.quant.rotate``), and writes an ordinary
checkpoint computing the same function; the quantizer after it sees weights whose outliers are
spread over all columns. The rotations are fused offline, so a weight-only export is a plain
checkpoint transformers and vLLM load unchanged. A tied lm_head is untied (the final norm's scale
is folded into it): the export holds the head apart from the embedding.

``r4: true`` adds QuaRot's R4 for activation quantization (W4A8): a Hadamard R on each down_proj's
input, W_down ← W_down·R offline and x ↦ x·R at run time (``compress.quant.online``; compress.json
``rotation.r4``). That product is not foldable into a weight, so such an export is no longer an
ordinary checkpoint: only compress.load computes it, and the export says so (transformers made
to refuse, vLLM listed as refusing: ``compress.checkpoint.export.ONLINE_WHY``).
"""

from __future__ import annotations

import time

import torch
from compress.quant import kv_cache, online
from compress.quant.rotate import UnsupportedFamily, check_family, rotate_state
from pydantic import BaseModel, ConfigDict

from compress.api.common import storage_dtype
from compress.checkpoint.files import RETRY, write_model
from compress.checkpoint.source import read_metadata
from compress.errors import UsageError
from compress.passes import Pass, register
from compress.utils import peak_rss_mb

ROTATION = "rotation"  # the compress.json / report section


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
        if not (self.config.r1 or self.config.r2 or self.config.r3 or self.config.r4):
            raise UsageError(f"{where}: r1, r2, r3 and r4 all false: nothing to rotate")
        if self.config.r3 and not any(getattr(p.config, "kv_cache", None) is not None for p in job.passes[k + 1:]):
            raise UsageError(f"{where}: r3 rotates queries and keys for a quantized KV cache; set kv_cache: {{bits: 8|4}} on the "
                             "quantizer after it (--kv-cache), or drop r3")
        if self.config.r4:
            self._check_online(where, k, job)

    def transform_model(self, stage) -> dict:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        t0, log = time.time(), getattr(stage.hooks, "log", lambda m: None)
        stored = AutoConfig.from_pretrained(stage.checkpoint)
        dtype = storage_dtype(stored)
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint, dtype=torch.float32)
        state = rotate_state({k: v.detach() for k, v in model.state_dict().items()}, model.config, self.config.seed,
                             self.config.r1, self.config.r2)
        r4 = self._online(state, model.config)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        del model
        config = stored.__class__.from_dict({**stored.to_dict(), "tie_word_embeddings": False})
        with init_empty_weights(include_buffers=False):  # no random init of weights about to be replaced
            rotated = AutoModelForCausalLM.from_config(config, dtype=dtype)
        rotated.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
        section = {"kind": "randomized_hadamard", "seed": self.config.seed, "r1": self.config.r1, "r2": self.config.r2,
                   **({"r4": r4} if r4 else {}),
                   **({"r3": kv_cache.r3_section(config, self.config.seed)} if self.config.r3 else {}),
                   "untied_lm_head": tied, "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb()}
        log("rotation: norms folded, " + ", ".join(n for n, on in (("R1 on the residual stream", self.config.r1),
                                                                   ("R2 per attention head", self.config.r2),
                                                                   ("R3 online on queries and keys", self.config.r3),
                                                                   ("R4 online on down_proj's input", r4)) if on)
            + (" (lm_head untied from the embedding)" if tied else ""))
        meta = {**read_metadata(stage.checkpoint), "format": "compress.checkpoint/1", ROTATION: section}
        write_model(stage.checkpoint, rotated, stage.output, meta, stage.overwrite, f"{RETRY} (the rotation is recomputed)")
        return {ROTATION: section}

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
