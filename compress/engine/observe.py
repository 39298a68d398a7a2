"""Observe: hooks on a block's Linears feed the statistics the passes declare (``compress.passes.STATS``).

Every statistic is a sum (or max) over calibration tokens, so ranks all-reduce it once per
group. Linears that read the very same input tensor (q/k/v, gate/up) share one set of statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.arch.adapt import calibrating
from compress.engine.context import BlockRun
from compress.engine.dist import World
from compress.engine.inputs import Stop
from compress.passes import PAIRED, STATS
from compress.utils import first_output, get_module


def empty_stats(block: nn.Module, names: list[str], needed: set) -> dict[str, dict]:
    """{Linear name: {statistic: its empty state}} for the Linears ``names`` of ``block``, on the
    Linear's device."""
    out = {}
    for n in names:
        lin = get_module(block, n)
        dev = lin.weight.device
        out[n] = {s: {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in STATS[s][0](lin.in_features).items()} for s in needed}
    return out


class Accumulator:
    """Adds each Linear's input to its statistics, unless another Linear read the very same tensor
    in this forward (then it shares that one's statistics: nothing is computed twice)."""

    def __init__(self, stats: dict[str, dict]):
        self.stats = stats
        self.alias: dict[str, str] = {}  # Linear -> the twin whose statistics it shares
        self.seen: dict[str, torch.Tensor] = {}  # this forward's inputs, by Linear

    def add(self, name: str, x: torch.Tensor, wanted, ref: torch.Tensor | None = None) -> None:
        """``ref``: the original model's input of the same Linear, for the paired statistics."""
        twin = next((n for n, t in self.seen.items() if t is x), None)
        if twin is not None:
            self.alias[name] = twin
        elif name not in self.alias:
            for s in wanted:
                if s in PAIRED:
                    STATS[s][1](self.stats[name][s], x, ref)
                else:
                    STATS[s][1](self.stats[name][s], x)
        self.seen[name] = x

    def reduced(self, world: World) -> dict[str, dict]:
        """Under torchrun every rank saw its own batches: sum (or max) the statistics over the
        ranks, each once (twins are copied after)."""
        world.reduce_stats({n: st for n, st in self.stats.items() if n not in self.alias})
        for n, twin in self.alias.items():
            self.stats[n] = self.stats[twin]
        return self.stats


@torch.no_grad()
def observe(run: BlockRun, names: list[str], needed: set, limit: dict[str, int | None] | None = None,
            keep: dict[str, dict] | None = None) -> dict[str, dict]:
    """Run the block on every calibration batch, hooks accumulating statistics for ``names``.
    The forward of a batch ends as soon as every Linear of the group has seen its input.
    ``limit``: statistics accumulated on only the first that many batches (None: all); the
    loop stops once no statistic wants more. ``keep``: {name: {}} filled with the input each of
    those Linears saw, per batch. ``run.reference``: the uncompressed block, run first on the
    original activations (``inputs.reference``) of each batch for the paired statistics."""
    keep, limit = keep or {}, limit or {}
    if not needed:  # nothing to collect: no forward
        return {n: {} for n in names}
    acc = Accumulator(empty_stats(run.block, names, needed))
    ref_x: dict[str, torch.Tensor] = {}  # the original block's input of each Linear, this batch
    paired = run.reference is not None and bool(needed & PAIRED)

    def ref_hook_for(name):
        def hook(mod, args):
            ref_x[name] = args[0]
            if len(ref_x) == len(names):
                raise Stop

        return hook

    def hook_for(name):
        def hook(mod, args):
            x = args[0]
            acc.add(name, x, [s for s in needed if limit.get(s) is None or run.cursor[0] < limit[s]], ref_x.get(name))
            if name in keep:
                keep[name][run.cursor[0]] = x.detach()
            if len(acc.seen) == len(names):
                raise Stop

        return hook

    handles = [get_module(run.block, n).register_forward_pre_hook(hook_for(n)) for n in names]
    if paired:
        handles += [get_module(run.reference, n).register_forward_pre_hook(ref_hook_for(n)) for n in names]
    try:
        _observe_batches(run, acc, needed, limit, ref_x if paired else None)
    finally:
        for hd in handles:
            hd.remove()
    return acc.reduced(run.sweep.world)


def _observe_batches(run: BlockRun, acc: Accumulator, needed: set, limit: dict, ref_x: dict | None) -> None:
    dev = run.sweep.device
    with calibrating(run.block):  # MoE: every expert observes every token (the routed sum is unchanged)
        for b, (a, k) in enumerate(run.kwargs):
            if all(limit.get(s) is not None and b >= limit[s] for s in needed):
                break
            run.cursor[0] = b
            acc.seen.clear()
            if ref_x is not None:
                ref_x.clear()
                try:
                    run.reference(run.inputs.reference[b].to(dev), *a, **k)
                except Stop:
                    pass
            try:
                run.block(run.inputs.get(b, dev), *a, **k)
            except Stop:
                pass


class BlockProbe:
    """Lets a block-transforming pass (smoothing) run parts of the block on the calibration inputs."""

    def __init__(self, run: BlockRun):
        self.run = run
        self.block, self.world = run.block, run.sweep.world

    def reduce(self, value: float) -> float:
        """A loss measured on this rank's windows, summed over the ranks (every rank then makes
        the same choice; one process: the value itself)."""
        return self.world.sum(value)

    @torch.no_grad()
    def module_inputs(self, path: str, samples: int) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) submodule ``path`` receives on about ``samples`` calibration
        windows (whole batches, evenly spread over the calibration set)."""
        run = self.run
        hidden = run.inputs.hidden
        per = hidden[0].shape[0]
        k = min(len(hidden), max(1, -(-samples // per)))
        picks = sorted({round(j * (len(hidden) - 1) / max(k - 1, 1)) for j in range(k)})
        captured: list = []

        def hook(mod, args, kwargs):
            captured.append((args, kwargs))
            raise Stop

        h = get_module(self.block, path).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for b in picks:
                run.cursor[0] = b
                a, kw = run.kwargs[b]
                try:
                    self.block(run.inputs.get(b, self.world.device), *a, **kw)
                except Stop:
                    pass
        finally:
            h.remove()
        return captured


def typical_energy(probe) -> float:
    """The block output's size on the probe batch without its outliers: the median token's
    ‖y_t‖² times the number of tokens (summed over ranks). A few massive-activation tokens (the
    first token of SmolLM2 carries 98% of the energy from block 11 on) would otherwise make every
    error there look small."""
    e = probe.y.float().pow(2).sum(-1).flatten()  # (tokens,)
    return probe.world.sum(float(e.median()) * e.numel())


class BlockErrorProbe:
    """``probe(name, W)`` for ``Pass.preview_block``: runs the block on its first calibration batch
    with Linear ``name`` computing with W, and returns (‖Δ block output‖², ‖Δ Linear output‖²).
    ``energy``: ‖block output‖² on that batch (the residual stream's size there)."""

    def __init__(self, block, x, y, args_kwargs, world: World | None = None):
        self.block, self.x, self.y, (self.args, self.kwargs) = block, x, y, args_kwargs
        self.world = world or World()  # under torchrun: sums over every rank's first batch
        self.energy = self.world.sum(float(y.float().pow(2).sum()))

    @torch.no_grad()
    def __call__(self, name: str, W: torch.Tensor) -> tuple[float, float]:
        lin = get_module(self.block, name)
        W0 = lin.weight.data
        seen = []
        h = lin.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        lin.weight.data = W.to(W0.dtype)
        try:
            out = first_output(self.block(self.x, *self.args, **self.kwargs)).float()
        finally:
            lin.weight.data = W0
            h.remove()
        x = seen[0].reshape(-1, W.shape[1]).float()
        dW = (W.float() - W0.float()).to(x.device)
        return self.world.sum(float((out - self.y).pow(2).sum())), self.world.sum(float((x @ dW.T).pow(2).sum()))
