"""The pass protocol, the registry, and the statistics passes ask the engine to collect.

A pass is a small class: a pydantic ``Config`` (its recipe options), the statistics it needs
(names in ``STATS``), which Linears it targets, and ``apply`` that transforms one Linear given
those statistics. The algorithm itself lives in ``quant/`` or ``prune/`` as a pure function on
tensors; a pass only adapts it to modules. Passes register by name (the recipe's key); third
parties add theirs through the ``compress.passes`` entry-point group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from compress.errors import UsageError

# ---------------------------------------------------------------- statistics (observe)


def hessian_init(in_features: int) -> dict:
    """H = Σ xxᵀ over calibration tokens (in, in), float32, and the token count."""
    return {"H": torch.zeros(in_features, in_features), "n": 0}


def hessian_accumulate(state: dict, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    state["H"].addmm_(x.T, x)
    state["n"] += x.shape[0]


def absmean_init(in_features: int) -> dict:
    """Σ|x| per input channel (in,) and the token count: mean|x| for AWQ."""
    return {"sum": torch.zeros(in_features), "n": 0}


def absmean_accumulate(state: dict, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    state["sum"] += x.abs().sum(dim=0)
    state["n"] += x.shape[0]


def absmax_init(in_features: int) -> dict:
    """max|x| per input channel (in,): SmoothQuant's activation range."""
    return {"max": torch.zeros(in_features)}


def absmax_accumulate(state: dict, x: torch.Tensor) -> None:
    from compress.quant.smoothquant import absmax_accumulate as acc

    state["max"] = acc(state["max"], x)


STATS = {
    "hessian": (hessian_init, hessian_accumulate),
    "absmean": (absmean_init, absmean_accumulate),
    "absmax": (absmax_init, absmax_accumulate),
}

# ---------------------------------------------------------------- protocol and registry


@dataclass
class Context:
    """What a pass may know about the job beyond its own options."""

    dtype: torch.dtype = torch.bfloat16  # the checkpoint's storage dtype (scales are stored in it)


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    scope: ClassVar[Literal["block", "model"]] = "block"
    stats: ClassVar[tuple[str, ...]] = ()  # statistics per Linear group, for ``apply``
    quantizes: ClassVar[bool] = False  # replaces Linears with packed QuantLinears
    # smoothing passes (awq, smoothquant) also transform the whole block before any Linear is
    # quantized: ``smooth(block, prefix, points, plus_one, stats, probe)`` with ``smooth_stats``
    smooths: ClassVar[bool] = False
    smooth_stats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: BaseModel, ctx: Context | None = None):
        self.config = config
        self.ctx = ctx or Context()

    def matches(self, full_name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _matches(full_name, module, self.config.targets) and not _matches(
            full_name, module, self.config.ignore
        )

    def check(self, full_name: str, module: nn.Linear) -> str | None:
        """A reason this layer cannot take the pass, or None."""
        return None

    def apply(self, full_name: str, module: nn.Linear, stats: dict[str, Any]) -> tuple[nn.Module, dict]:
        raise NotImplementedError


def _matches(full_name: str, module: nn.Module, patterns: list[str]) -> bool:
    """A pattern matches a class name (``Linear``), a dotted name or its suffix (``mlp.down_proj``),
    or, with the ``re:`` prefix, a regular expression (``re.match``, as compressed-tensors does)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], full_name):
                return True
        elif p == type(module).__name__ or full_name == p or full_name.endswith("." + p):
            return True
    return False


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str, where: str = "passes") -> type[Pass]:
    if name not in _REGISTRY:
        for ep in entry_points(group="compress.passes"):
            if ep.name == name:
                register(ep.load())
    if name not in _REGISTRY:
        raise UsageError(f"{where}: unknown pass {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- quantization passes


class ActivationConfig(BaseModel):
    """Activation quantization (W8A8): int8, symmetric, one scale per token computed at run time.
    Only this scheme exists: it is what the int8 kernels and vLLM's int-quantized path serve."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[8] = 8
    dynamic: Literal[True] = True  # per-token scales at run time (no calibrated static scale)
    symmetric: Literal[True] = True


class QuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8)  # 4 and 8 are what vLLM serves; others run in our runtime
    group_size: int = 128  # input columns per scale; -1 = one scale per output channel
    symmetric: bool = True  # asymmetric stores a zero point per group
    observer: Literal["minmax", "mse"] = "mse"  # mse: search a clipping ratio per group
    targets: list[str] = Field(default_factory=lambda: ["Linear"])  # class, name suffix, or re:regex
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    # W8A8: also quantize the Linear's input per token at run time (int8 × int8 → int32 GEMM);
    # needs bits 8, group_size -1, symmetric (the compressed-tensors int-quantized scheme)
    activations: ActivationConfig | None = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v != -1 and v < 1:
            raise ValueError("must be -1 (per channel) or a positive divisor of in_features")
        return v

    @model_validator(mode="after")
    def _w8a8(self):
        if self.activations is not None:
            bad = [f"{k} is {getattr(self, k)}" for k, want in (("bits", 8), ("group_size", -1), ("symmetric", True)) if getattr(self, k) != want]
            if bad:
                raise ValueError(f"activations (W8A8) needs bits 8, group_size -1 and symmetric true; here {', '.join(bad)}")
        return self

    def scheme(self, dtype: torch.dtype):
        from compress.quant.rtn import QuantScheme

        return QuantScheme(
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, observer=self.observer, scale_dtype=dtype
        )


class _QuantPass(Pass):
    quantizes = True

    def check(self, full_name, module):
        g = self.config.group_size
        if g != -1 and module.in_features % g:
            return f"group_size {g} does not divide in_features {module.in_features}"
        return None

    def _module(self, module: nn.Linear, result) -> nn.Module:
        from compress.formats import Int8Linear, QuantLinear

        bias = None if module.bias is None else module.bias.detach()
        if getattr(self.config, "activations", None) is not None:
            return Int8Linear.from_result(result, bias=bias, bias_dtype=self.ctx.dtype)
        return QuantLinear.from_result(result, bias=bias, bias_dtype=self.ctx.dtype)


@register
class RTNPass(_QuantPass):
    """Round to nearest, per group (no calibration statistics needed)."""

    name = "rtn"
    Config = QuantConfig

    def apply(self, full_name, module, stats):
        from compress.quant.rtn import rtn_quantize

        res = rtn_quantize(module.weight.detach().float(), self.config.scheme(self.ctx.dtype))
        return self._module(module, res), {}


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


@register
class GPTQPass(_QuantPass):
    """GPTQ (second-order error feedback) on each targeted Linear."""

    name = "gptq"
    Config = GPTQConfig
    stats = ("hessian",)

    def apply(self, full_name, module, stats):
        from compress.quant.gptq import gptq_quantize

        c = self.config
        res = gptq_quantize(
            module.weight.detach().float(),
            stats["hessian"]["H"],
            c.scheme(self.ctx.dtype),
            blocksize=c.block_size,
            damp=c.damp,
            act_order=c.act_order,
            static_groups=c.static_groups,
            name=full_name,
        )
        return self._module(module, res), {"damp": res.info["damp"]}


# the scale-folding passes live beside their module plumbing; importing registers them
import compress.smoothing  # noqa: E402,F401
