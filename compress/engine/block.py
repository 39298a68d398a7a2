"""One block's turn in the sweep: its stages, in order.

1. transform_block: passes that change the block before its Linears (smoothing) observe it and
   fold their changes in;
2. apply: for each group of Linears in forward order (q/k/v, then o, then gate/up, then down —
   see ``compress.arch.families``), hooks collect the statistics the passes need while the block
   runs on the calibration batches, then the passes transform the group's Linears in recipe
   order, so the next group is calibrated on what the compressed model will feed it;
3. train_block: passes that train the finished block against the original one;
4. propagate: the compressed block runs once more to make the inputs of the next block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.arch.families import linear_groups, replay_input_points, replay_points
from compress.engine.context import BlockRun
from compress.engine.dist import to_cpu
from compress.engine.observe import BlockProbe, observe
from compress.engine.records import LayerReport
from compress.modules import dense_weight, factors
from compress.passes import Pass
from compress.utils import first_output, get_module, replace_linear

# the most memory the kept inputs of _ReplayInput may take (float32 activations of every
# calibration token); above it the submodule simply runs again
REPLAY_INPUT_BYTES = 1 << 30


class _Replay(nn.Module):
    """Stands in for a submodule whose output no longer changes during a block's calibration (all
    its Linears are compressed): computes it once per calibration batch, then replays it."""

    def __init__(self, inner: nn.Module, cursor: list[int]):
        super().__init__()
        self.inner, self.cursor, self.cache = inner, cursor, {}

    def forward(self, *args, **kwargs):
        b = self.cursor[0]
        if b not in self.cache:
            self.cache[b] = self.inner(*args, **kwargs)
        return self.cache[b]


class _ReplayInput(_Replay):
    """Stands in for a submodule whose output is one Linear applied to an input that is final
    (an MLP once gate/up are compressed: ``down_proj(act(gate(x)) · up(x))``): applies the Linear,
    as it is now, to that input kept per calibration batch, skipping the rest of the submodule."""

    def __init__(self, inner: nn.Module, linear: str, kept: dict[int, torch.Tensor], cursor: list[int]):
        super().__init__(inner, cursor)
        self.linear, self.kept = linear, kept

    def forward(self, *args, **kwargs):
        return get_module(self.inner, self.linear)(self.kept[self.cursor[0]])


# ---------------------------------------------------------------- stage: transform_block


class BlockStage:
    """What ``Pass.transform_block`` sees: one block before its Linears are compressed.

    ``block``, ``prefix`` ("model.layers.3."), ``model_type``, ``dtype`` (the checkpoint's),
    ``targets(p)`` (the Linears planned for pass p), ``observe(names, stats)`` (run the block on the
    calibration batches, collecting ``stats`` of the Linears ``names``), ``probe`` (runs parts of
    the block: ``compress.engine.observe.BlockProbe``)."""

    def __init__(self, run: BlockRun):
        self.run = run
        self.block, self.prefix, self.model_type = run.block, run.prefix, run.sweep.model_type
        self.probe = BlockProbe(run)
        self.known: dict[str, dict] = {}  # the last observation's statistics (the apply stage may reuse its XᵀX)

    def targets(self, p: Pass) -> list[str]:
        return self.run.targeted([n for n, _ in self.block.named_modules()], p)

    def observe(self, names: list[str], stats) -> dict[str, dict]:
        self.known = observe(self.run, names, set(stats))
        return self.known


def transform_block(run: BlockRun, passes: list[Pass]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each pass in recipe order observes the (already transformed) block and changes it. Returns
    per-Linear notes for the report, and the last observation's Hessians (of the transformed
    block's inputs; a pass that folds scales updates them), which the apply stage reuses where
    no later pass needs fresh statistics."""
    notes: dict[str, dict] = {}
    stage = BlockStage(run)
    for p in passes:
        for k, v in p.transform_block(stage).items():
            notes.setdefault(k, {}).update(v)
    return notes, {n: {"hessian": st["hessian"]} for n, st in stage.known.items() if "hessian" in st}


# ---------------------------------------------------------------- stage: apply


@dataclass
class Solved:
    """One Linear after the recipe's passes: its module, report info, pass names, whether a
    pruning pass left a mask."""

    module: nn.Module
    info: dict
    passes: list[str]
    masked: bool


def _apply_factors(p: Pass, full: str, mod: nn.Module, st: dict) -> tuple[nn.Module, dict]:
    """A pass after a factorizing one (lowrank) compresses each factor in turn, in forward order:
    A on the layer's input statistics, B on those of A's (compressed) output, H_B = Â·H·Âᵀ (the
    factorizing pass admits only later passes whose statistics derive this way)."""
    infos: dict = {}
    fst = {k: v for k, v in st.items() if k == "hessian"}
    for f, sub in factors(mod).items():
        new, info = p.apply(f"{full}.{f}", sub, fst)
        setattr(mod, f, new)
        infos.update({f"{f}.{k}": v for k, v in info.items()})
        if "hessian" in fst:
            Aq = dense_weight(new)
            fst = {"hessian": {"H": Aq @ fst["hessian"]["H"] @ Aq.T, "n": fst["hessian"]["n"]}}
    return mod, infos


def solve(run: BlockRun, name: str, stats: dict) -> Solved:
    """The recipe's passes on one Linear, in order."""
    full, mod = run.prefix + name, get_module(run.block, name)
    infos, names = {}, []
    st = dict(stats)  # twins share one statistics dict; a pass's mask is this Linear's own
    for p in run.sweep.plan[full]:
        new, info = _apply_factors(p, full, mod, st) if factors(mod) else p.apply(full, mod, st)
        infos.update(info)
        names.append(p.name)
        mod = new
    return Solved(mod, infos, names, "mask" in st)


def _solve_group(run: BlockRun, targeted: list[str], stats: dict[str, dict]) -> tuple[dict[str, Solved], dict[str, torch.Tensor]]:
    """Under torchrun, Linear k of the group is solved on rank k mod N and every rank gets every
    result (with each Linear's original weight, for the report). One process: nothing yet."""
    world = run.sweep.world
    if not world.distributed:
        return {}, {}
    W0s = {n: get_module(run.block, n).weight.detach().float().clone() for n in targeted}
    mine = {n: to_cpu(solve(run, n, stats[n])) for k, n in enumerate(targeted) if world.owner(k) == world.rank}
    solved: dict[str, Solved] = {}
    for part in world.all_gather(mine):
        solved.update(part)
    for s in solved.values():
        s.module = s.module.to(world.device)
    return solved, W0s


def _layer_report(run: BlockRun, name: str, s: Solved, W0: torch.Tensor, Wq: torch.Tensor, st: dict) -> LayerReport:
    """The report of one compressed Linear (original weight W0, compressed Wq): its output error
    on the calibration inputs it saw (relative, through XᵀX), or without calibration data the
    weight's own relative error."""
    if s.masked:  # a pruning pass ran: report what the final weight keeps
        s.info["sparsity"] = round(float((Wq == 0).float().mean()), 6)
        s.info["weights"] = Wq.numel()
    err = None
    D = Wq - W0
    if "hessian" in st:
        H = st["hessian"]["H"]
        err = float(torch.sum((D @ H) * D) / torch.sum((W0 @ H) * W0).clamp_min(1e-30))
    elif run.inputs is None:
        s.info["rel_weight_error"] = float(D.pow(2).sum() / W0.pow(2).sum().clamp_min(1e-30))
    return LayerReport(run.prefix + name, s.passes, err, s.info)


def _put_in_place(run: BlockRun, name: str, mod: nn.Module, Wq: torch.Tensor) -> None:
    """Until the block is finished, later groups and the propagation see the compressed weight
    through a plain Linear: dequantizing once, not on every batch. A module that also rounds
    its input (W8A8) is put in place at once: its rounding of the activations is part of what the
    later groups are calibrated on."""
    if getattr(mod, "quantizes_activations", False):
        replace_linear(run.block, name, mod)
    else:
        orig = get_module(run.block, name)
        orig.weight.data = Wq.to(orig.weight.dtype)


class ApplyStage:
    """The apply stage of one block: group by group, observe then compress."""

    def __init__(self, run: BlockRun, known: dict[str, dict] | None):
        self.run, self.known = run, known or {}
        sweep = run.sweep
        grouped = sweep.options.sequential and sweep.options.propagate
        model_type = sweep.model_type if grouped else ""  # "": one group of every Linear
        self.groups = linear_groups(run.block, model_type)
        self.replays = replay_points(run.block, model_type)
        keep = sweep.options.keep_mlp_inputs and sweep.options.propagate
        self.replay_inputs = replay_input_points(run.block, model_type) if keep else {}
        self.layers: list[LayerReport] = []
        self.final: dict[str, nn.Module] = {}  # compressed modules, put in place once the block is done
        self.masked: set[str] = set()  # Linears a pruning pass masked (for train_block)

    def run_all(self) -> list[LayerReport]:
        run, sweep = self.run, self.run.sweep
        if run.inputs is not None and not sweep.needed and not self.known:
            # No pass calibrates on statistics (rtn): the weights do not depend on what the later
            # groups see, and the report's error needs only each Linear's input Hessian. One forward
            # over the block observes every group at once instead of one forward per group.
            report = {"hessian": sweep.error_batches} if sweep.error_batches != 0 else {}
            self.known = observe(run, run.targeted([n for g in self.groups for n in g]), set(report), report)
        for gi, group in enumerate(self.groups):
            self.group(gi, run.targeted(group))
        run.block._compress_final = self.final
        return self.layers

    def _statistics(self, gi: int, targeted: list[str], keep_inputs: dict) -> dict[str, dict]:
        run, sweep = self.run, self.run.sweep
        if not targeted or run.inputs is None:
            return {n: {} for n in targeted}
        if not sweep.needed and self.known and all(n in self.known for n in targeted):
            # only the report's error needs H here (rtn, or awq quantizing itself): the
            # transform stage's Hessians save a calibration forward per group
            return {n: self.known[n] for n in targeted}
        # the Hessian for the report alone is sampled (error_batches); passes that need it get it
        # on every calibration token
        extra = {} if "hessian" in sweep.needed or sweep.error_batches == 0 else {"hessian": sweep.error_batches}
        if sweep.needed and gi in self.replay_inputs:  # the observe runs every batch: keep what it sees
            tokens = sum(h.shape[0] * h.shape[1] for h in run.inputs.hidden)
            for path, lin in self.replay_inputs[gi]:
                if lin in targeted and tokens * get_module(run.block, lin).in_features * 4 <= REPLAY_INPUT_BYTES:
                    keep_inputs[lin] = {}
        return observe(run, targeted, sweep.needed | set(extra), extra, keep_inputs)

    def group(self, gi: int, targeted: list[str]) -> None:
        run = self.run
        keep_inputs: dict[str, dict] = {}  # inputs kept for _ReplayInput (by Linear name)
        stats = self._statistics(gi, targeted, keep_inputs)
        solved, W0s = _solve_group(run, targeted, stats)
        for name in targeted:
            W0 = W0s.pop(name) if name in W0s else get_module(run.block, name).weight.detach().float().clone()
            s = solved.pop(name) if name in solved else solve(run, name, stats[name])
            Wq = dense_weight(s.module)
            self.layers.append(_layer_report(run, name, s, W0, Wq, stats[name]))
            self.final[name] = s.module
            if s.masked:
                self.masked.add(name)
            _put_in_place(run, name, s.module, Wq)
            stats[name] = {}  # free the Hessian now
            self.known.pop(name, None)
        for path in self.replays.get(gi, []):
            replace_linear(run.block, path, _Replay(get_module(run.block, path), run.cursor))
        for path, lin in self.replay_inputs.get(gi, []):
            if keep_inputs.get(lin):
                replace_linear(run.block, path, _ReplayInput(get_module(run.block, path), lin[len(path) + 1 :], keep_inputs.pop(lin), run.cursor))


def finish_block(block: nn.Module) -> None:
    """Unwrap replayed submodules; swap the compressed modules in for export."""
    for name, mod in list(block.named_modules()):
        if isinstance(mod, _Replay):
            replace_linear(block, name, mod.inner)
    for name, mod in getattr(block, "_compress_final", {}).items():
        replace_linear(block, name, mod)
    block.__dict__.pop("_compress_final", None)


# ---------------------------------------------------------------- stage: train_block


@dataclass
class TrainStage:
    """What ``Pass.train_block`` sees: the finished block, the original one, its inputs."""

    block: nn.Module  # compressed modules in place
    teacher: nn.Module  # a copy of the block as it was before any stage
    hidden: list[torch.Tensor]  # the block's calibration inputs, per batch, on the device
    kwargs: list[tuple[tuple, dict]]  # its forward's (args, kwargs), per batch
    prefix: str
    masked: set[str]  # Linears (names within the block) a pruning pass masked: their zeros stay
    layers: list[LayerReport] = field(default_factory=list)  # this block's reports, to add to


def train_block(run: BlockRun, passes: list[Pass], teacher: nn.Module, layers: list[LayerReport], masked: set[str]) -> None:
    finish_block(run.block)
    dev = run.sweep.device
    stage = TrainStage(run.block, teacher, [run.inputs.get(b, dev) for b in range(len(run.inputs.hidden))], run.kwargs,
                       run.prefix, masked, layers)
    with torch.enable_grad():
        for p in passes:
            p.train_block(stage)


# ---------------------------------------------------------------- the block's turn


def _propagate(run: BlockRun, original: list[torch.Tensor] | None) -> None:
    """The block's outputs become the next block's inputs: the uncompressed block's (``original``,
    propagate: false), else the compressed block's, computed batch by batch in place."""
    inputs, dev = run.inputs, run.sweep.device
    if original is not None:
        for b, y in enumerate(original):
            inputs.put(b, y)
        return
    for b, (a, k) in enumerate(run.kwargs):
        run.cursor[0] = b
        # in place: batch b's input is freed as soon as its output exists
        inputs.put(b, first_output(run.block(inputs.get(b, dev), *a, **k)).detach().float())


def _advance_reference(run: BlockRun) -> None:
    """The original model's activations move on to the next block (for paired statistics)."""
    dev = run.sweep.device
    for b, (a, k) in enumerate(run.kwargs):
        y = first_output(run.reference(run.inputs.reference[b].to(dev), *a, **k)).detach().float()
        run.inputs.reference[b] = run.inputs.kept(y)
    run.reference = None


@torch.no_grad()
def run_block(run: BlockRun) -> list[LayerReport]:
    """Every stage of one block, then move the activations on to the next block."""
    sweep, inputs, dev = run.sweep, run.inputs, run.sweep.device
    original = None
    if inputs is not None and not sweep.options.propagate:  # the uncompressed block's outputs feed the next block
        original = [first_output(run.block(inputs.get(b, dev), *a, **k)).detach().float() for b, (a, k) in enumerate(run.kwargs)]
    trainers = sweep.taking_part("train_block")
    if inputs is not None and inputs.reference is not None:
        run.reference = copy.deepcopy(run.block)
    teacher = copy.deepcopy(run.block) if trainers and inputs is not None else None  # the original block
    transformers = sweep.taking_part("transform_block")
    notes, known = transform_block(run, transformers) if transformers else ({}, {})
    apply = ApplyStage(run, known)
    layers = apply.run_all()
    if run.reference is not None:
        _advance_reference(run)
    for rep in layers:
        rep.info.update(notes.get(rep.name, {}))
    if teacher is not None:
        train_block(run, trainers, teacher, layers, apply.masked)
        del teacher
    if inputs is not None:
        _propagate(run, original)
    return layers
