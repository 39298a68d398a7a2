"""The layer-wise engine: compress a model one decoder block at a time.

For block i (only its weights, its statistics and the cached activations are in memory):

1. its inputs are the outputs of block i-1 (already compressed), cached on the CPU;
2. for each group of Linears in forward order (q/k/v, then o, then gate/up, then down — see
   ``compress.arch.families``), hooks collect the statistics the passes need while the block runs on
   the calibration batches; the forward stops early once the group has seen its inputs;
3. the passes transform the group's Linears in recipe order, so the next group is calibrated on
   what the compressed model will really feed it ("true sequential");
4. the compressed block runs once more to make the inputs of block i+1;
5. the finished block goes to the sink (the exporter) and its weights are freed.

The first step of all, capturing block 0's inputs and the keyword arguments every block gets
(attention masks, rotary tables), runs the model's own forward with each block replaced by a
recorder, so masks and position embeddings are exactly what the model would compute.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from compress.arch.adapt import calibrating
from compress.arch.families import (
    find_blocks,
    linear_groups,
    replay_input_points,
    replay_points,
    smooth_points,
)
from compress.checkpoint.source import ModelSource, materialize, release
from compress.engine.dist import World, moved, to_cpu
from compress.errors import UsageError
from compress.modules import dense_weight
from compress.passes import PAIRED, STATS, Pass
from compress.utils import first_output, get_module, replace_linear, trim_heap


class _Stop(Exception):
    """Raised by a hook to end a block's forward once the needed inputs are seen."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` during the capture pass: records its inputs."""

    def __init__(self, index: int, last: int, sink: list):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "cache_position")}
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.index == self.last:
            raise _Stop
        return hidden_states


@dataclass
class BlockInputs:
    """Calibration activations entering one block, batched, plus each block's forward kwargs.

    hidden  list of (B, T, hidden) float32 tensors, one per batch
    kwargs  kwargs[i][b]: the keyword arguments block i receives for batch b
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[tuple[tuple, dict]]]
    # the uncompressed model's activations entering the same block, where a paired statistic
    # (compress.passes.PAIRED) needs them
    reference: list[torch.Tensor] | None = None
    # "device": the activations stay on the compute device; "cpu": they live in (pinned) CPU
    # memory and each batch is moved to the device when a block runs on it (``offload``)
    home: str = "device"

    def get(self, b: int, device: torch.device) -> torch.Tensor:
        """Batch ``b``'s activations on ``device``."""
        h = self.hidden[b]
        return h if h.device == device else h.to(device, non_blocking=True)

    def put(self, b: int, h: torch.Tensor) -> None:
        """Store batch ``b``'s new activations where they live."""
        self.hidden[b] = self.kept(h)

    def kept(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` where this set's activations live (the device, or pinned CPU memory)."""
        return h if self.home == "device" else _to_home(h)


def _to_home(h: torch.Tensor) -> torch.Tensor:
    h = h.detach().to("cpu")
    return h.pin_memory() if torch.cuda.is_available() else h


def offload(inputs: BlockInputs, device: torch.device, reserve: int) -> str:
    """Keep the calibration activations on ``device`` when they fit in its free memory less
    ``reserve`` bytes (a block, its statistics and the work of its solvers), else move them to
    pinned CPU memory, streamed per batch. Returns where they are ("device" or "cpu")."""
    if device.type != "cuda":
        inputs.home = "device"
        return "device"
    need = sum(h.numel() * h.element_size() for h in inputs.hidden) * (2 if inputs.reference is not None else 1)
    free, _ = torch.cuda.mem_get_info(device)
    if need <= free - reserve:
        inputs.home = "device"
        return "device"
    inputs.home = "cpu"
    inputs.hidden[:] = [_to_home(h) for h in inputs.hidden]
    if inputs.reference is not None:
        inputs.reference[:] = [_to_home(h) for h in inputs.reference]
    return "cpu"


def to_device(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s materialized parameters and buffers to ``device`` (meta ones stay)."""
    if device.type == "cpu":
        return
    from accelerate.utils import set_module_tensor_to_device

    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_meta and t.device != device:
            set_module_tensor_to_device(module, name, device, value=t.data)


def on(device: torch.device):
    """A context where tensors the passes create without a device land on ``device`` (the
    solvers are written device-agnostic this way: torch's default-device mode)."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> BlockInputs:
    n = len(blocks)
    originals = list(blocks)
    records: list = []
    for i in range(n):
        blocks[i] = _Recorder(i, n - 1, records)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for i in range(n):
            blocks[i] = originals[i]
    hidden = [h for (i, h, _, _) in records if i == 0]
    kwargs = [[(a, k) for (j, _, a, k) in records if j == i] for i in range(n)]
    return BlockInputs(hidden=[h.detach().float() for h in hidden], kwargs=kwargs)


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


# the most memory the kept inputs of _ReplayInput may take (float32 activations of every
# calibration token); above it the submodule simply runs again
REPLAY_INPUT_BYTES = 1 << 30


@dataclass
class LayerReport:
    name: str
    passes: list[str]
    rel_output_error: float | None  # ‖X(Ŵ−W)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs it saw
    info: dict = field(default_factory=dict)


@dataclass
class BlockResult:
    index: int
    prefix: str  # e.g. "model.layers.3."
    module: nn.Module  # the compressed block (weights on the CPU until the sink frees them)
    layers: list[LayerReport]
    seconds: float


def plan_targets(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, passes: list[Pass]) -> dict[str, list[Pass]]:
    """Which passes apply to each Linear (full names), checked before any work is done."""
    plan: dict[str, list[Pass]] = {}
    # (pass, reason) -> in_features -> {layer name within a block: blocks}
    problems: dict[tuple[Pass, str], dict[int, dict[str, list[int]]]] = {}
    order: dict[str, list[int]] = {}  # "prune after quantize" -> layer name within a block: blocks
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            full = f"{blocks_path}.{i}.{name}"
            ps = [p for p in passes if p.scope == "block" and not p.absorbed and p.matches(full, mod)]
            for kind in ("quantizes", "prunes"):
                if sum(getattr(p, kind) for p in ps) > 1:
                    what = "quantization" if kind == "quantizes" else "pruning"
                    raise UsageError(f"{full}: targeted by two {what} passes ({', '.join(p.name for p in ps)}); use `ignore` on one of them")
            if any(p.prunes for k, p in enumerate(ps) if any(q.quantizes for q in ps[:k])):
                order.setdefault(name, []).append(i)
            f = next((k for k, p in enumerate(ps) if p.factorizes), None)
            if f is not None:
                bad = [p for p in ps if p.smooths or p.prunes or p.factorizes and p is not ps[f]]
                bad += [p for p in ps[:f] if p.quantizes] + [p for p in ps[f + 1 :] if not p.quantizes or not set(p.stats) <= {"hessian"}]
                if bad:
                    raise UsageError(
                        f"{full}: {ps[f].name} cannot be combined with {', '.join(sorted({p.name for p in bad}))} on the same layer: "
                        "only a quantization pass (rtn or gptq) may follow it, quantizing the factors; prune or smooth in a "
                        "separate run, or use `ignore` on one of them"
                    )
            for p in ps:
                reason = p.check(full, mod)
                if reason:
                    by_in = problems.setdefault((p, reason.split(" in_features")[0]), {})
                    by_in.setdefault(mod.in_features, {}).setdefault(name, []).append(i)
            if ps:
                plan[full] = ps
    if order:
        raise UsageError(
            "a pruning pass comes after a quantization pass on the same layers ("
            + "; ".join(f"{n} ({_span(idx)} of {blocks_path})" for n, idx in order.items())
            + "): quantized weights cannot be pruned; put the pruning pass first in `passes` (prune, then quantize: "
            "a sparsegpt pass followed by gptq runs both in one joint solve)"
        )
    if problems:
        lines = []
        for (p, reason), by_in in problems.items():
            parts = []
            for k, layers in sorted(by_in.items()):
                idx = sorted({b for bs in layers.values() for b in bs})
                parts.append(f"in_features {k} of {', '.join(layers)} ({_span(idx)} of {blocks_path})")
            lines.append(f"{p.name}: {reason} {' and '.join(parts)}; {p.fix(sorted(by_in))}")
        raise UsageError("; ".join(lines))
    if passes and not plan:
        raise UsageError("no Linear layer in the decoder blocks matches the passes' `targets` (minus `ignore`)")
    return plan


def _span(idx: list[int]) -> str:
    return f"block {idx[0]}" if len(idx) == 1 else f"blocks {idx[0]}-{idx[-1]}"


def compress_blocks(
    source: ModelSource,
    model: nn.Module,
    passes: list[Pass],
    calib: torch.Tensor | None,
    batch_size: int,
    sink: Callable[[BlockResult, BlockInputs], None],
    start: int = 0,
    resume_inputs: BlockInputs | None = None,
    progress: Callable[[int, int, str], None] = lambda i, n, msg: None,
    keep: bool = False,
    sequential: bool = True,
    error_samples: int | None = None,
    keep_mlp_inputs: bool = False,
    propagate: bool = True,
    world: World | None = None,
) -> dict:
    """Run the layer-wise sweep. Returns how it ran: {"activations": "device" | "cpu" | None}
    (where the calibration activations lived; None without calibration). ``model`` is ``source.skeleton()`` (meta parameters).

    ``sequential=False`` calibrates all Linears of a block at once on the block's input (the
    compressed groups do not feed the later ones: one forward pass fewer per group).

    ``error_samples``: calibration windows the report's per-layer output error is measured on
    when no pass needs the Hessian itself (Wanda, magnitude, RTN): XᵀX costs as much as a forward
    of the layer per token, so only that many windows pay it (None: all; 0: no error reported).

    ``keep_mlp_inputs``: keep the input down_proj sees while it is calibrated, so the finished
    block is propagated without running gate/up again (llama-style MLPs; about 15% faster on
    the demo model for tokens × intermediate × 4 bytes more memory, at most REPLAY_INPUT_BYTES).

    ``propagate=False`` calibrates every block on the uncompressed model's activations (each
    block's input is the original block's output, and all its Linears see the original block's
    inputs at once): each layer is compressed in isolation, as in one-shot scripts; the default
    calibrates each block on the outputs of the compressed blocks before it.

    ``keep=True`` leaves the compressed blocks in ``model`` instead of freeing them (for tests and
    small models that are evaluated in memory)."""
    model_type = source.config.model_type
    blocks_path, blocks = find_blocks(model, model_type, getattr(source.config, "num_hidden_layers", None))
    passes, plan = check_plan(source, model, passes)
    needed = {s for p in passes for s in p.stats}
    if not propagate or calib is None:
        needed -= PAIRED  # every layer sees the original activations: x̂ = x
    smoothers = [p for p in passes if p.smooths]
    distiller = next((p for p in passes if p.distills and p.config.scope == "block"), None)
    previewers = [p for p in passes if p.preview_stats]
    if (needed or smoothers or previewers or distiller) and calib is None:
        names = ", ".join(p.name for p in passes if p.stats or p.smooths or p.preview_stats or p is distiller)
        raise UsageError(f"passes {names} need calibration data; set calibration.samples > 0")
    if smoothers:
        smooth_points(blocks[0], model_type)  # an unknown family fails now, not at block 0's end
    world = world or World()
    dev = world.device
    if distiller is not None and world.distributed:
        raise UsageError(f"{distiller.name} (scope: block) trains each block on all calibration windows in one process; "
                         "run it without torchrun / --nproc, or use scope: model after a distributed compression")
    error_batches = None if error_samples is None or calib is None else -(-error_samples // batch_size)
    if error_batches is not None and world.distributed:
        error_batches = -(-error_batches // world.size)  # the ranks share the sampled windows

    inputs = None
    if start > 0 and world.distributed and calib is not None:  # rank 0 read the resume state: each rank takes its share
        inputs = _scatter_inputs(world, resume_inputs)
    elif start > 0:
        inputs = resume_inputs
    if calib is not None and (inputs is None or previewers):
        # everything outside the blocks (embeddings, final norm) is loaded for the capture pass
        # (the head is not needed to calibrate; the rest is freed again right after)
        outside = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks_path + ".") and not n.startswith("lm_head.")]
        blocks_params = {n for n, _ in model.named_parameters() if n.startswith(blocks_path + ".")}
        materialize(model, "", source, skip=blocks_params | {n for n, _ in model.named_parameters() if n.startswith("lm_head.")})
        to_device(model, dev)
        batches = list(torch.split(calib, batch_size))
        if world.distributed:
            if len(batches) < world.size:
                raise UsageError(f"calibration: {len(batches)} batches of {batch_size} windows for {world.size} ranks; every rank needs "
                                 "at least one (raise calibration.samples or lower calibration.batch_size)")
            batches = [batches[j] for j in world.share(len(batches))]
        with torch.no_grad(), on(dev):
            captured = capture_inputs(model, blocks, [b.to(dev) for b in batches])
        from accelerate.utils import set_module_tensor_to_device

        for name in outside:
            set_module_tensor_to_device(model, name, "meta")
        if previewers:
            progress(0, len(blocks), "preview")
            _preview(source, blocks, blocks_path, plan, previewers, captured, inputs is None, world)
        inputs = inputs if inputs is not None else captured
        if needed & PAIRED and inputs.reference is None:
            inputs.reference = [h.clone() for h in inputs.hidden]
    where = None
    if inputs is not None:
        where = offload(inputs, dev, reserve=4 * _block_bytes(blocks[0]))

    n = len(blocks)
    for i in range(start, n):
        t0 = time.time()
        block = blocks[i]
        prefix = f"{blocks_path}.{i}."
        materialize(block, prefix, source)
        to_device(block, dev)
        progress(i, n, "calibrating")
        cursor = [0]  # the calibration batch being run (read by _Replay)
        with on(dev):
            layers = _run_block(block, prefix, i, plan, inputs, needed, model_type, cursor, smoothers, distiller, sequential, propagate,
                                keep_mlp_inputs, error_batches, world)
        finish_block(block)
        res = BlockResult(i, prefix, block, layers, time.time() - t0)
        if world.distributed:  # rank 0 writes the export and the resume state (every rank's activations)
            mine = None if inputs is None else BlockInputs(list(inputs.hidden), [[] for _ in range(i + 1)] + inputs.kwargs[i + 1 :],
                                                             None if inputs.reference is None else list(inputs.reference))
            everyone = world.gather(to_cpu(mine))
            if world.main:
                sink(res, _merge_inputs(everyone) if inputs is not None else None)
        else:
            sink(res, inputs)
        if not keep:
            release(block)
        trim_heap()
        progress(i + 1, n, "done")
    return {"activations": where}


def _block_bytes(block: nn.Module) -> int:
    return sum(p.numel() * 4 for p in block.parameters())


@torch.no_grad()
def _run_block(block, prefix, i, plan, inputs, needed, model_type, cursor, smoothers, distiller, sequential, propagate,
               keep_mlp_inputs, error_batches, world) -> list[LayerReport]:
    """Calibrate and compress one block, then move the activations on to the next block."""
    dev = world.device
    original = None
    if inputs is not None and not propagate:  # the uncompressed block's outputs feed the next block
        original = [first_output(block(inputs.get(b, dev), *a, **k)).detach().float() for b, (a, k) in enumerate(inputs.kwargs[i])]
    reference = copy.deepcopy(block) if inputs is not None and inputs.reference is not None else None
    teacher = copy.deepcopy(block) if distiller is not None and inputs is not None else None  # the original block
    notes, known = _smooth_block(block, prefix, plan, smoothers, inputs, i, model_type, cursor, world) if smoothers else ({}, {})
    layers = _compress_block(block, prefix, plan, inputs, i, needed, model_type if sequential and propagate else "", cursor, known,
                             error_batches, keep_mlp_inputs and propagate, reference, world)
    if reference is not None:  # the original model's activations move on to the next block
        for b, (a, k) in enumerate(inputs.kwargs[i]):
            x = inputs.reference[b]
            y = first_output(reference(x.to(dev), *a, **k)).detach().float()
            inputs.reference[b] = inputs.kept(y)
        del reference
    for rep in layers:
        rep.info.update(notes.get(rep.name, {}))
    if teacher is not None:  # block-scope distillation: the compressed modules train against the original block
        finish_block(block)
        pruned = {r.name[len(prefix) :] for r in layers if "pattern" in r.info}
        hidden = [inputs.get(b, dev) for b in range(len(inputs.hidden))]
        with torch.enable_grad():
            rec = distiller.train_block(block, teacher, hidden, inputs.kwargs[i], prefix, pruned, distiller.ctx.seed)
        del hidden
        for rep in layers:  # the block's output error (relative) before and after its training
            rep.passes.append(distiller.name)
            rep.info["block_distill"] = [rec["error_before"], rec["error_after"]]
        del teacher
    if original is not None:
        for b, y in enumerate(original):
            inputs.put(b, y)
        del original
    elif inputs is not None:
        for b, (a, k) in enumerate(inputs.kwargs[i]):
            cursor[0] = b
            # in place: batch b's input is freed as soon as its output exists
            inputs.put(b, first_output(block(inputs.get(b, dev), *a, **k)).detach().float())
    return layers


def _merge_inputs(parts: list[BlockInputs]) -> BlockInputs:
    """Every rank's activations (batches in rank order: the global order), for the resume state
    rank 0 writes; the kwargs of the blocks still to run are what resuming needs."""
    hidden = [h for p in parts for h in p.hidden]
    kwargs = [[ak for p in parts for ak in p.kwargs[j]] for j in range(len(parts[0].kwargs))]
    ref = None if parts[0].reference is None else [h for p in parts for h in p.reference]
    return BlockInputs(hidden, kwargs, ref)


def _scatter_inputs(world: World, full: BlockInputs | None) -> BlockInputs:
    """Rank 0's resume state (every batch) shared out: each rank takes its share of the batches,
    for any number of ranks (the state does not depend on how many wrote it)."""
    import torch.distributed as dist

    if world.main:
        nb = len(full.hidden)
        shares = [World(rank=r, size=world.size).share(nb) for r in range(world.size)]
        parts = [BlockInputs([full.hidden[b] for b in sh], [[kw[b] for b in sh] if kw else [] for kw in full.kwargs],
                             None if full.reference is None else [full.reference[b] for b in sh]) for sh in shares]
    else:
        parts = None
    box = [None]
    dist.scatter_object_list(box, parts, src=0)
    return moved(box[0], world.device)  # activations, and the rotary tables and masks of the kwargs


@torch.no_grad()
def _preview(source, blocks, blocks_path: str, plan, previewers: list[Pass], inputs: BlockInputs, copy: bool, world: World | None = None) -> None:
    """A sweep over the uncompressed model before the real one, for passes that allocate across
    blocks (OWL's per-block sparsity): each block runs on the dense model's activations, its
    targeted Linears observed for ``preview_stats``; no weight changes."""
    hidden = [h.clone() for h in inputs.hidden] if copy else inputs.hidden
    view = BlockInputs(hidden=hidden, kwargs=inputs.kwargs)
    needed = {s for p in previewers for s in p.preview_stats}
    world = world or World()
    for i, block in enumerate(blocks):
        prefix = f"{blocks_path}.{i}."
        materialize(block, prefix, source)
        to_device(block, world.device)
        names = [n for n, m in block.named_modules() if any(p in plan.get(prefix + n, ()) for p in previewers)]
        stats = _empty_stats(block, names, needed)

        alias: dict[str, str] = {}
        seen: dict[str, torch.Tensor] = {}

        def hook_for(name):
            def hook(mod, args):
                _accumulate(name, args[0], seen, alias, stats, needed)

            return hook

        # one forward per batch both observes and propagates (the weights do not change here)
        handles = [get_module(block, n).register_forward_pre_hook(hook_for(n)) for n in names]
        probe_in = view.hidden[0].clone()
        try:
            with calibrating(block):
                for b, (a, k) in enumerate(inputs.kwargs[i]):
                    seen.clear()
                    view.hidden[b] = first_output(block(view.hidden[b], *a, **k)).detach().float()
        finally:
            for h in handles:
                h.remove()
        world.reduce_stats({n: st for n, st in stats.items() if n not in alias})
        for n, twin in alias.items():
            stats[n] = stats[twin]
        probe = _BlockErrorProbe(block, probe_in, view.hidden[0], inputs.kwargs[i][0], world)
        for p in previewers:
            mine = [n for n in names if p in plan[prefix + n]]
            p.preview_block(prefix, {n: stats[n] for n in mine}, {n: get_module(block, n).weight.detach().float() for n in mine}, probe)
        del probe, probe_in
        release(block)
        trim_heap()
    for p in previewers:
        p.preview_done()


class _BlockErrorProbe:
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


def check_plan(source: ModelSource, model: nn.Module, passes: list[Pass]) -> tuple[list[Pass], dict[str, list[Pass]]]:
    """Link the passes and plan which apply to each Linear, raising every configuration error
    before any work (callers run it before creating output folders). Returns the passes that
    run (absorbed ones dropped) and the plan."""
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))
    link_passes(passes)
    passes = [p for p in passes if not p.absorbed]
    return passes, plan_targets(model, blocks_path, blocks, passes)


def link_passes(passes: list[Pass]) -> None:
    """Let each pass see the passes after it (awq leaves quantization to a later rtn/gptq pass;
    sparsegpt followed by gptq on the same targets absorbs it into one joint solve)."""
    for k, p in enumerate(passes):
        p.link(passes[k + 1 :])


class BlockProbe:
    """Lets a smoothing pass run parts of the block on the calibration inputs."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, i: int, cursor: list[int], world: World | None = None):
        self.block, self.inputs, self.i, self.cursor = block, inputs, i, cursor
        self.world = world or World()

    def reduce(self, value: float) -> float:
        """A loss measured on this rank's windows, summed over the ranks (every rank then makes
        the same choice; one process: the value itself)."""
        return self.world.sum(value)

    @torch.no_grad()
    def module_inputs(self, path: str, samples: int) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) submodule ``path`` receives on about ``samples`` calibration
        windows (whole batches, evenly spread over the calibration set)."""
        hidden = self.inputs.hidden
        per = hidden[0].shape[0]
        k = min(len(hidden), max(1, -(-samples // per)))
        picks = sorted({round(j * (len(hidden) - 1) / max(k - 1, 1)) for j in range(k)})
        captured: list = []

        def hook(mod, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        h = get_module(self.block, path).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for b in picks:
                self.cursor[0] = b
                a, kw = self.inputs.kwargs[self.i][b]
                try:
                    self.block(self.inputs.get(b, self.world.device), *a, **kw)
                except _Stop:
                    pass
        finally:
            h.remove()
        return captured


@torch.no_grad()
def _smooth_block(block, prefix, plan, smoothers: list[Pass], inputs, i: int, model_type: str, cursor, world: World | None = None):
    """The smoothing stage: each smoothing pass, in recipe order, observes the (already smoothed)
    block and folds its scales. Returns per-Linear notes for the report, and the last pass's
    Hessians (of the smoothed block's inputs; a pass that folds scales updates them), which the
    group loop reuses where no later pass needs fresh statistics."""
    points, plus_one = smooth_points(block, model_type)
    notes: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for p in smoothers:
        names = {n for pt in points for n in pt.linears}
        names |= {n for n, m in block.named_modules() if p in plan.get(prefix + n, ())}
        stats = _observe(block, sorted(names), inputs, i, set(p.smooth_stats), cursor, world=world)
        for k, v in p.smooth(block, prefix, points, plus_one, stats, BlockProbe(block, inputs, i, cursor, world)).items():
            notes.setdefault(k, {}).update(v)
    return notes, {n: {"hessian": st["hessian"]} for n, st in stats.items() if "hessian" in st}


@torch.no_grad()
def _compress_block(block, prefix, plan, inputs, i: int, needed: set, model_type: str, cursor: list[int], known=None,
                    error_batches: int | None = None, keep_mlp_inputs: bool = False, reference=None,
                    world: World | None = None) -> list[LayerReport]:
    world = world or World()
    reports: list[LayerReport] = []
    final: dict[str, nn.Module] = {}  # compressed modules, put in place once the block is done
    replays = replay_points(block, model_type)
    replay_inputs = replay_input_points(block, model_type) if keep_mlp_inputs else {}
    groups = linear_groups(block, model_type)
    if inputs is not None and not needed and not known:
        # No pass calibrates on statistics (rtn): the weights do not depend on what the later
        # groups see, and the report's error needs only each Linear's input Hessian. One forward
        # over the block observes every group at once instead of one forward per group.
        report = {"hessian": error_batches} if error_batches != 0 else {}
        known = _observe(block, [n for g in groups for n in g if prefix + n in plan], inputs, i, set(report), cursor, report, world=world)
    for gi, group in enumerate(groups):
        targeted = [n for n in group if prefix + n in plan]
        keep_inputs: dict[str, dict] = {}  # inputs kept for _ReplayInput (by Linear name)
        stats: dict[str, dict] = {n: {} for n in targeted}
        if targeted and inputs is not None:
            if not needed and known and all(n in known for n in targeted):
                # only the report's error needs H here (rtn, or awq quantizing itself): the
                # smoothing stage's Hessians save a calibration forward per group
                stats = {n: known[n] for n in targeted}
            else:
                # the Hessian for the report alone is sampled (error_batches); passes that need
                # it get it on every calibration token
                extra = {} if "hessian" in needed or error_batches == 0 else {"hessian": error_batches}
                if needed and gi in replay_inputs:  # the observe runs every batch: keep what it sees
                    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
                    for path, lin in replay_inputs[gi]:
                        if lin in targeted and tokens * get_module(block, lin).in_features * 4 <= REPLAY_INPUT_BYTES:
                            keep_inputs[lin] = {}
                stats = _observe(block, targeted, inputs, i, needed | set(extra), cursor, extra, keep_inputs, reference, world=world)

        def solve(name: str) -> tuple[nn.Module, dict, list[str], bool]:
            """The recipe's passes on one Linear: (its compressed module, report info, pass
            names, whether a pruning pass left a mask)."""
            full, mod = prefix + name, get_module(block, name)
            infos, names = {}, []
            st = dict(stats[name])  # twins share one statistics dict; a pass's mask is this Linear's own
            for p in plan[full]:
                new, info = _apply_factors(p, full, mod, st) if hasattr(mod, "factors") else p.apply(full, mod, st)
                infos.update(info)
                names.append(p.name)
                mod = new
            return mod, infos, names, "mask" in st

        solved: dict[str, tuple] = {}
        W0s: dict[str, torch.Tensor] = {}
        if world.distributed:  # Linear k is solved on rank k mod N; every rank gets every result
            W0s = {n: get_module(block, n).weight.detach().float().clone() for n in targeted}
            mine = {n: to_cpu(solve(n)) for k, n in enumerate(targeted) if world.owner(k) == world.rank}
            for part in world.all_gather(mine):
                solved.update(part)
            solved = {n: (m.to(world.device), *rest) for n, (m, *rest) in solved.items()}
        for name in targeted:
            full = prefix + name
            W0 = W0s.pop(name) if name in W0s else get_module(block, name).weight.detach().float().clone()
            mod, infos, names, masked = solved.pop(name) if name in solved else solve(name)
            Wq = dense_weight(mod)
            if masked:  # a pruning pass ran: report what the final weight keeps
                infos["sparsity"] = round(float((Wq == 0).float().mean()), 6)
                infos["weights"] = Wq.numel()
            err = None
            D = Wq - W0
            if "hessian" in stats[name]:
                H = stats[name]["hessian"]["H"]
                err = float(torch.sum((D @ H) * D) / torch.sum((W0 @ H) * W0).clamp_min(1e-30))
            elif inputs is None:  # no calibration data: the weight's own relative error
                infos["rel_weight_error"] = float(D.pow(2).sum() / W0.pow(2).sum().clamp_min(1e-30))
            reports.append(LayerReport(full, names, err, infos))
            final[name] = mod
            # Until the block is finished, later groups and the propagation see the compressed
            # weight through a plain Linear: dequantizing once, not on every batch. A layer that
            # also quantizes its input (W8A8) is put in place at once: its rounding of the
            # activations is part of what the later groups are calibrated on.
            if getattr(mod, "quantizes_activations", False):  # CompressedLinear.quantizes_activations
                replace_linear(block, name, mod)
            else:
                orig = get_module(block, name)
                orig.weight.data = Wq.to(orig.weight.dtype)
            stats[name] = {}  # free the Hessian now
            if known:
                known.pop(name, None)
        for path in replays.get(gi, []):
            replace_linear(block, path, _Replay(get_module(block, path), cursor))
        for path, lin in replay_inputs.get(gi, []):
            if keep_inputs.get(lin):
                replace_linear(block, path, _ReplayInput(get_module(block, path), lin[len(path) + 1 :], keep_inputs.pop(lin), cursor))
    block._compress_final = final
    return reports


def _apply_factors(p: Pass, full: str, mod: nn.Module, st: dict) -> tuple[nn.Module, dict]:
    """A quantization pass after a factorizing one (lowrank) quantizes each factor in turn, in
    forward order: A on the layer's input statistics, B on those of A's (quantized) output,
    H_B = Â·H·Âᵀ (the planner admits only passes whose statistics derive this way)."""
    infos: dict = {}
    fst = {k: v for k, v in st.items() if k == "hessian"}
    for f, sub in mod.factors().items():
        new, info = p.apply(f"{full}.{f}", sub, fst)
        setattr(mod, f, new)
        infos.update({f"{f}.{k}": v for k, v in info.items()})
        if "hessian" in fst:
            Aq = dense_weight(new)
            fst = {"hessian": {"H": Aq @ fst["hessian"]["H"] @ Aq.T, "n": fst["hessian"]["n"]}}
    return mod, infos


def finish_block(block: nn.Module) -> None:
    """Unwrap replayed submodules; swap the compressed modules (packed QuantLinears) in for export."""
    for name, mod in list(block.named_modules()):
        if isinstance(mod, _Replay):
            replace_linear(block, name, mod.inner)
    for name, mod in getattr(block, "_compress_final", {}).items():
        replace_linear(block, name, mod)
    block.__dict__.pop("_compress_final", None)


def _empty_stats(block, names: list[str], needed: set) -> dict[str, dict]:
    """{Linear name: {statistic: its empty state}} for the Linears ``names`` of ``block``, on the
    Linear's device."""
    out = {}
    for n in names:
        lin = get_module(block, n)
        dev = lin.weight.device
        out[n] = {s: {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in STATS[s][0](lin.in_features).items()} for s in needed}
    return out


def _accumulate(name: str, x: torch.Tensor, seen: dict, alias: dict, stats: dict, wanted, ref: torch.Tensor | None = None) -> None:
    """Add input ``x`` of Linear ``name`` to its statistics ``wanted``, unless another Linear read
    the very same tensor in this forward (q/k/v, gate/up): then ``name`` shares that one's
    statistics (``alias``; the caller copies them at the end) and nothing is computed twice.
    ``ref``: the original model's input of the same Linear, for the paired statistics."""
    twin = next((n for n, t in seen.items() if t is x), None)
    if twin is not None:
        alias[name] = twin
    elif name not in alias:
        for s in wanted:
            if s in PAIRED:
                STATS[s][1](stats[name][s], x, ref)
            else:
                STATS[s][1](stats[name][s], x)
    seen[name] = x


def _observe(block, names: list[str], inputs: BlockInputs, i: int, needed: set, cursor: list[int],
             limit: dict[str, int | None] | None = None, keep: dict[str, dict] | None = None, reference=None,
             world: World | None = None) -> dict[str, dict]:
    """Run the block on every calibration batch, hooks accumulating statistics for ``names``.
    The forward of a batch ends as soon as every Linear of the group has seen its input.
    ``limit``: statistics accumulated on only the first that many batches (None: all); the
    loop stops once no statistic wants more. ``keep``: {name: {}} filled with the input each of
    those Linears saw, per batch. ``reference``: the uncompressed block, run first on the
    original activations (``inputs.reference``) of each batch for the paired statistics."""
    keep = keep or {}
    limit = limit or {}
    world = world or World()
    if not needed:  # nothing to collect: no forward
        return {n: {} for n in names}
    stats = _empty_stats(block, names, needed)
    alias: dict[str, str] = {}  # Linears that read the very same input tensor share statistics
    seen: dict[str, torch.Tensor] = {}
    handles = []

    ref_x: dict[str, torch.Tensor] = {}  # the original block's input of each Linear, this batch
    paired = reference is not None and bool(needed & PAIRED)

    def ref_hook_for(name):
        def hook(mod, args):
            ref_x[name] = args[0]
            if len(ref_x) == len(names):
                raise _Stop

        return hook

    def hook_for(name):
        def hook(mod, args):
            x = args[0]
            _accumulate(name, x, seen, alias, stats, [s for s in needed if limit.get(s) is None or cursor[0] < limit[s]], ref_x.get(name))
            if name in keep:
                keep[name][cursor[0]] = x.detach()
            if len(seen) == len(names):
                raise _Stop

        return hook

    for n in names:
        handles.append(get_module(block, n).register_forward_pre_hook(hook_for(n)))
        if paired:
            handles.append(get_module(reference, n).register_forward_pre_hook(ref_hook_for(n)))
    try:
        with calibrating(block):  # MoE: every expert observes every token (the routed sum is unchanged)
            for b, (a, k) in enumerate(inputs.kwargs[i]):
                if all(limit.get(s) is not None and b >= limit[s] for s in needed):
                    break
                cursor[0] = b
                seen.clear()
                if paired:
                    ref_x.clear()
                    try:
                        reference(inputs.reference[b].to(world.device), *a, **k)
                    except _Stop:
                        pass
                try:
                    block(inputs.get(b, world.device), *a, **k)
                except _Stop:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    # under torchrun every rank saw its own batches: sum (or max) the statistics over the ranks,
    # once per group; twins are copied after, so each statistic is reduced once
    world.reduce_stats({n: st for n, st in stats.items() if n not in alias})
    for n, twin in alias.items():
        stats[n] = stats[twin]
    return stats
