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
    error_curve,
    probe_ranks,
    probed_errors,
    sensitivity_ranks,
    uniform_rank,
)
from compress.lowrank.losparse import losparse
from compress.lowrank.module import LoSparseLinear, LowRankLinear, lowrank_metadata
from compress.lowrank.svd import breakeven_rank, decompose
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.engine.observe import typical_energy
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
    # block/residual: the ranks per layer at which the share of its error reaching the block
    # output is measured (its uniform rank, half of it, halfway to break-even), interpolated as a
    # power law of the layer's error between them; 1: at the uniform rank only (a linearization)
    probes: int = Field(3, ge=1, le=3)
    # block: the residual stream's size the error is relative to. typical: the median token's
    # ‖y_t‖² × the tokens (massive-activation tokens left out: in SmolLM2 the first token holds 98%
    # of ‖y‖² from block 11 on, 60× the rest, which made errors there look 60× cheaper); total: ‖y‖²
    block_energy: Literal["typical", "total"] = "typical"
    # LoSparse (W ≈ B·A + S): share of each factored layer's dense parameters kept as nonzeros of a
    # sparse residual S, counted in the budget (the factors get the rest); 0: low-rank alone
    sparse: float = Field(0.0, ge=0, lt=1)
    # S's structure: unstructured (SparseGPT on the residual) or column (whole input columns, the paper's)
    sparse_pattern: Literal["unstructured", "column"] = "unstructured"
    # alternations of (low-rank fit of W − S, sparse fit of W − BA); each costs an SVD and a SparseGPT solve
    sparse_iters: int = Field(2, ge=1)
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

    @model_validator(mode="after")
    def _sparse(self):
        if self.sparse > 0 and self.method != "whitened":
            raise ValueError(f"sparse needs method: whitened (the residual is fitted on XᵀX), not {self.method}")
        if self.sparse > 0 and self.objective != "propagated":
            raise ValueError("sparse works with objective: propagated only")
        if self.rank is None and self.sparse >= 1 - self.reduction:
            raise ValueError(f"sparse {self.sparse:g} leaves nothing for the factors at reduction {self.reduction:g}; "
                             f"keep sparse below 1 - reduction = {1 - self.reduction:g}")
        return self


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
        self._probed: dict[str, dict] = {}  # full name -> the ranks probed and the shares measured (for the report)

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
        L = self._shape(full_name, module.in_features, module.out_features)
        if self.config.rank is None and self.config.allocation == "uniform" and self.multiple * L.unit + L.extra > (1 - self.config.reduction) * L.dense:
            return f"reduction {self.config.reduction:g} leaves less than one rank-{self.multiple} factorization at"
        return None

    def conflicts(self, planned):
        """Only a quantization pass whose statistics derive for each factor (XᵀX: H_B = Â·H·Âᵀ) may
        follow it on a layer, quantizing the factors; nothing may come before it."""
        f = planned.index(self)
        bad = [p for p in planned if "smooth" in p.effects or "prune" in p.effects or "factorize" in p.effects and p is not self]
        bad += [p for p in planned[:f] if "quantize" in p.effects]
        bad += [p for p in planned[f + 1 :] if "quantize" not in p.effects or not set(p.stats) <= {"hessian"} or self.config.sparse > 0]
        if not bad:
            return None
        if self.config.sparse > 0:
            return Conflict(f"{self.name} with sparse > 0 (LoSparse) cannot be combined with {', '.join(sorted({p.name for p in bad}))} "
                            "on the same layer: its sparse residual is not quantized; use sparse: 0 to quantize the factors")
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

    def _shape(self, name: str, in_features: int, out_features: int) -> LayerShape:
        """The layer's shape for the allocation; ``extra``: its sparse residual's nonzeros."""
        return LayerShape(name, in_features, out_features, extra=round(self.config.sparse * in_features * out_features))

    # ---- sensitivity: a preview sweep measures every layer's error at every rank
    def preview_block(self, prefix, stats, weights, probe=None):
        c = self.config
        for n, W in weights.items():
            st = stats[n]
            d = decompose(W, c.method, st["hessian"]["H"], st.get("absmean", {}).get("sum"), c.damp, c.alpha, name=prefix + n)
            shape = self._shape(prefix + n, W.shape[1], W.shape[0])
            shape.gains, shape.total = d.gains.float(), d.total
            if c.sensitivity in ("block", "residual") and probe is not None:
                # the share of this layer's output error that reaches the block output, measured at
                # a few ranks: its error curve in units of residual-stream error (comparable everywhere)
                probes = []
                for r in probe_ranks(shape, c.reduction, self.multiple, c.probes):
                    B, A = d.factors(r)
                    block_err, layer_err = probe(n, B @ A)
                    probes.append((r, block_err / max(layer_err, 1e-30)))
                scale = (typical_energy(probe) if c.block_energy == "typical" else probe.energy) if c.sensitivity == "block" else 1.0
                shape.errors = probed_errors(error_curve(shape) * d.total, probes, scale).float()
                self._probed[prefix + n] = {"probe_ranks": [r for r, _ in probes], "probe_shares": [round(x, 6) for _, x in probes]}
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
        return uniform_rank(self._shape(full_name, module.in_features, module.out_features), c.reduction, self.multiple)

    def apply(self, full_name, module, stats):
        c = self.config
        lo, dense = min(module.in_features, module.out_features), module.in_features * module.out_features
        rank = self.rank_for(full_name, module)
        info = {"method": c.method, "max_rank": lo, "breakeven_rank": round(breakeven_rank(module.in_features, module.out_features), 1),
                "params_dense": dense, **self._probed.pop(full_name, {})}
        if rank is None:
            return module, {**info, "rank": None, "params_kept": dense}
        dt = self.ctx.dtype  # the factors as the export stores them
        if c.sparse > 0:
            nonzeros = self._shape(full_name, module.in_features, module.out_features).extra
            B, A, S, sinfo = losparse(module.weight.detach(), stats["hessian"]["H"], rank, nonzeros, c.sparse_pattern, c.damp,
                                  c.sparse_iters, name=full_name)
            S = S.to(dt).float()  # (bf16 rounding keeps zeros zero)
            new = LoSparseLinear.from_parts(B.to(dt).float(), A.to(dt).float(), S, module.bias)
            return new, {**info, "rank": rank, "sparse_nonzeros": new.nonzeros, "sparse_pattern": c.sparse_pattern,
                         "lowrank_error": sinfo["lowrank_error"], "params_kept": new.parameters_kept}
        d = decompose(module.weight.detach(), c.method, stats.get("hessian", {}).get("H"), stats.get("absmean", {}).get("sum"),
                      c.damp, c.alpha, name=full_name, C=stats.get("xcov", {}).get("C"))
        B, A = d.factors(rank)
        new = LowRankLinear.from_factors(B.to(dt).float(), A.to(dt).float(), module.bias)
        return new, {**info, **d.info, "rank": rank, "params_kept": new.parameters_kept}
