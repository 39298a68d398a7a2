"""The pass protocol, the registry, and the statistics passes ask the engine to collect.

A pass is a small class: a pydantic ``Config`` (its recipe options), the statistics it needs
(names in ``STATS``), which Linears it targets, and the stages it takes part in (``STAGES``:
preview the model, transform a block, apply per Linear, train a block, transform the whole
model; docs/architecture.md draws them). The algorithm itself lives in ``quant/``, ``prune/``, ...
as a pure function on tensors; each family keeps its pass adapters beside its algorithms
(``quant/passes.py``, ``prune/passes.py``). This module is a leaf: it imports no pass, and no pass
module is imported until the registry is first asked for a name (``compress.registry`` lists the
built-in families). Passes register by name (the recipe's key); third parties add theirs through
the ``compress.passes`` entry-point group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from compress.errors import UsageError
from compress.registry import load_families

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


# The stages of a run, in the order they happen (docs/architecture.md draws them). A pass takes
# part in a stage by overriding its method; the engine runs the stages and never asks what kind
# of pass it holds.
STAGES = (
    "preview_block",  # the whole uncompressed model, one block at a time, before the sweep (OWL)
    # the modules outside the blocks (token embedding, lm_head), compressed before block 0 so the
    # sweep calibrates block 0 on what the compressed embedding feeds it (quantized embeddings)
    "apply_outside",
    "transform_block",  # a block, before its Linears are compressed (smoothing; rotations next)
    "apply",  # each targeted Linear, given its statistics (quantize, prune, factor)
    "train_block",  # a finished block against the original block (block-scope distillation)
    "transform_model",  # the whole compressed checkpoint after the sweep (model-scope distillation)
)
SWEEP_STAGES = STAGES[:5]  # the ones the layer-wise engine runs


@dataclass
class JobView:
    """What ``Pass.validate`` may check about the whole job."""

    passes: list["Pass"]  # the recipe's passes, in order
    calibration: torch.Tensor | None  # the calibration windows (N, seq_len); None: no data
    export: Any = None  # the recipe's ExportConfig
    model_config: Any = None  # the model's transformers config
    model: Any = None  # the model's skeleton (meta parameters: shapes and module classes)


@dataclass(frozen=True)
class Conflict:
    """Why a pass cannot run where the recipe puts it on a Linear (``Pass.conflicts``). The planner
    raises a ``per_layer`` conflict at once, naming the layer; the others it collects, naming every
    layer with the same conflict in one error: ``message (layers)tail``."""

    message: str
    tail: str = ""
    per_layer: bool = True


class Pass:
    """A recipe step: a pydantic ``Config`` (its options), the statistics it needs, which Linears
    it targets, and the stages it takes part in (``STAGES``; each method below is a no-op until a
    pass overrides it). ``apply`` may read and write ``stats`` (the Linear's statistics, shared by
    the passes that run on it in recipe order): a pruning pass leaves its mask there as
    ``stats["mask"]`` (bool (out, in), True = kept) so a later quantizer keeps the zeros."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    stats: ClassVar[tuple[str, ...]] = ()  # statistics per Linear group, for ``apply``
    block_stats: ClassVar[tuple[str, ...]] = ()  # statistics ``transform_block`` observes
    preview_stats: ClassVar[tuple[str, ...]] = ()  # statistics of the preview sweep
    # What the pass does to a Linear ("quantize", "prune", "factorize", "smooth"): the passes
    # around it read this in ``link`` and ``conflicts``; the engine never does.
    effects: frozenset[str] = frozenset()
    absorbed: bool = False  # set by an earlier pass's ``link`` that does this pass's work too

    def __init__(self, config: BaseModel, ctx: Context | None = None):
        self.config = config
        self.ctx = ctx or Context()

    # ---------------------------------------------------------------- what it takes part in

    def in_stage(self, stage: str) -> bool:
        """Whether this pass runs in ``stage``: it overrides the stage's method (the preview: it
        also asks for ``preview_stats``)."""
        if stage == "preview_block" and not self.preview_stats:
            return False
        return getattr(type(self), stage) is not getattr(Pass, stage)

    def needs_calibration(self) -> bool:
        """Whether the pass needs calibration data (a recipe of passes that need none skips it)."""
        return bool(self.stats or self.block_stats or self.preview_stats)

    def matches(self, full_name: str, module: nn.Module) -> bool:
        """Whether ``apply`` runs on this Linear (``targets`` minus ``ignore``)."""
        if not self.in_stage("apply") or not isinstance(module, nn.Linear) or matches_any(full_name, module, self.config.ignore):
            return False
        if getattr(module, "_compress_router", False):  # MoE routers stay in full precision unless named
            return matches_any(full_name, None, self.config.targets)
        return matches_any(full_name, module, self.config.targets)

    # ---------------------------------------------------------------- checks, before any work

    def check(self, full_name: str, module: nn.Linear) -> str | None:
        """A reason this layer cannot take the pass, or None. Reasons that name ``in_features``
        are grouped by it in the error, and ``fix`` says what would work for those widths."""
        return None

    def fix(self, in_features: list[int]) -> str:
        return "list those layers under `ignore`"

    def conflicts(self, planned: list["Pass"]) -> Conflict | None:
        """Why this pass cannot run on a Linear together with ``planned`` (every pass planned on
        it, in recipe order, this one included), or None: each pass states its own ordering rules."""
        return None

    def validate(self, k: int, job: "JobView") -> None:
        """Raise a ``UsageError`` (naming ``passes.{k}.{name}``) if this pass cannot run at index
        ``k`` of the recipe's passes in ``job`` (its place among them, the calibration data, the
        export settings), before any work."""

    def check_sweep(self, sweep) -> None:
        """Raise a ``UsageError`` if this pass cannot run in ``sweep`` (``compress.engine.context.
        Sweep``: the model, its first block, the ranks), before any block is compressed."""

    def link(self, later: list["Pass"]) -> None:
        """Called once before the sweep with the passes after this one in the recipe."""

    # ---------------------------------------------------------------- the stages

    def preview_block(self, prefix: str, stats: dict[str, dict], weights: dict[str, torch.Tensor], probe=None) -> None:
        """Stage preview_block. ``probe(name, W)``: (the block output's squared error, the Linear's
        output squared error) on one calibration batch when Linear ``name`` alone computes with W
        instead: how much of a layer's error reaches the residual stream."""

    def preview_done(self) -> None:
        """After the last block of the preview."""

    def transform_block(self, stage) -> dict[str, dict]:
        """Stage transform_block: change ``stage.block`` before its Linears are compressed (what it
        computes stays the same; smoothing folds scales). ``stage`` (``compress.engine.block.
        BlockStage``) observes statistics (``stage.observe(names, stats)``) and runs parts of the
        block (``stage.probe``). Returns report notes per full Linear name."""
        return {}

    def apply(self, full_name: str, module: nn.Linear, stats: dict[str, Any]) -> tuple[nn.Module, dict]:
        """Stage apply: the module to put in place of this Linear, and report info."""
        raise NotImplementedError

    def train_block(self, stage) -> None:
        """Stage train_block: train ``stage.block`` (its compressed modules) against
        ``stage.teacher``, the original block, on the block's calibration inputs
        (``compress.engine.block.TrainStage``), and add to ``stage.layers``' reports."""

    def apply_outside(self, stage) -> dict[str, tuple[nn.Module, dict]]:
        """Stage apply_outside: compress modules outside the decoder blocks. ``stage``
        (``compress.engine.outside.OutsideStage``) names the token embedding and the output head
        (tied or not) and reads their weights. Returns {full module name: (the module to store in
        its place, report info)}; runs once, before block 0."""
        return {}

    def transform_model(self, stage) -> dict:
        """Stage transform_model: read the checkpoint ``stage.checkpoint``, write the transformed
        one to ``stage.output`` (``compress.engine.model.ModelStage``). Returns report sections."""
        return {}

    def summarize(self, layers: list[dict]) -> dict:
        """Sections this pass adds to the run's report after the sweep (``layers``: the report's
        per-Linear entries)."""
        return {}

    def report_eval(self, section: dict, after: dict, before: dict) -> None:
        """With a transform_model stage: add to ``section`` (what ``transform_model`` returned)
        from the evaluation of the checkpoint after and before the stage."""

    # ---------------------------------------------------------------- export

    def export_metadata(self, layers: list, export) -> dict:
        """Sections this pass adds to the export's ``compress.json`` (``layers``: every
        ``LayerReport`` of the run; ``export``: the recipe's ExportConfig)."""
        return {}


def exclusive(p: Pass, planned: list[Pass], effect: str, what: str) -> Conflict | None:
    """A ``Conflict`` when another pass planned on the same Linear also has ``effect``."""
    same = [q for q in planned if effect in q.effects]
    if effect in p.effects and len(same) > 1:
        return Conflict(f"targeted by two {what} passes ({', '.join(q.name for q in planned)}); use `ignore` on one of them")
    return None


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

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str, where: str = "passes") -> type[Pass]:
    load_families()  # the built-in families register their passes on import
    if name not in _REGISTRY:
        for ep in entry_points(group="compress.passes"):
            if ep.name == name:
                register(ep.load())
    if name not in _REGISTRY:
        raise UsageError(f"{where}: unknown pass {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    load_families()  # the built-in families register their passes on import
    return sorted(_REGISTRY)
