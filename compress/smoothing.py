"""Scale-folding passes (AWQ, SmoothQuant): the module plumbing around ``quant/awq.py`` and
``quant/smoothquant.py``.

Both run in the engine's *smoothing stage*, on a whole decoder block before any of its Linears is
quantized: the engine collects their statistics on the block's calibration inputs, then each pass
folds per-channel scales into the block at the points of ``compress.families`` (``Smooth``:
which norm or Linear feeds which Linears). Folding alone does not change what the block computes
(tests/compress/test_smoothing.py checks the logits); it changes what quantization loses.

Storage dtype: a folded norm weight is rounded to the checkpoint's dtype at once, and the Linears
are scaled by the factor the *rounded* weight really applies, so the exported (bf16) model
computes exactly what was calibrated.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.families import Smooth, get_module
from compress.passes import Pass, QuantConfig, RTNPass, _QuantPass, register
from compress.quant import awq as awq_alg
from compress.quant.smoothquant import smooth_scales


@torch.no_grad()
def fold_scales(block: nn.Module, point: Smooth, s: torch.Tensor, plus_one: bool, dtype: torch.dtype) -> torch.Tensor:
    """Divide ``point.prev``'s output channels by ``s`` (in,) and multiply the input columns of
    ``point.linears`` by the same factors. Returns the factors applied to the Linears (``s``,
    corrected for the rounding of a norm's weight to ``dtype``)."""
    prev = get_module(block, point.prev)
    s = s.float()
    if isinstance(prev, nn.Linear):
        # a Linear producer is quantized (or stored) afterwards from these float32 rows
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
        applied = s
    else:
        w = prev.weight.data.float()
        gain = 1 + w if plus_one else w  # what the norm multiplies by
        offset = 1.0 if plus_one else 0.0
        stored = (gain / s - offset).to(dtype).float()  # what the checkpoint will hold
        new_gain = stored + offset
        # the factor the stored norm really divides by; a zero gain (dead channel) keeps s
        applied = torch.where(new_gain != 0, gain / new_gain, s)
        prev.weight.data.copy_(stored)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_((prev.bias.data.float() / applied).to(dtype).float())
    for name in point.linears:
        get_module(block, name).weight.mul_(applied[None, :])
    return applied


def _scaled_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the input X diag(s)^-1: H / (s sᵀ)."""
    return H / s[:, None] / s[None, :]


class _SmoothPass(Pass):
    """A pass of the smoothing stage: ``smooth(block, points, ...)`` folds scales into the block."""

    smooths = True

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
    smooth_stats = ("absmean", "hessian")
    defer = False  # set by the engine when a later pass quantizes the same Linears

    @property
    def quantizes(self) -> bool:  # type: ignore[override]
        return not self.defer

    def _search_scheme(self):
        from dataclasses import replace

        return replace(self.config.scheme(self.ctx.dtype), observer="minmax")

    @torch.no_grad()
    def smooth(self, block, prefix, points, plus_one, stats, probe) -> dict[str, dict]:
        c = self.config
        scheme = self._search_scheme()
        info: dict[str, dict] = {}
        hess = {n: st["hessian"]["H"] for n, st in stats.items()}
        for point in points:
            if not self.targets_point(prefix, block, point):
                continue
            lins = [get_module(block, n) for n in point.linears]
            weights = [l.weight.detach().float().clone() for l in lins]
            st = stats[point.linears[0]]
            x_mean = awq_alg.activation_mean(st["absmean"]["sum"], st["absmean"]["n"])
            if c.objective == "layer":
                loss = awq_alg.hessian_loss(weights, hess[point.linears[0]])
            else:
                loss = _output_loss(block, point, lins, weights, probe, c.search_samples)
            s, res = awq_alg.search_scale(weights, x_mean, scheme, loss, grid=c.grid, duo=c.duo_scaling)
            applied = fold_scales(block, point, s, plus_one, self.ctx.dtype)
            # the Linears of a point read one input: one Hessian, now of X diag(applied)^-1
            Hs = _scaled_hessian(hess[point.linears[0]], applied)
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
                lo, hi = awq_alg.search_clip(mod.weight.float(), H, scheme, c.clip_grid, c.clip_max_shrink)
                mod.weight.copy_(awq_alg.clamp_to(mod.weight.float(), lo, hi))
                info.setdefault(full, {})["awq_clipped"] = True
        return info

    def apply(self, full_name, module, stats):
        if self.defer:  # the following rtn/gptq pass quantizes the prepared weights
            return module, {}
        return RTNPass.apply(self, full_name, module, stats)  # min-max on the clipped weights


def _output_loss(block, point: Smooth, lins: list[nn.Linear], weights, probe, samples: int):
    """loss(Ŵs) = Σ ‖f(x; Ŵ) - f(x; W)‖² of the module ``point.inspect`` on ``samples``
    calibration windows, where f(·; Ŵ) runs it with the group's weights replaced."""
    module = get_module(block, point.inspect)
    calls = probe.module_inputs(point.inspect, samples)  # [(args, kwargs)] per batch
    ref = [_first(module(*a, **k)) for a, k in calls]

    def loss(qs):
        for l, q in zip(lins, qs):
            l.weight.data = q
        try:
            return float(sum(((_first(module(*a, **k)) - r) ** 2).sum() for (a, k), r in zip(calls, ref)))
        finally:
            for l, w in zip(lins, weights):
                l.weight.data = w

    return loss


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


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
    smooth_stats = ("absmax",)

    def alpha_for(self, prefix: str, block: nn.Module, point: Smooth) -> float:
        from compress.passes import _matches

        for pattern, a in self.config.layers.items():
            if any(_matches(prefix + n, get_module(block, n), [pattern]) for n in point.linears):
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
