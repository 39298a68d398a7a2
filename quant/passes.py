"""Pass adapters of the quantization family: round-to-nearest, GPTQ, and the scale-folding
passes AWQ and SmoothQuant. Each adapts a pure function of ``quant/`` (``rtn.py``, ``gptq.py``,
``awq.py``, ``smoothquant.py``) to the modules of a decoder block; the engine owns hooks, data
and devices, ``compress.arch.smoothing`` the folding of scales into a block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
from compress.quant import awq as awq_alg
from compress.quant import ggml
from compress.quant.embeddings import EmbeddingsConfig, check_embeddings, quantize_outside
from compress.quant.gptq import gptq_quantize, gptq_quantize_grid
from compress.quant.kv_cache import SECTION as KV_SECTION
from compress.quant.mixed import LayerErrors, allocate_bits, average_bits, rtn_output_error
from compress.quant.outliers_module import SECTION as OUTLIERS
from compress.quant.outliers_module import OutlierQuantLinear, outlier_metadata
from compress.quant.rtn import QuantScheme, rtn_quantize
from compress.quant.smoothquant import smooth_scales
from compress.quant.tt_module import tt_metadata
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from compress.arch.families import Smooth, smooth_points
from compress.arch.smoothing import fold_scales, output_loss, scaled_hessian
from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.ggml_linear import GGMLLinear
from compress.checkpoint.gguf import F16, F32, arch_for, hf_layer_type
from compress.engine.observe import typical_energy
from compress.errors import UsageError
from compress.modules import TARGETS, has_experts
from compress.passes import Pass, exclusive, matches_any, register
from compress.utils import get_module

# ---------------------------------------------------------------- RTN and GPTQ


class ActivationConfig(BaseModel):
    """Activation quantization: symmetric integers, one scale per token computed at run time. 8 bits
    is what the int8 kernels and vLLM's int-quantized path serve (W8A8); 4 bits (W4A4) only
    compress.load computes (each input rounded, then the packed product)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = 8
    dynamic: Literal[True] = True  # per-token scales at run time (no calibrated static scale)
    symmetric: Literal[True] = True


class KVCacheConfig(BaseModel):
    """KV-cache quantization: every key and value vector (per token and head) to symmetric integers
    with its own absmax scale, where compress.load runs the model (compress.quant.kv_cache)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = 8


AUTO_GROUP = 128  # what group_size: auto takes where it divides a layer's in_features
MIN_AUTO_GROUP = 16  # below this, scales cost more than a bit per weight: auto uses -1 instead


def auto_group_size(in_features: int) -> int:
    """``group_size: auto`` for one layer: 128 where it divides ``in_features``, else the largest
    power of two below it that does (down to 16), else -1 (one scale per output channel)."""
    g = AUTO_GROUP
    while g >= MIN_AUTO_GROUP:
        if in_features % g == 0:
            return g
        g //= 2
    return -1


class QuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8)  # 4 and 8 are what vLLM serves; others run in our runtime
    # mixed precision: each layer's bits among `widths`, by measured sensitivity, averaging this
    # many bits per weight (a fractional `bits`, e.g. 3.5, sets it; compress.quant.mixed)
    budget: float | None = None
    widths: list[int] = Field(default_factory=lambda: [2, 3, 4, 8])
    # input columns per scale; -1 = one scale per output channel; auto: per layer, 128 where it
    # divides in_features, else the largest power of two (>= 16) that does, else -1
    group_size: int | Literal["auto"] = "auto"
    symmetric: bool = True  # asymmetric stores a zero point per group
    observer: Literal["minmax", "mse"] = "mse"  # mse: search a clipping ratio per group
    targets: list[str] = Field(default_factory=lambda: ["Linear"])  # class, name suffix, or re:regex
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    # also quantize the Linear's input per token at run time: with bits 8, group_size -1 and
    # symmetric weights W8A8 (int8 × int8 → int32 GEMM, compressed-tensors int-quantized); with
    # other weights WnA8 (e.g. W4A8: packed weights, pack-quantized with input_activations)
    activations: ActivationConfig | None = None
    # the KV cache rounded per token and head to this many bits where compress.load runs the model
    # (compress.quant.kv_cache; R3 from `rotate: {r3: true}`); the weights do not change
    kv_cache: KVCacheConfig | None = None
    # also the token embedding and lm_head (tied: the one table; untied: the head as a Linear; the
    # gptq pass solves the head on its inputs; compress.quant.embeddings); None: left as they are
    embeddings: EmbeddingsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _fractional_bits(cls, data):
        """``bits: 3.5`` is a mixed-precision budget (the widths' average)."""
        if isinstance(data, dict) and isinstance(data.get("bits"), float | str):
            try:
                b = float(data["bits"])
            except ValueError:
                return data
            if b != int(b):
                data = {**data, "budget": b, "bits": max(2, min(8, int(b)))}
            else:
                data = {**data, "bits": int(b)}
        return data

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if v != "auto" and (not isinstance(v, int) or v != -1 and v < 1):
            raise ValueError("must be auto, -1 (per channel) or a positive divisor of in_features")
        return v

    @model_validator(mode="after")
    def _w8a8(self):
        if self.budget is not None:
            if any(w < 2 or w > 8 for w in self.widths) or not self.widths:
                raise ValueError(f"widths {self.widths}: bits from 2 to 8")
            if not min(self.widths) < self.budget < max(self.widths):
                raise ValueError(f"bits {self.budget:g}: a mixed-precision budget lies strictly between the narrowest and the widest "
                                 f"of widths {sorted(self.widths)}; use an integer for one width everywhere")
            if self.activations is not None:
                raise ValueError("activations (quantized inputs) take one weight width: a mixed-precision budget does not apply")
        if self.activations is not None and self.bits == 8 and self.group_size == "auto":
            self.group_size = -1  # W8A8 is per channel
        return self

    @property
    def w8a8(self) -> bool:
        """int8 weights per channel and int8 inputs: the int-quantized scheme (``Int8Linear``)."""
        return self.activations is not None and (self.activations.bits, self.bits, self.group_size, self.symmetric) == (8, 8, -1, True)

    def group_for(self, in_features: int) -> int:
        """The group size of a layer with ``in_features`` columns."""
        return auto_group_size(in_features) if self.group_size == "auto" else self.group_size

    def scheme(self, dtype: torch.dtype, in_features: int, bits: int | None = None):
        return QuantScheme(bits=bits or self.bits, group_size=self.group_for(in_features), symmetric=self.symmetric,
                           observer=self.observer, scale_dtype=dtype)


class _QuantPass(Pass):
    effects = frozenset({"quantize"})
    # (TYPE, the model's config) when the export is GGUF (set by ``validate``): each Linear is then
    # solved on the llama.cpp grid that TYPE's mix assigns its tensor (compress.checkpoint.gguf)
    gguf: tuple[str, object] | None = None

    def __init__(self, config, ctx=None):
        super().__init__(config, ctx)
        self._errors: list[LayerErrors] = []  # mixed precision: each layer's measured error per width
        self.widths: dict[str, int] = {}  # mixed precision: full name -> bits

    # ---- mixed precision: a preview sweep measures every layer's error at every width
    @property
    def preview_stats(self):  # type: ignore[override]
        return ("hessian",) if self.config.budget is not None else ()

    def preview_block(self, prefix, stats, weights, probe=None):
        c = self.config
        for n, W in weights.items():
            H = stats[n]["hessian"]["H"]
            errs = {b: rtn_output_error(W, rtn_quantize(W.float(), c.scheme(self.ctx.dtype, W.shape[1], b)).dequantize(), H)
                    for b in sorted(set(c.widths))}
            scale = 1.0
            if probe is not None:  # the share reaching the block output, per unit of the residual stream's typical size
                mid = sorted(c.widths)[len(c.widths) // 2 - 1]
                block_err, layer_err = probe(n, rtn_quantize(W.float(), c.scheme(self.ctx.dtype, W.shape[1], mid)).dequantize())
                scale = block_err / max(layer_err, 1e-30) / max(typical_energy(probe), 1e-30)
            self._errors.append(LayerErrors(prefix + n, W.numel(), {b: e * scale for b, e in errs.items()}))

    def preview_done(self):
        try:
            self.widths = allocate_bits(self._errors, self.config.budget)
        except ValueError as e:
            raise UsageError(f"{self.name}.bits: {e}") from None
        self.mixed = {"budget": self.config.budget, "average_bits": round(average_bits(self._errors, self.widths), 4),
                      "layers": dict(self.widths)}
        self._errors = []

    def bits_for(self, full_name: str) -> int:
        return self.widths.get(full_name, self.config.bits) if self.config.budget is not None else self.config.bits

    def export_metadata(self, layers, export):
        out = tt_metadata(layers) if self.config.embeddings is not None else {}  # a TT table: its compress.json section
        if getattr(self.config, "kv_cache", None) is not None:
            out[KV_SECTION] = {"bits": self.config.kv_cache.bits, "strategy": "per token and head, symmetric, absmax scale",
                               "runtimes": "compress.load rounds the cache; other runtimes serve these weights with their own cache"}
        if self.config.budget is not None and getattr(self, "mixed", None):
            out["mixed_precision"] = self.mixed
        return out

    # ---- the embeddings option: the token embedding and lm_head, before block 0
    def in_stage(self, stage):
        if stage == "apply_outside":
            return self.config.embeddings is not None
        return super().in_stage(stage)

    def apply_outside(self, stage):
        return quantize_outside(stage, self.config, self.ctx.dtype, self.head_solver())

    def head_solver(self) -> Callable | None:
        """``solve(W, H, scheme) -> QuantResult`` for the lm_head on its inputs (None: RTN only)."""
        return None

    def conflicts(self, planned):
        return exclusive(self, planned, "quantize", "quantization")

    def check(self, full_name, module):
        if self.gguf is not None:  # the type's blocks, or llama.cpp's fallback for the width: any width fits
            return None
        g = self.config.group_size
        if g != "auto" and g != -1 and module.in_features % g:
            return f"group_size {g} does not divide in_features {module.in_features}"
        return None

    def fix(self, in_features):
        ok = [g for g in (256, 128, 64, 32, 16) if all(k % g == 0 for k in in_features)]
        return f"use group_size {', '.join(map(str, ok[:3])) or '-1'} or -1, or list those layers under `ignore`"

    def validate(self, k, job):
        """``export.target``: the scheme this pass stores must be one that runtime serves. A GGUF
        export: the grids are llama.cpp's (bits, groups and symmetry come from the type)."""
        check_embeddings(f"passes.{k}.{self.name}", self, job)
        if self.config.budget is not None:
            self._check_mixed(k, job)
        if getattr(job.export, "format", None) == "gguf":
            if getattr(self.config, "kv_cache", None) is not None:
                raise UsageError(f"passes.{k}.{self.name}.kv_cache: a GGUF file holds no cache setting; llama.cpp quantizes its "
                                 "cache at run time (--cache-type-k q8_0 --cache-type-v q8_0): drop kv_cache")
            if getattr(self.config, "activations", None) is not None:
                raise UsageError(f"passes.{k}.{self.name}: activations (W8A8) have no GGUF form (llama.cpp stores quantized "
                                 "weights only); drop `activations` (--method gptq, awq or rtn) or export to compressed-tensors (drop --gguf)")
            arch_for(job.model_config)  # an architecture llama.cpp does not read: exit 2 now
            self.gguf = (job.export.type, job.model_config)
            return
        target = getattr(job.export, "target", None)
        if target is None:
            return
        c = self.config
        kind = Int8Linear if c.w8a8 else QuantLinear
        g_idx = getattr(c, "act_order", False) and not getattr(c, "static_groups", True)
        moe = has_experts(job.model_config)
        why = kind.refusal({"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric, "act_order": g_idx, "moe": moe,
                            "activations": c.activations is not None}, TARGETS[target])
        if why:
            raise UsageError(f"passes.{k}.{self.name}: export.target is {target}, and {why}")

    def _check_mixed(self, k, job) -> None:
        """A mixed-precision budget: rtn and gptq only, no GGUF (its types fix the widths), and
        every width one the export's target serves."""
        where = f"passes.{k}.{self.name}.bits"
        if self.name not in ("rtn", "gptq"):
            raise UsageError(f"{where}: a fractional width (mixed precision, {self.config.budget:g}) is for rtn and gptq; use an integer")
        if getattr(job.export, "format", None) == "gguf":
            raise UsageError(f"{where}: a GGUF export takes its widths from the type (--gguf); use an integer bits, or drop --gguf")
        target = getattr(job.export, "target", None)
        if target is not None:
            c = self.config
            for w in sorted(set(c.widths)):
                why = QuantLinear.refusal({"bits": w, "group_size": c.group_size, "symmetric": c.symmetric, "act_order": False,
                                           "moe": has_experts(job.model_config)}, TARGETS[target])
                if why:
                    raise UsageError(f"{where}: export.target is {target}, and the width {w} of widths {sorted(c.widths)}: {why}; "
                                     "set widths to ones it serves (e.g. [4, 8])")

    def grid_for(self, full_name: str, in_features: int) -> str:
        """The GGUF storage type of this Linear (``f16`` where llama.cpp's fallback keeps it dense)."""
        return hf_layer_type(self.gguf[0], full_name, in_features, self.gguf[1], imatrix=self.needs_calibration())

    def _grid_apply(self, full_name: str, module: nn.Linear, solve) -> tuple[nn.Module, dict]:
        """GGUF export: ``solve(grid) -> (codes, params, info)`` on this Linear's llama.cpp grid."""
        t = self.grid_for(full_name, module.in_features)
        if t in (F16, F32):
            return module, {"gguf_type": t}
        g = ggml.grid(t)
        codes, params, info = solve(g)
        bias = None if module.bias is None else module.bias.detach().float()
        return GGMLLinear.from_blocks(ggml.encode(codes, params), g.qtype, module.in_features, bias), {"gguf_type": t, **info}

    def _module(self, module: nn.Linear, result) -> nn.Module:
        bias = None if module.bias is None else module.bias.detach()
        if self.config.w8a8:
            return Int8Linear.from_result(result, bias=bias, bias_dtype=self.ctx.dtype)
        m = QuantLinear.from_result(result, bias=bias, bias_dtype=self.ctx.dtype)
        if self.config.activations is not None:
            m.act_bits = self.config.activations.bits  # WnA8: the input quantized per token on every forward
        return m


@register
class RTNPass(_QuantPass):
    """Round to nearest, per group (no calibration statistics needed)."""

    name = "rtn"
    Config = QuantConfig

    def apply(self, full_name, module, stats):
        if self.gguf is not None:
            return self._grid_apply(full_name, module, lambda g: (*ggml.rtn(module.weight.detach().float(), g), {}))
        res = rtn_quantize(module.weight.detach().float(), self.config.scheme(self.ctx.dtype, module.in_features, self.bits_for(full_name)))
        return self._module(module, res), {"group_size": res.scheme.group_size, "bits": res.scheme.bits}


class GPTQConfig(QuantConfig):
    # Visit columns by decreasing activation energy (H_jj): the largest-error columns are rounded
    # first, while the most columns are left to absorb their error. Measured on the demo model
    # (W4 g64): perplexity 16.47 without, 14.60 with (static groups); see BENCHMARKS.md.
    act_order: bool = True
    # Fit every group's scale up front on the original weights, groups of consecutive columns:
    # act-order then needs no g_idx, so every runtime serves it (compressed-tensors >= 0.19 no
    # longer reads g_idx). False: groups follow the visiting order and g_idx is exported.
    static_groups: bool = True
    block_size: int = Field(128, ge=1)  # columns per lazy-update block
    damp: float = Field(0.01, gt=0)  # λ = damp · mean(diag H); raised ×10 if H is not PD
    # what each Linear's quantized outputs should match on the compressed model's inputs X̂: its
    # own outputs there (propagated: ‖X̂(W − Ŵ)ᵀ‖, GPTQ's) or the original model's outputs
    # (original: ‖XWᵀ − X̂Ŵᵀ‖, GPTAQ's asymmetric calibration; the original block runs alongside,
    # about twice the calibration time)
    objective: Literal["original", "propagated"] = "propagated"
    # SpQR's outliers: this fraction of each Linear's weights (per input column, the rows with the
    # largest rounding error) kept unquantized in the checkpoint's dtype beside the codes; 16 + 16
    # bits each (value, row). Only compress.load reads such layers (docs/quantization.md)
    outliers: float = Field(0.0, ge=0, le=0.25)
    # OWQ's weak columns: per Linear, this many whole input columns (an integer), or this fraction
    # of its in_features (a float in (0, 1), rounded up), those of largest sensitivity
    # H_jj·‖ΔW_j‖², kept in the checkpoint's dtype beside the codes; GPTQ visits them last, so they
    # absorb every rounding error. 16 bits per weight of a kept column and 16 per index. Combines
    # with outliers. Only compress.load reads such layers (docs/quantization.md)
    weak_columns: int | float = 0

    @field_validator("weak_columns", mode="before")
    @classmethod
    def _weak_columns(cls, v):
        if isinstance(v, str):
            v = _as_number(v.strip())
        if isinstance(v, bool) or not isinstance(v, int | float):
            # ValueError, not TypeError: pydantic reports only ValueError as the field's error
            raise ValueError(f"{v!r}: a number of columns per layer (e.g. 8) or a fraction of in_features in (0, 1)")  # noqa: TRY004
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"{v:g}: a fraction of in_features lies in (0, 1); an integer (e.g. 8) is a number of columns per layer")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"{v}: a number of columns is 0 (none) or more")
        return v

    @model_validator(mode="after")
    def _outliers_weight_only(self):
        if self.outliers and self.activations is not None:
            raise ValueError("outliers apply to weight-only schemes; W8A8 (activations) keeps none: drop outliers, or drop activations (--method gptq)")
        if self.weak_columns and self.activations is not None:
            raise ValueError("weak_columns apply to weight-only schemes; quantized activations keep none: drop weak_columns, "
                             "or drop activations (--method gptq)")
        return self

    def weak_count(self, in_features: int) -> int:
        """The weak columns of a layer with ``in_features`` columns (a fraction never takes them all)."""
        w = self.weak_columns
        return min(math.ceil(w * in_features), in_features - 1) if isinstance(w, float) else w


def _as_number(text: str) -> int | float | str:
    """A command-line value: ``8`` an int, ``0.01`` a float, anything else as it was."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # refused with the field's message


@register
class GPTQPass(_QuantPass):
    """GPTQ (second-order error feedback) on each targeted Linear."""

    name = "gptq"
    Config = GPTQConfig

    @property
    def stats(self):  # type: ignore[override]
        return ("hessian", "xcov") if self.config.objective == "original" else ("hessian",)

    def head_solver(self):
        c = self.config  # static groups: a quantized table stores no g_idx
        return lambda W, H, scheme: gptq_quantize(W, H, scheme, blocksize=c.block_size, damp=c.damp, act_order=c.act_order,
                                                  static_groups=True, name="lm_head")

    def export_metadata(self, layers, export):
        meta = outlier_metadata(layers)
        return {**super().export_metadata(layers, export), **({OUTLIERS: meta} if meta else {})}

    def validate(self, k, job):
        kept = " and ".join(f for f in ("outliers", "weak_columns") if getattr(self.config, f))
        if kept:
            if getattr(job.export, "format", None) == "gguf":
                raise UsageError(f"passes.{k}.gptq.{kept}: a GGUF export stores no outliers or weak columns (llama.cpp reads its own "
                                 f"block types); drop {kept} or the GGUF export")
            target = getattr(job.export, "target", None)
            why = OutlierQuantLinear.refusal({}, TARGETS[target]) if target else None
            if why:
                raise UsageError(f"passes.{k}.gptq.{kept}: export.target is {target}, and {why}")
        super().validate(k, job)

    def check(self, full_name, module):
        n = self.config.weak_count(module.in_features)
        if self.gguf is None and n >= module.in_features:
            return f"weak_columns {n} must be below in_features {module.in_features}"
        return super().check(full_name, module)

    def fix(self, in_features):
        n = self.config.weak_columns
        if isinstance(n, int) and n >= min(in_features):
            return f"use weak_columns below {min(in_features)} or a fraction in (0, 1), or list those layers under `ignore`"
        return super().fix(in_features)

    def apply(self, full_name, module, stats):
        c = self.config
        if self.gguf is not None:  # static groups: a GGUF block has its parameters, whatever the visiting order
            return self._grid_apply(full_name, module, lambda g: gptq_quantize_grid(
                module.weight.detach().float(), stats["hessian"]["H"], g, blocksize=c.block_size, damp=c.damp,
                act_order=c.act_order, name=full_name))
        res = gptq_quantize(
            module.weight.detach().float(),
            stats["hessian"]["H"],
            c.scheme(self.ctx.dtype, module.in_features, self.bits_for(full_name)),
            blocksize=c.block_size,
            damp=c.damp,
            act_order=c.act_order,
            static_groups=c.static_groups,
            mask=stats.get("mask"),  # an earlier pruning pass's zeros stay zeros
            name=full_name,
            C=stats.get("xcov", {}).get("C"),
            outliers=math.ceil(c.outliers * module.out_features) if c.outliers else 0,
            outlier_dtype=self.ctx.dtype,
            weak_columns=c.weak_count(module.in_features),
        )
        info = {"damp": res.info["damp"], "group_size": res.scheme.group_size, "bits": res.scheme.bits}
        if res.outliers is None and res.weak is None:
            return self._module(module, res), info
        bias = None if module.bias is None else module.bias.detach()
        s = res.scheme
        info.update({"outliers_bits": s.bits, "outliers_group_size": s.group_size, "outliers_symmetric": s.symmetric,
                     "outliers_act_order": res.act_order, "outliers_in_features": module.in_features})
        if res.outliers is not None:
            info["outliers_per_column"] = res.outliers[0].shape[1]
        if res.weak is not None:
            info["weak_columns"] = res.weak[0].numel()
        m = OutlierQuantLinear.from_outliers(res, bias, self.ctx.dtype, self.ctx.dtype)
        info["bits_per_weight"] = round(m.bits_per_weight, 4)
        return m, info


# ---------------------------------------------------------------- scale folding


class _SmoothPass(Pass):
    """A pass of the transform_block stage: observes the block (``block_stats`` of the Linears at
    the family's folding points, ``compress.arch.families.smooth_points``) and folds scales into it
    (``smooth``)."""

    effects = frozenset({"smooth"})

    def check_sweep(self, sweep):
        smooth_points(sweep.blocks[0], sweep.model_type)  # an unknown family fails now, not at block 0's end

    def transform_block(self, stage) -> dict[str, dict]:
        points, plus_one = smooth_points(stage.block, stage.model_type)
        names = {n for pt in points for n in pt.linears} | set(stage.targets(self))
        stats = stage.observe(sorted(names), self.block_stats)
        return self.smooth(stage.block, stage.prefix, points, plus_one, stats, stage.probe)

    def smooth(self, block, prefix, points, plus_one, stats, probe) -> dict[str, dict]:
        raise NotImplementedError

    def targets_point(self, prefix: str, block: nn.Module, point: Smooth) -> bool:
        return all(self.matches(prefix + n, get_module(block, n)) for n in point.linears)


# ---------------------------------------------------------------- AWQ


class AWQConfig(QuantConfig):
    # the clipping search picks each group's range; a following gptq pass uses its own observer
    observer: Literal["minmax", "mse"] = "minmax"
    grid: int = Field(20, ge=1)  # exponents r = 0, 1/grid, ..., (grid-1)/grid
    duo_scaling: bool = True  # s = mean|x|^r / mean|w|^(1-r); false: s = mean|x|^r
    # what the search measures: "layer" the Linears' own output error on every calibration token,
    # exactly, through H = XᵀX (a grid point costs one (out, in) × (in, in) product); "output"
    # the real output of the module the Linears feed (the attention, the MLP), on
    # `search_samples` calibration windows (a grid point costs a forward of that module)
    objective: Literal["output", "layer"] = "layer"
    search_samples: int = Field(32, ge=1)  # windows the "output" objective runs (evenly spread)
    clip: bool = True  # search a clipped weight range per group (the reference's auto_clip)
    clip_grid: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0, lt=1)
    # Linears whose range is not clipped: their error reaches the output through a softmax, where
    # the per-group output error is a poor guide (as in the reference implementation)
    clip_skip: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "qkv_proj"])


@register
class AWQPass(_SmoothPass, _QuantPass):
    """Activation-aware scaling and clipping; quantizes with RTN itself unless an rtn or gptq pass
    follows it in the recipe (then it only prepares the weights)."""

    name = "awq"
    Config = AWQConfig
    block_stats = ("absmean", "hessian")
    defer = False  # set by ``link`` when a later pass quantizes the Linears

    @property
    def effects(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"smooth"} if self.defer else {"smooth", "quantize"})

    def link(self, later):
        self.defer = any("quantize" in q.effects for q in later if "smooth" not in q.effects)

    def _search_scheme(self, in_features: int, full_name: str | None = None):
        """The grid the search rounds on: the recipe's, or for a GGUF export the uniform grid
        closest to the layer's llama.cpp type (its bits, sub-block width, and min or not)."""
        if self.gguf is not None and full_name is not None:
            t = self.grid_for(full_name, in_features)
            if t not in (F16, F32):
                g = ggml.grid(t)
                return QuantScheme(bits=g.bits, group_size=g.sub, symmetric=not g.has_min, observer="minmax", scale_dtype=torch.float16)
        return replace(self.config.scheme(self.ctx.dtype, in_features), observer="minmax")

    @torch.no_grad()
    def smooth(self, block, prefix, points, plus_one, stats, probe) -> dict[str, dict]:
        c = self.config
        info: dict[str, dict] = {}
        hess = {n: st["hessian"]["H"] for n, st in stats.items()}
        for point in points:
            if not self.targets_point(prefix, block, point):
                continue
            lins = [get_module(block, n) for n in point.linears]
            scheme = self._search_scheme(lins[0].in_features, prefix + point.linears[0])  # the point's Linears share their input
            weights = [l.weight.detach().float().clone() for l in lins]
            st = stats[point.linears[0]]
            x_mean = awq_alg.activation_mean(st["absmean"]["sum"], st["absmean"]["n"])
            if c.objective == "layer":
                loss = awq_alg.hessian_loss(weights, hess[point.linears[0]])
            else:
                loss = output_loss(block, point, lins, weights, probe, c.search_samples)
            s, res = awq_alg.search_scale(weights, x_mean, scheme, loss, grid=c.grid, duo=c.duo_scaling)
            applied = fold_scales(block, point, s, plus_one, self.ctx.dtype)
            # the Linears of a point read one input: one Hessian, now of X diag(applied)^-1
            Hs = scaled_hessian(hess[point.linears[0]], applied)
            for n in point.linears:
                hess[n] = Hs
                info[prefix + n] = {"awq_ratio": res["ratio"]}
        for n, H in hess.items():  # the engine reuses them (they are XᵀX of the smoothed block)
            stats[n]["hessian"]["H"] = H
        if c.clip:
            for n, H in hess.items():
                full = prefix + n
                mod = get_module(block, n)
                if not self.matches(full, mod) or any(full.endswith("." + k) for k in c.clip_skip):
                    continue
                lo, hi = awq_alg.search_clip(mod.weight.float(), H, self._search_scheme(mod.in_features, full), c.clip_grid, c.clip_max_shrink)
                mod.weight.copy_(awq_alg.clamp_to(mod.weight.float(), lo, hi))
                info.setdefault(full, {})["awq_clipped"] = True
        return info

    def apply(self, full_name, module, stats):
        if self.defer:  # the following rtn/gptq pass quantizes the prepared weights
            return module, {}
        return RTNPass.apply(self, full_name, module, stats)  # min-max on the clipped weights


# ---------------------------------------------------------------- SmoothQuant


class SmoothQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0, le=1)  # migration strength: 0 keeps X, 1 moves all of max|X| into W
    # per-layer override: {pattern: alpha}; a pattern (class, name suffix, or re:regex) matches
    # any Linear of a folding point; the first match wins
    layers: dict[str, float] = Field(default_factory=dict)
    # where to fold: "norms" (the input norms of attention and MLP, as in the paper) or "all"
    # (also v→o and up→down where shapes allow)
    fold_into: Literal["norms", "all"] = "norms"
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("layers")
    @classmethod
    def _alphas(cls, v):
        for k, a in v.items():
            if not 0 <= a <= 1:
                raise ValueError(f"alpha for {k!r} must be in [0, 1], got {a}")
        return v


@register
class SmoothQuantPass(_SmoothPass):
    """Fold max|X|^α / max|W|^(1-α) into the norms; a following rtn/gptq pass with
    ``activations: {bits: 8}`` makes it W8A8."""

    name = "smoothquant"
    Config = SmoothQuantConfig
    block_stats = ("absmax",)

    def alpha_for(self, prefix: str, block: nn.Module, point: Smooth) -> float:
        for pattern, a in self.config.layers.items():
            if any(matches_any(prefix + n, get_module(block, n), [pattern]) for n in point.linears):
                return a
        return self.config.alpha

    @torch.no_grad()
    def smooth(self, block, prefix, points, plus_one, stats, probe) -> dict[str, dict]:
        info: dict[str, dict] = {}
        for point in points:
            if not self.targets_point(prefix, block, point):
                continue
            if self.config.fold_into == "norms" and isinstance(get_module(block, point.prev), nn.Linear):
                continue
            alpha = self.alpha_for(prefix, block, point)
            weights = [get_module(block, n).weight.float() for n in point.linears]
            s = smooth_scales(stats[point.linears[0]]["absmax"]["max"], weights, alpha)
            fold_scales(block, point, s, plus_one, self.ctx.dtype)
            for n in point.linears:
                info[prefix + n] = {"smooth_alpha": alpha}
        return info

    def apply(self, full_name, module, stats):  # nothing to do per Linear after folding
        return module, {}
