"""The pass protocol, the registry, and the statistics passes ask the engine to collect.

A pass is a small class: a pydantic ``Config`` (its recipe options), the statistics it needs
(names in ``STATS``), which Linears it targets, and ``apply`` that transforms one Linear given
those statistics. The algorithm itself lives in ``quant/``, ``prune/``, ... as a pure function on
tensors; each family keeps its pass adapters beside its algorithms (``quant/passes.py``,
``prune/passes.py``). This module is a leaf: it imports no pass, and no pass module is imported
until the registry is first asked for a name. Passes register by name (the recipe's key); third
parties add theirs through the ``compress.passes`` entry-point group.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn

from compress.errors import UsageError

# ---------------------------------------------------------------- statistics (observe)
# Every statistic is a sum (or a max) over calibration tokens: ``init(in_features)`` makes the
# empty state, ``accumulate(state, x)`` adds a batch x (..., in). Sums over tokens are what
# data-parallel ranks can all-reduce.


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
    state["max"] = torch.maximum(state["max"], x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float())


def sqnorm_init(in_features: int) -> dict:
    """Σx² per input channel (in,): ‖X_j‖₂² for Wanda and OWL (the diagonal of H, without H)."""
    return {"sq": torch.zeros(in_features), "n": 0}


def sqnorm_accumulate(state: dict, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    state["sq"] += (x * x).sum(dim=0)
    state["n"] += x.shape[0]


def xcov_init(in_features: int) -> dict:
    """C = Σ x·x̂ᵀ (in, in): the uncompressed model's input x of a Linear against the compressed
    model's x̂ at the same token (paired: the engine runs the original block alongside)."""
    return {"C": torch.zeros(in_features, in_features), "n": 0}


def xcov_accumulate(state: dict, x_hat: torch.Tensor, x: torch.Tensor) -> None:
    x_hat = x_hat.reshape(-1, x_hat.shape[-1]).float()
    state["C"].addmm_(x.reshape(-1, x.shape[-1]).float().T, x_hat)
    state["n"] += x_hat.shape[0]


STATS = {
    "hessian": (hessian_init, hessian_accumulate),
    "absmean": (absmean_init, absmean_accumulate),
    "absmax": (absmax_init, absmax_accumulate),
    "sqnorm": (sqnorm_init, sqnorm_accumulate),
    "xcov": (xcov_init, xcov_accumulate),
}
# statistics whose accumulate also takes the original model's input (x̂, x); the engine provides
# them only when it propagates compressed activations (else x = x̂ and they equal the Hessian)
PAIRED = frozenset({"xcov"})

# ---------------------------------------------------------------- protocol


@dataclass
class Context:
    """What a pass may know about the job beyond its own options."""

    dtype: torch.dtype = torch.bfloat16  # the checkpoint's storage dtype (scales are stored in it)
    seed: int = 0  # the recipe's seed (passes that draw random numbers, e.g. distillation's data order)


class Pass:
    """A recipe step. ``apply`` may read and write ``stats`` (the Linear's statistics, shared by
    the passes that run on it in recipe order): a pruning pass leaves its mask there as
    ``stats["mask"]`` (bool (out, in), True = kept) so a later quantizer keeps the zeros."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    scope: ClassVar[Literal["block", "model"]] = "block"
    stats: ClassVar[tuple[str, ...]] = ()  # statistics per Linear group, for ``apply``
    quantizes: ClassVar[bool] = False  # replaces Linears with quantized modules
    prunes: ClassVar[bool] = False  # zeroes weights (a mask the later passes keep)
    # replaces a Linear by factors (lowrank: B·A); a later quantization pass quantizes each
    # factor (the engine derives each factor's input statistics), nothing else may follow it
    factorizes: ClassVar[bool] = False
    # smoothing passes (awq, smoothquant) also transform the whole block before any Linear is
    # quantized: ``smooth(block, prefix, points, plus_one, stats, probe)`` with ``smooth_stats``
    smooths: ClassVar[bool] = False
    smooth_stats: ClassVar[tuple[str, ...]] = ()
    # passes that need a look at the whole (uncompressed) model first, e.g. OWL's per-block
    # sparsity: the engine runs one preview sweep collecting ``preview_stats`` of every targeted
    # Linear, calling ``preview_block`` per block and ``preview_done`` at the end
    preview_stats: ClassVar[tuple[str, ...]] = ()
    # distillation: trains what the compressing passes left (scope block: the engine calls
    # ``train_block`` on each finished block; scope model: the API runs it after the sweep)
    distills: ClassVar[bool] = False
    absorbed: bool = False  # set by an earlier pass's ``link`` that does this pass's work too

    def __init__(self, config: BaseModel, ctx: Context | None = None):
        self.config = config
        self.ctx = ctx or Context()

    def matches(self, full_name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear) or matches_any(full_name, module, self.config.ignore):
            return False
        if getattr(module, "_compress_router", False):  # MoE routers stay in full precision unless named
            return matches_any(full_name, None, self.config.targets)
        return matches_any(full_name, module, self.config.targets)

    def check(self, full_name: str, module: nn.Linear) -> str | None:
        """A reason this layer cannot take the pass, or None. Reasons that name ``in_features``
        are grouped by it in the error, and ``fix`` says what would work for those widths."""
        return None

    def fix(self, in_features: list[int]) -> str:
        return "list those layers under `ignore`"

    def link(self, later: list["Pass"]) -> None:
        """Called once before the sweep with the passes after this one in the recipe."""

    def preview_block(self, prefix: str, stats: dict[str, dict], weights: dict[str, torch.Tensor], probe=None) -> None:
        """``probe(name, W)``: (the block output's squared error, the Linear's output squared
        error) on one calibration batch when Linear ``name`` alone computes with W instead: how
        much of a layer's error reaches the residual stream."""

    def preview_done(self) -> None:
        pass

    def apply(self, full_name: str, module: nn.Linear, stats: dict[str, Any]) -> tuple[nn.Module, dict]:
        raise NotImplementedError


def matches_any(full_name: str, module: nn.Module, patterns: list[str]) -> bool:
    """A pattern matches a class name or a base class's (``Linear`` matches transformers'
    ``FalconLinear``, as in compressed-tensors; not when ``module`` is None), a dotted name or its
    suffix (``mlp.down_proj``), or, with the ``re:`` prefix, a regular expression (``re.match``, as
    compressed-tensors does)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], full_name):
                return True
        elif module is not None and any(c.__name__ == p for c in type(module).__mro__) or full_name == p or full_name.endswith("." + p):
            return True
    return False


# ---------------------------------------------------------------- registry

# The built-in families' adapter modules, imported on the first registry lookup (by name, so
# this module imports none of them).
BUILTIN = ("compress.quant.passes", "compress.prune.passes", "compress.lowrank.passes", "compress.distill.passes")

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for mod in BUILTIN:
        importlib.import_module(mod)


def get_pass(name: str, where: str = "passes") -> type[Pass]:
    _load_builtin()
    if name not in _REGISTRY:
        for ep in entry_points(group="compress.passes"):
            if ep.name == name:
                register(ep.load())
    if name not in _REGISTRY:
        raise UsageError(f"{where}: unknown pass {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)
