"""The ``prune_structured`` pass: a smaller dense model of the same family (recipe
``- prune_structured: {params: 0.75}``; ``compress prune MODEL --structured --params 0.75``).

A model-scope pass (stage transform_model), first in the recipe: it reads the whole uncompressed
checkpoint, measures it on the calibration windows (``compress.prune.importance``), chooses a
shape (explicit widths, or the search over shapes that meet a parameter budget), removes the
least important heads, channels, hidden dimensions and blocks, refits the consuming Linears by
least squares (``repair``), and writes an ordinary checkpoint with the smaller config. Passes after
it (a quantizer's sweep, ``- distill: {}``) run on that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.api.common import storage_dtype
from compress.checkpoint.files import RETRY, write_model
from compress.checkpoint.source import cache_dir
from compress.errors import UsageError
from compress.passes import Pass, register
from compress.prune.importance import Stats, collect, collect_grads
from compress.prune.shapes import (
    DIMS,
    Shape,
    budget_shapes,
    build,
    count_params,
    kl_to,
    original_shape,
    select,
    shape_problem,
    smallest_params,
)
from compress.prune.structured import UnknownCoupling, check_family
from compress.utils import DiskError, atomic_write, peak_rss_mb

WIDTHS = ("hidden", "heads", "kv_heads", "intermediate", "layers")


class StructuredConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # share of the model's parameters kept (every parameter, embeddings included); the search
    # picks the shape
    params: float | None = Field(None, gt=0, lt=1)
    # explicit widths (the others stay the model's): a standard config, uniform across blocks
    hidden: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)  # query heads
    kv_heads: int | None = Field(None, ge=1)
    intermediate: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=0)
    dims: list[Literal["hidden", "heads", "intermediate", "layers"]] = list(DIMS)  # what the budget search may shrink
    depth: Literal["angular", "kl"] = "angular"  # block importance: hidden-state change, or KL when skipped
    importance: Literal["activation", "taylor"] = "activation"  # width importance (module compress.prune.importance)
    repair: bool = True  # least-squares refit of the Linears that lose input columns
    candidates: int = Field(6, ge=1)  # shapes the search measures repaired (the best of its unrepaired first cut)
    score_windows: int = Field(4, ge=1)  # calibration windows each candidate is scored on (KL to the original)
    multiple: int = Field(64, ge=1)  # the search's hidden and MLP widths are multiples of this

    @model_validator(mode="after")
    def _one_target(self):
        explicit = [f for f in WIDTHS if getattr(self, f) is not None]
        if self.params is None and not explicit:
            raise ValueError("give a parameter budget (params: 0.75) or widths (hidden, heads, kv_heads, intermediate, layers)")
        if self.params is not None and explicit:
            raise ValueError(f"params and explicit widths ({', '.join(explicit)}) both given; give one")
        if not self.dims:
            raise ValueError("dims: at least one of hidden, heads, intermediate, layers")
        return self


@register
class StructuredPass(Pass):
    name = "prune_structured"
    Config = StructuredConfig
    effects = frozenset({"prune_structured"})

    def in_stage(self, stage: str) -> bool:
        return stage == "transform_model"

    def needs_calibration(self) -> bool:
        return True

    def validate(self, k, job):
        where = f"passes.{k}.{self.name}"
        if k != 0:
            raise UsageError(f"{where}: structured pruning changes the model's shape and reads its dense weights; put it first "
                             f"(the passes after it compress the smaller model), not after {job.passes[k - 1].name}")
        if job.calibration is None:
            raise UsageError("calibration.samples: structured pruning measures importance on calibration windows; set it > 0")
        try:
            check_family(job.model_config)
        except UnknownCoupling as e:
            raise UsageError(f"{where}: {e}") from None
        if self.config.params is None:
            problem = shape_problem(job.model_config, self.explicit_shape(job.model_config))
            if problem:
                raise UsageError(f"{where}: {problem}")
            return
        self.check_budget(job.model_config, where)

    def explicit_shape(self, config) -> Shape:
        o = original_shape(config)
        return replace(o, **{f: getattr(self.config, f) for f in WIDTHS if getattr(self.config, f) is not None})

    def check_budget(self, config, where: str) -> None:
        total = count_params(config)
        target = int(self.config.params * total)
        if not budget_shapes(config, target, tuple(self.config.dims), self.config.multiple):
            smallest = smallest_params(config, tuple(self.config.dims), self.config.multiple)
            raise UsageError(f"{where}.params: {self.config.params} of {total:,} parameters is {target:,}; the smallest shape "
                             f"the search reaches shrinking {', '.join(self.config.dims)} has {smallest:,} "
                             f"({smallest / total:.1%}); raise params, allow more dims, or give explicit widths")

    # ---------------------------------------------------------------- the stage

    def transform_model(self, stage) -> dict:
        from transformers import AutoConfig, AutoModelForCausalLM

        t0, log = time.time(), getattr(stage.hooks, "log", lambda m: None)
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint, dtype=torch.float32).eval()
        config, dtype = model.config, storage_dtype(AutoConfig.from_pretrained(stage.checkpoint))  # as stored, not as loaded
        windows = stage.calibration
        stats = self._measure(model, stage, log)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        held = windows[-self.config.score_windows:]
        with torch.no_grad():
            ref = [model(input_ids=x[None], use_cache=False).logits[0] for x in held]
        layer_scores = _skip_kl(model, ref, held) if self.config.depth == "kl" else None
        shape, tried = self._choose(state, config, stats, layer_scores, ref, held, log)
        keep = select(state, config, stats, shape, layer_scores)
        pruned = build(state, config, keep, stats, self.config.repair)
        section = {
            "shape_before": asdict(original_shape(config)), "shape_after": asdict(shape),
            "params_before": count_params(config), "params_after": count_params(pruned.config),
            "layers_kept": keep.layers, "kl": round(kl_to(ref, pruned, held), 5), "candidates": tried,
            "importance": self.config.importance, "depth": self.config.depth, "repair": self.config.repair,
            "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb(),
        }
        section["params_kept"] = round(section["params_after"] / section["params_before"], 4)
        log(f"structured pruning: {shape.words()}: {section['params_after']:,} of {section['params_before']:,} parameters "
            f"({section['params_kept']:.1%})")
        del model
        kept = {"hidden_kept": keep.hidden.tolist()} if keep.hidden is not None else {}
        _write(stage.checkpoint, pruned.to(dtype), stage.output, section | kept, stage.overwrite)
        return {"prune_structured": section}

    def _measure(self, model, stage, log) -> Stats:
        """The calibration statistics (``compress.prune.importance.collect``), cached on disk by the
        checkpoint's files, the windows and the importance kind: a second budget or shape on the
        same model and data skips the measuring forward (the costly part: every Σ x xᵀ)."""
        windows = stage.calibration
        h = hashlib.sha256(json.dumps([self.config.importance, list(windows.shape)]).encode())
        h.update(windows.numpy().tobytes())
        for f in sorted(Path(stage.checkpoint).glob("*.safetensors")) + [Path(stage.checkpoint) / "config.json"]:
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        cache = cache_dir() / "structured" / f"{h.hexdigest()[:24]}.pt"
        if cache.is_file():
            log(f"structured pruning: the statistics of {stage.checkpoint} on these windows are cached ({cache})")
            return Stats(**torch.load(cache, weights_only=False))
        log(f"structured pruning: measuring {stage.checkpoint} on {len(windows)} calibration windows")
        stats = collect(model, windows, batch_size=4, progress=lambda d, n: _progress(stage.hooks, d, n))
        if self.config.importance == "taylor":
            stats.grads = collect_grads(model, windows)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda tmp: torch.save(asdict(stats), tmp))
        except (OSError, DiskError) as e:  # a cache, not an output: a full or read-only cache folder costs the next run time only
            log(f"structured pruning: statistics not cached ({e})")
        return stats

    def _choose(self, state, config, stats, layer_scores, ref, held, log) -> tuple[Shape, list[dict]]:
        if self.config.params is None:
            return self.explicit_shape(config), []
        target = int(self.config.params * count_params(config))
        shapes = budget_shapes(config, target, tuple(self.config.dims), self.config.multiple)
        if len(shapes) > self.config.candidates:  # a first cut: every shape pruned without repair, on one window
            quick = {s: kl_to(ref[:1], build(state, config, select(state, config, stats, s, layer_scores), stats, False), held[:1])
                     for s, _ in shapes}
            shapes = sorted(shapes, key=lambda x: quick[x[0]])
            log(f"  {len(quick)} shapes meet the budget; measuring the {self.config.candidates} best without repair")
        tried = []
        for s, n in shapes[: self.config.candidates]:
            m = build(state, config, select(state, config, stats, s, layer_scores), stats, self.config.repair)
            tried.append({**asdict(s), "params": n, "kl": round(kl_to(ref, m, held), 5)})
            log(f"  candidate {s.words()}: {n:,} parameters, KL {tried[-1]['kl']}")
        best = min(tried, key=lambda t: t["kl"])
        return Shape(**{f: best[f] for f in WIDTHS}), tried


@torch.no_grad()
def _skip_kl(model, ref, windows) -> dict[int, float]:
    """Each block's importance as the KL divergence from the original when it alone is skipped."""
    layers = model.model.layers
    out = {}
    for i in range(len(layers)):
        model.model.layers = torch.nn.ModuleList([b for j, b in enumerate(layers) if j != i])
        try:
            out[i] = kl_to(ref, model, windows)
        finally:
            model.model.layers = layers
    return out


def _write(src: Path, model, target: Path, section: dict, overwrite: bool) -> None:
    """The pruned model as an ordinary checkpoint at ``target``, its compress.json ``structured``."""
    meta = {"format": "compress.checkpoint/1", "structured": {k: v for k, v in section.items() if k != "candidates"}}
    write_model(src, model, target, meta, overwrite, f"{RETRY} (the pruning is recomputed from the source)")


def _progress(hooks, done, total):
    if hooks is not None:
        hooks.progress("measure", done, total)
