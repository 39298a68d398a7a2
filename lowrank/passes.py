"""Pass adapter of the low-rank family: ``lowrank`` replaces each targeted Linear by B·A.

The rank of each layer comes from one of three places:

* ``rank: N``: the same rank everywhere;
* ``allocation: uniform``: every layer keeps ``1 − reduction`` of its parameters;
* ``allocation: sensitivity`` (default): a preview sweep over the uncompressed model measures every
  layer's output error at every rank (the components' gains of ``lowrank.svd``), and
  ``lowrank.allocate`` water-fills the budget; a layer where no rank below the break-even point
  is worth its parameters stays dense.

The factors are then computed in the real sweep on the statistics of the already compressed
model (the engine propagates the compressed blocks' outputs unless ``calibration.propagate`` is
false), rounded to the checkpoint's storage dtype so the export computes what was measured. A
quantization pass later in the recipe (``rtn``, ``gptq``) quantizes both factors; the ranks are
then multiples of its group size.
"""

from __future__ import annotations

import math
from typing import Literal

from compress.lowrank.allocate import (
    BudgetError,
    LayerShape,
    sensitivity_ranks,
    share_rank,
    uniform_rank,
)
from compress.lowrank.module import LowRankLinear, lowrank_metadata
from compress.lowrank.svd import breakeven_rank, decompose
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.errors import UsageError
from compress.passes import Conflict, Pass, register


class LowRankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # whitened: SVD of W·chol(XᵀX) (SVD-LLM); asvd: W·diag(mean|x|^alpha); svd: plain SVD of W
    method: Literal["whitened", "asvd", "svd"] = "whitened"
    # fraction of the targeted Linears' parameters removed overall (e.g. 0.2 or 20%)
    reduction: float = 0.2
    # sensitivity: spend the budget where each parameter buys the most output accuracy (measured
    # on the uncompressed model in a preview sweep); uniform: every layer keeps 1 - reduction
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"
    # sensitivity's unit of error: block (each layer's output error weighted by how much of it
    # reaches the block's output, measured once per layer on one batch, relative to the residual
    # stream's size there), residual (the same, absolute), or layer (each layer's relative error)
    sensitivity: Literal["block", "residual", "layer"] = "block"
    rank: int | None = Field(None, ge=1)  # one rank for every targeted Linear (instead of reduction)
    rank_multiple: int = Field(8, ge=1)  # ranks are multiples of this (and of a later quantizer's group)
    damp: float = Field(0.01, gt=0)  # whitened: XᵀX + λI, λ = damp · mean(diag XᵀX), raised if needed
    alpha: float = Field(0.5, gt=0)  # asvd: channel scale mean|x| ** alpha
    # whitened: fit the uncompressed model's outputs (original: ‖XWᵀ − X̂(BA)ᵀ‖, the original block
    # runs alongside the compressed one, compensating earlier layers' errors) or the layer's own
    # outputs on what the compressed model feeds it (propagated: ‖X̂(W − BA)ᵀ‖)
    # (original: 27.84 vs 27.33 at 20% on the demo model, at twice the calibration time; BENCHMARKS.md)
    objective: Literal["original", "propagated"] = "propagated"
    targets: list[str] = Field(default_factory=lambda: ["Linear"])  # class, name suffix, or re:regex
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("reduction", mode="before")
    @classmethod
    def _reduction(cls, v):
        if isinstance(v, str) and v.strip().endswith("%"):
            v = float(v.strip()[:-1]) / 100
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} is not a fraction; give the share of parameters to remove, e.g. 0.2 or 20%") from None
        if not 0 < v < 1:
            raise ValueError(f"{v:g} is outside (0, 1); give the share of the targeted parameters to remove, e.g. 0.2 (20%)")
        return v


@register
class LowRankPass(Pass):
    """Truncated (activation-aware) SVD: W → B·A."""

    name = "lowrank"
    Config = LowRankConfig
    effects = frozenset({"factorize"})

    def __init__(self, config, ctx=None):
        super().__init__(config, ctx)
        self.multiple = config.rank_multiple
        self._layers: list[LayerShape] = []  # preview: each targeted layer's shape and gains
        self.ranks: dict[str, int | None] = {}  # sensitivity allocation: full name -> rank (None: dense)

    @property
    def stats(self):  # type: ignore[override]
        if self.config.method == "whitened":
            return ("hessian", "xcov") if self.config.objective == "original" else ("hessian",)
        return {"asvd": ("absmean",), "svd": ()}[self.config.method]

    @property
    def preview_stats(self):  # type: ignore[override]
        if self.config.rank is not None or self.config.allocation != "sensitivity":
            return ()
        return ("hessian", "absmean") if self.config.method == "asvd" else ("hessian",)

    def link(self, later):
        g = next((getattr(q.config, "group_size", -1) for q in later if "quantize" in q.effects), -1)
        if isinstance(g, int) and g > 0:  # auto: each factor gets a size that divides it
            self.multiple = math.lcm(self.multiple, g)
            if self.config.rank is not None and self.config.rank % g:
                raise UsageError(f"lowrank.rank {self.config.rank}: the factors are quantized with group_size {g} after it, "
                                 f"which must divide the rank; use a multiple of {g}")

    def check(self, full_name, module):
        lo = min(module.in_features, module.out_features)
        if self.config.rank is not None and self.config.rank > lo:
            return f"rank {self.config.rank} is larger than min(in, out) = {lo} at"
        if self.config.rank is None and self.config.allocation == "uniform" and self.multiple * (module.in_features + module.out_features) > (1 - self.config.reduction) * module.in_features * module.out_features:
            return f"reduction {self.config.reduction:g} leaves less than one rank-{self.multiple} factorization at"
        return None

    def conflicts(self, planned):
        """Only a quantization pass whose statistics derive for each factor (XᵀX: H_B = Â·H·Âᵀ) may
        follow it on a layer, quantizing the factors; nothing may come before it."""
        f = planned.index(self)
        bad = [p for p in planned if "smooth" in p.effects or "prune" in p.effects or "factorize" in p.effects and p is not self]
        bad += [p for p in planned[:f] if "quantize" in p.effects]
        bad += [p for p in planned[f + 1 :] if "quantize" not in p.effects or not set(p.stats) <= {"hessian"}]
        if not bad:
            return None
        return Conflict(f"{self.name} cannot be combined with {', '.join(sorted({p.name for p in bad}))} on the same layer: "
                        "only a quantization pass (rtn or gptq) may follow it, quantizing the factors; prune or smooth in a "
                        "separate run, or use `ignore` on one of them")

    def validate(self, k, job):
        quantized = any("quantize" in p.effects for p in job.passes)
        target = getattr(job.export, "target", None)
        if target not in (None, "compress") and job.export.lowrank == "factored":
            fix = ("quantized factors are read by compress.load only: drop the quantizer for that target, or use --target compress"
                   if quantized else "use export.lowrank: merged (`compress lowrank --merged`), dense weights every runtime loads")
            raise UsageError(f"passes.{k}.{self.name}: export.target is {target}, which cannot load factored low-rank layers "
                             f"(B·A pairs); {fix}")
        if job.export is not None and job.export.lowrank == "merged" and quantized:
            raise UsageError("export.lowrank: merged would multiply quantized factors back into dense weights; use "
                             "export.lowrank: factored (compress.load reads it), or merge a low-rank-only run and quantize that")

    def export_metadata(self, layers, export):
        meta = lowrank_metadata(layers, export.lowrank)
        return {"lowrank": meta} if meta else {}

    def fix(self, in_features):
        if self.config.rank is not None:
            return "lower `rank`, use `reduction` instead, or list those layers under `ignore`"
        return "lower `reduction` or `rank_multiple`, or list those layers under `ignore`"

    # ---- sensitivity: a preview sweep measures every layer's error at every rank
    def preview_block(self, prefix, stats, weights, probe=None):
        c = self.config
        for n, W in weights.items():
            st = stats[n]
            d = decompose(W, c.method, st["hessian"]["H"], st.get("absmean", {}).get("sum"), c.damp, c.alpha, name=prefix + n)
            shape = LayerShape(prefix + n, W.shape[1], W.shape[0], d.gains.float(), d.total)
            if c.sensitivity in ("block", "residual") and probe is not None:
                # the share of this layer's output error that reaches the block output, measured at
                # the uniform rank: the gains in units of residual-stream error (comparable everywhere)
                r = share_rank(shape, c.reduction, self.multiple)
                B, A = d.factors(r)
                block_err, layer_err = probe(n, B @ A)
                scale = block_err / max(layer_err, 1e-30) / (probe.energy if c.sensitivity == "block" else 1.0)
                shape = LayerShape(shape.name, shape.in_features, shape.out_features, shape.gains * scale, 1.0)
            self._layers.append(shape)

    def preview_done(self):
        try:
            self.ranks = sensitivity_ranks(self._layers, self.config.reduction, self.multiple)
        except BudgetError as e:
            raise UsageError(f"lowrank: {e}; lower `reduction` or `rank_multiple`") from None
        self._layers = []

    def rank_for(self, full_name: str, module) -> int | None:
        c = self.config
        if c.rank is not None:
            return c.rank
        if c.allocation == "sensitivity":
            return self.ranks[full_name]
        return uniform_rank(LayerShape(full_name, module.in_features, module.out_features), c.reduction, self.multiple)

    def apply(self, full_name, module, stats):
        c = self.config
        lo, dense = min(module.in_features, module.out_features), module.in_features * module.out_features
        rank = self.rank_for(full_name, module)
        info = {"method": c.method, "max_rank": lo, "breakeven_rank": round(breakeven_rank(module.in_features, module.out_features), 1),
                "params_dense": dense}
        if rank is None:
            return module, {**info, "rank": None, "params_kept": dense}
        d = decompose(module.weight.detach(), c.method, stats.get("hessian", {}).get("H"), stats.get("absmean", {}).get("sum"),
                      c.damp, c.alpha, name=full_name, C=stats.get("xcov", {}).get("C"))
        B, A = d.factors(rank)
        dt = self.ctx.dtype  # the factors as the export stores them
        new = LowRankLinear.from_factors(B.to(dt).float(), A.to(dt).float(), module.bias)
        return new, {**info, **d.info, "rank": rank, "params_kept": new.parameters_kept}
