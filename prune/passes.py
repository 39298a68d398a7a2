"""Pass adapters of the pruning family: ``magnitude``, ``wanda``, ``sparsegpt``.

Each adapts a pure function of ``prune/`` to a Linear of a decoder block: the weight is zeroed in
place (dense, exact zeros: what every runtime loads), the mask is left in the Linear's statistics
(``stats["mask"]``) so a later quantization pass keeps the zeros, and the report records the
pattern and the target (the engine adds the sparsity the final weight really has).

A ``sparsegpt`` pass followed by a ``gptq`` pass with the same targets runs both in one joint
column loop (the SparseGPT paper's joint mode): it absorbs the gptq pass.
"""

from __future__ import annotations

from typing import Literal

import torch
from compress.prune.magnitude import magnitude_prune
from compress.prune.owl import outlier_ratio, owl_sparsities
from compress.prune.pattern import Pattern, check_pattern, parse_pattern
from compress.prune.sparsegpt import sparsegpt_prune
from compress.prune.wanda import wanda_prune, wanda_score
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.passes import Conflict, Pass, exclusive, register
from compress.prune.metadata import sparsity_metadata


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(0.5, ge=0, lt=1)  # fraction of each targeted Linear's weights set to 0
    # "unstructured" (per output row) or "N:M" (N kept of every M consecutive inputs; 2:4 runs
    # on sparse tensor cores); N:M implies sparsity 1 - N/M
    pattern: str = "unstructured"
    # uniform: every layer gets `sparsity`; owl: blocks with more activation outliers keep more
    # weights, the mean over blocks stays `sparsity` (unstructured only)
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0, lt=0.5)  # OWL's λ: block sparsities span sparsity ± λ
    owl_m: float = Field(5.0, gt=0)  # OWL's M: an outlier is a score above M × the block's mean
    targets: list[str] = Field(default_factory=lambda: ["Linear"])  # class, name suffix, or re:regex
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        return str(parse_pattern(v))  # normalised: "unstructured" or "N:M"

    @model_validator(mode="after")
    def _consistent(self):
        p = parse_pattern(self.pattern)
        if p.structured:
            if "sparsity" in self.model_fields_set and abs(self.sparsity - p.sparsity) > 1e-9:
                raise ValueError(
                    f"pattern {p} keeps {p.n} of every {p.m} weights, sparsity {p.sparsity:g}; sparsity {self.sparsity:g} "
                    f"contradicts it: drop `sparsity` or set it to {p.sparsity:g}"
                )
            self.sparsity = p.sparsity
            if self.allocation == "owl":
                raise ValueError(f"allocation owl spreads unstructured sparsity over blocks and cannot keep pattern {p}; "
                                 "use allocation: uniform with an N:M pattern, or pattern: unstructured with owl")
        return self

    def parsed(self) -> Pattern:
        return parse_pattern(self.pattern)


class SparseGPTConfig(PruneConfig):
    block_size: int = Field(128, ge=1)  # columns per lazy-update block (and per mask choice)
    damp: float = Field(0.01, gt=0)  # λ = damp · mean(diag H); raised ×10 if H is not PD
    # visit the N:M groups of M columns by decreasing activation energy (2:4 on the demo model:
    # perplexity 25.02 with, 27.78 without; BENCHMARKS.md). Unstructured masks keep the natural
    # order (sorted, each block's per-row quota falls on the most active columns: 18.30 vs 18.11
    # at 50%). null: on for N:M. A joint gptq pass brings its own act_order
    act_order: bool | None = None
    # with a gptq pass right after on the same targets: prune and quantize in one column loop
    # (the paper's joint mode); false: prune first, then gptq quantizes keeping the mask
    joint: bool = True


class _PrunePass(Pass):
    effects = frozenset({"prune"})

    def __init__(self, config, ctx=None):
        super().__init__(config, ctx)
        self.pattern = config.parsed()
        self._block_sparsity: dict[str, float] = {}  # OWL: block prefix -> sparsity
        self._ratios: dict[str, float] = {}

    @property
    def preview_stats(self):  # type: ignore[override]
        return ("sqnorm",) if self.config.allocation == "owl" else ()

    def check(self, full_name, module):
        return check_pattern(module.in_features, self.pattern)

    def conflicts(self, planned):
        c = exclusive(self, planned, "quantize", "quantization") or exclusive(self, planned, "prune", "pruning")
        if c is None and any("quantize" in q.effects for q in planned[: planned.index(self)]):
            c = Conflict("a pruning pass comes after a quantization pass on the same layers",
                         ": quantized weights cannot be pruned; put the pruning pass first in `passes` (prune, then quantize: "
                         "a sparsegpt pass followed by gptq runs both in one joint solve)", per_layer=False)
        return c

    def export_metadata(self, layers, export):
        meta = sparsity_metadata(layers)
        return {"sparsity": meta} if meta else {}

    def fix(self, in_features):
        ok = [f"{n}:{m}" for n, m in ((2, 4), (4, 8), (1, 4), (8, 16)) if all(k % m == 0 for k in in_features)]
        return f"use a pattern whose M divides them ({', '.join(ok) or 'unstructured'}), or list those layers under `ignore`"

    # ---- OWL: a preview sweep gives every block its outlier ratio, then its sparsity
    def preview_block(self, prefix, stats, weights, probe=None):
        scores = [wanda_score(weights[n], stats[n]["sqnorm"]["sq"]) for n in weights]
        self._ratios[prefix] = outlier_ratio(scores, self.config.owl_m)

    def preview_done(self):
        prefixes = list(self._ratios)
        sp = owl_sparsities([self._ratios[p] for p in prefixes], self.config.sparsity, self.config.owl_lambda)
        self._block_sparsity = dict(zip(prefixes, sp))

    def sparsity_for(self, full_name: str) -> float:
        for prefix, s in self._block_sparsity.items():
            if full_name.startswith(prefix):
                return s
        return self.config.sparsity

    def apply(self, full_name, module, stats):
        s = self.sparsity_for(full_name)
        new, W, mask, info = self.prune(full_name, module, stats, s)
        if new is module:
            module.weight.data.copy_(W.to(module.weight.dtype))
        stats["mask"] = mask
        info = {"pattern": str(self.pattern), "target_sparsity": round(s, 6), **info}
        if self.config.allocation == "owl":
            info["owl_outlier_ratio"] = round(next(r for p, r in self._ratios.items() if full_name.startswith(p)), 6)
        return new, info

    def prune(self, full_name, module, stats, sparsity) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
        """(module to put in place, its pruned weight, the mask, report info)."""
        raise NotImplementedError


@register
class MagnitudePass(_PrunePass):
    """Drop the smallest |w| per output row (or N of every M); no calibration statistics."""

    name = "magnitude"
    Config = PruneConfig

    def prune(self, full_name, module, stats, sparsity):
        W, mask = magnitude_prune(module.weight.detach(), sparsity, self.pattern)
        return module, W, mask, {}


@register
class WandaPass(_PrunePass):
    """Drop the smallest |w|·‖x_j‖₂ per output row (or N of every M)."""

    name = "wanda"
    Config = PruneConfig
    stats = ("sqnorm",)

    def prune(self, full_name, module, stats, sparsity):
        W, mask = wanda_prune(module.weight.detach(), stats["sqnorm"]["sq"], sparsity, self.pattern)
        return module, W, mask, {}


@register
class SparseGPTPass(_PrunePass):
    """SparseGPT's masked OBS reconstruction; joint with a following gptq pass on the same targets."""

    name = "sparsegpt"
    Config = SparseGPTConfig
    stats = ("hessian",)
    joint = None  # the gptq pass this one absorbs (set by ``link``)

    def link(self, later):
        nxt = next((q for q in later if "quantize" in q.effects), None)
        c = self.config
        if c.joint and nxt is not None and nxt.name == "gptq" and (nxt.config.targets, nxt.config.ignore) == (c.targets, c.ignore):
            self.joint = nxt
            nxt.absorbed = True

    @property
    def effects(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"prune", "quantize"} if self.joint is not None else {"prune"})

    def prune(self, full_name, module, stats, sparsity):
        c, q = self.config, self.joint
        res = sparsegpt_prune(
            module.weight.detach().float(), stats["hessian"]["H"], sparsity, self.pattern,
            blocksize=q.config.block_size if q else c.block_size,
            damp=q.config.damp if q else c.damp,
            act_order=q.config.act_order if q else (self.pattern.structured if c.act_order is None else c.act_order),
            scheme=q.config.scheme(self.ctx.dtype, module.in_features) if q else None,
            static_groups=q.config.static_groups if q else True,
            name=full_name,
        )
        info = {"damp": res.info["damp"]}
        if q is None:
            return module, res.weight, res.mask, info
        return q._module(module, res.quant), res.weight, res.mask, {**info, "joint": "sparsegpt+gptq", "group_size": res.quant.scheme.group_size}
