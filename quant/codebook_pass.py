"""Pass adapter of non-uniform codebook quantization: ``squeezellm`` (``compress.quant.codebook``)
replaces each targeted Linear by a ``CodebookLinear`` (``compress.quant.codebook_module``).

``- squeezellm: {bits: 3}`` in a recipe: per output row a table of 2^bits entries fitted by
k-means weighted by the Hessian diagonal, then the codes by GPTQ's column solver on those tables.
Only our runtime (``compress.load``) reads the result: ``export.target`` other than ``compress``
and GGUF exports are refused before any work.
"""

from __future__ import annotations

from compress.quant.codebook import MAX_BITS, codebook_quantize
from compress.quant.codebook_module import SECTION, CodebookLinear, codebook_metadata
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.errors import UsageError
from compress.modules import TARGETS
from compress.passes import Conflict, Pass, exclusive, register

MIN_BITS = 2


class SqueezeLLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # bits per code: each row's table has 2^bits entries (codes are uint8, so at most 2^8)
    bits: int = 3
    # visit columns by decreasing H_jj, as GPTQ does (the tables are fixed, so no group follows the order)
    act_order: bool = True
    block_size: int = Field(128, ge=1)  # columns per lazy-update block of the solver
    damp: float = Field(0.01, gt=0)  # λ = damp · mean(diag H); raised ×10 if H is not PD
    iters: int = Field(30, ge=0)  # Lloyd iterations of the weighted k-means (stops early once no code changes)
    targets: list[str] = Field(default_factory=lambda: ["Linear"])  # class, name suffix, or re:regex
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not MIN_BITS <= v <= MAX_BITS:
            raise ValueError(f"{v}: a codebook of 2^bits entries with uint8 codes takes bits from {MIN_BITS} to {MAX_BITS} "
                             f"(2^{MAX_BITS} = {1 << MAX_BITS} entries at most)")
        return v


@register
class SqueezeLLMPass(Pass):
    """Non-uniform codebooks (SqueezeLLM) with GPTQ's error feedback on each targeted Linear."""

    name = "squeezellm"
    Config = SqueezeLLMConfig
    stats = ("hessian",)
    effects = frozenset({"quantize"})  # the other families' ordering rules see a quantizer

    def conflicts(self, planned):
        """One quantizer per layer; no pruning before it (a table has no exact zero, so the
        pruned weights would not stay pruned)."""
        if (c := exclusive(self, planned, "quantize", "quantization")) is not None:
            return c
        pruners = [p.name for p in planned[: planned.index(self)] if "prune" in p.effects]
        if pruners:
            return Conflict(f"{self.name} cannot follow {', '.join(pruners)} on a layer: a codebook has no exact zero, so the "
                            "pruned weights would not stay zero; prune and quantize with sparsegpt or gptq, or use `ignore` on one")
        return None

    def validate(self, k, job):
        where = f"passes.{k}.{self.name}"
        if getattr(job.export, "format", None) == "gguf":
            raise UsageError(f"{where}: a GGUF export stores llama.cpp's uniform grids, which have no per-row codebook; export "
                             "compressed-tensors (drop --gguf) and load it with compress.load, or use gptq for GGUF")
        target = getattr(job.export, "target", None)
        why = None if target is None else CodebookLinear.refusal({}, TARGETS[target])
        if why:
            raise UsageError(f"{where}: export.target is {target}, and {why}; use --target compress, or gptq for {target}")

    def apply(self, full_name, module, stats):
        c = self.config
        codes, tables, info = codebook_quantize(
            module.weight.detach().float(), stats["hessian"]["H"], c.bits, blocksize=c.block_size, damp=c.damp,
            act_order=c.act_order, iters=c.iters, table_dtype=self.ctx.dtype, name=full_name)
        bias = None if module.bias is None else module.bias.detach()
        m = CodebookLinear.from_codes(codes, tables, c.bits, bias=bias, dtype=self.ctx.dtype)
        return m, {"codebook_bits": c.bits, "in_features": module.in_features, "damp": info["damp"],
                   "bits_per_weight": round(m.bits_per_weight, 4)}

    def export_metadata(self, layers, export):
        meta = codebook_metadata(layers)
        return {SECTION: meta} if meta else {}
