"""The layer-wise sweep: compress a model one decoder block at a time.

For block i (only its weights, its statistics and the cached activations are in memory):

1. its inputs are the outputs of block i-1 (already compressed), cached on the CPU or the device;
2. its stages run (``compress.engine.block``): transform_block, apply (group by group, observe
   then compress), train_block, then the block propagates its calibration inputs;
3. the finished block goes to the sink (the exporter) and its weights are freed.

Before the first block: the plan (``compress.engine.plan``), the modules outside the blocks a
pass compresses (``compress.engine.outside``: a quantized embedding, handed to the sink first), the
capture of block 0's inputs and of the keyword arguments every block gets
(``compress.engine.inputs``), and the preview stage (``compress.engine.preview``) where a pass
asks for one.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from compress.arch.families import find_blocks
from compress.checkpoint.source import ModelSource, materialize, release
from compress.engine.block import finish_block, run_block
from compress.engine.context import BlockRun, Sweep, SweepOptions
from compress.engine.dist import World, to_cpu
from compress.engine.inputs import (
    BlockInputs,
    capture_inputs,
    merge_inputs,
    offload,
    on,
    scatter_inputs,
    to_device,
)
from compress.engine.outside import run_outside, swap_in, swap_out
from compress.engine.plan import check_plan
from compress.engine.preview import preview
from compress.engine.records import BlockResult, LayerReport, OutsideResult
from compress.errors import UsageError
from compress.passes import PAIRED, SWEEP_STAGES, Pass
from compress.utils import trim_heap

__all__ = ["BlockInputs", "BlockResult", "LayerReport", "SweepOptions", "compress_blocks", "plan_sweep"]

# receives each finished block (with the activations entering the next, for the resume state),
# and first, before block 0, the compressed modules outside the blocks (with None)
Sink = Callable[[BlockResult | OutsideResult, BlockInputs | None], None]


def plan_sweep(source: ModelSource, model: nn.Module, passes: list[Pass], options: SweepOptions, world: World,
               calibrated: bool) -> Sweep:
    """The sweep's plan and settings, every configuration error raised before any work."""
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))
    passes, plan = check_plan(source, model, passes)
    passes = [p for p in passes if any(p.in_stage(s) for s in SWEEP_STAGES)]
    needed = {s for p in passes for s in p.stats}
    if not options.propagate or not calibrated:
        needed -= PAIRED  # every layer sees the original activations: x̂ = x
    sweep = Sweep(source, model, passes, plan, blocks_path, blocks, options, world, needed)
    if not calibrated and any(p.needs_calibration() for p in passes):
        names = ", ".join(p.name for p in passes if p.needs_calibration())
        raise UsageError(f"passes {names} need calibration data; set calibration.samples > 0")
    for p in passes:
        p.check_sweep(sweep)  # e.g. an unknown family for smoothing fails now, not at block 0's end
    if calibrated and options.error_samples is not None:
        sweep.error_batches = -(-options.error_samples // options.batch_size)
        if world.distributed:
            sweep.error_batches = -(-sweep.error_batches // world.size)  # the ranks share the sampled windows
    return sweep


def _capture(sweep: Sweep, calib: torch.Tensor, compressed: OutsideResult | None = None) -> BlockInputs:
    """Block 0's inputs for this rank's share of the calibration batches: everything outside the
    blocks (embeddings, final norm; not the head) is loaded for the model's forward, then freed.
    ``compressed`` (outside modules a pass compressed) compute in place of the source's while the
    sweep propagates compressed activations."""
    model, bp, world = sweep.model, sweep.blocks_path + ".", sweep.world
    outside = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(bp) and not n.startswith("lm_head.")]
    swapped = swap_in(model, compressed if sweep.options.propagate else None)
    materialize(model, "", sweep.source, skip={n for n, _ in model.named_parameters() if n.startswith(bp) or n.startswith("lm_head.")})
    to_device(model, world.device)
    batches = list(torch.split(calib, sweep.options.batch_size))
    if world.distributed:
        if len(batches) < world.size:
            raise UsageError(f"calibration: {len(batches)} batches of {sweep.options.batch_size} windows for {world.size} ranks; "
                             "every rank needs at least one (raise calibration.samples or lower calibration.batch_size)")
        batches = [batches[j] for j in world.share(len(batches))]
    with torch.no_grad(), on(world.device):
        captured = capture_inputs(model, sweep.blocks, [b.to(world.device) for b in batches])
    swap_out(model, swapped)
    for name in outside:
        set_module_tensor_to_device(model, name, "meta")
    return captured


def _starting_inputs(sweep: Sweep, calib, start: int, resume_inputs: BlockInputs | None,
                     compressed: OutsideResult | None = None) -> BlockInputs | None:
    """The activations entering block ``start``: captured (start 0; through the ``compressed``
    outside modules), or the resume state's (under torchrun rank 0 read it and each rank takes its
    share); the preview stage runs first."""
    if calib is None:
        return None
    inputs = None
    if start > 0:
        inputs = scatter_inputs(sweep.world, resume_inputs) if sweep.world.distributed else resume_inputs
    previewers = sweep.taking_part("preview_block")
    if inputs is None or previewers:
        captured = _capture(sweep, calib, compressed)
        if previewers:
            sweep.options.progress(0, len(sweep.blocks), "preview")
            preview(sweep, previewers, captured, copy=inputs is None)
        inputs = inputs if inputs is not None else captured
    if sweep.needed & PAIRED and inputs.reference is None:
        inputs.reference = [h.clone() for h in inputs.hidden]
    return inputs


def _hand_on(sweep: Sweep, res: BlockResult, inputs: BlockInputs | None, sink: Sink) -> None:
    """The finished block to the sink. Under torchrun rank 0 writes the export and the resume
    state (every rank's activations; the kwargs of the blocks still to run)."""
    world, i = sweep.world, res.index
    if not world.distributed:
        sink(res, inputs)
        return
    mine = None
    if inputs is not None:
        mine = BlockInputs(list(inputs.hidden), [[] for _ in range(i + 1)] + inputs.kwargs[i + 1 :],
                           None if inputs.reference is None else list(inputs.reference))
    everyone = world.gather(to_cpu(mine))
    if world.main:
        sink(res, merge_inputs(everyone) if inputs is not None else None)


def compress_blocks(source: ModelSource, model: nn.Module, passes: list[Pass], calib: torch.Tensor | None, sink: Sink,
                    options: SweepOptions | None = None, resume: tuple[int, BlockInputs | None] = (0, None),
                    world: World | None = None) -> dict:
    """Run the layer-wise sweep; ``model`` is ``source.skeleton()`` (meta parameters), ``calib``
    the calibration windows (None: data-free), ``sink`` receives each finished block (first the
    compressed modules outside the blocks, where a pass compresses some),
    ``resume``: (first block to run, the activations entering it). Returns how it ran:
    {"activations": "device" | "cpu" | None} (where the calibration activations lived)."""
    options = options or SweepOptions()
    world = world or World()
    sweep = plan_sweep(source, model, passes, options, world, calib is not None)
    start = resume[0]
    compressed = run_outside(sweep, "before") if start == 0 else None  # a resumed run wrote them before its block 0
    if compressed is not None and world.main:
        sink(compressed, None)
    inputs = _starting_inputs(sweep, calib, start, resume[1], compressed)
    where = None if inputs is None else offload(inputs, world.device, reserve=4 * _block_bytes(sweep.blocks[0]))
    n = len(sweep.blocks)
    for i in range(start, n):
        t0 = time.time()
        block = sweep.blocks[i]
        run = BlockRun(sweep, i, block, inputs)
        materialize(block, run.prefix, source)
        to_device(block, world.device)
        options.progress(i, n, "calibrating")
        with on(world.device):
            layers = run_block(run)
        finish_block(block)
        _hand_on(sweep, BlockResult(i, run.prefix, block, layers, time.time() - t0), inputs, sink)
        if not options.keep:
            release(block)
        trim_heap()
        options.progress(i + 1, n, "done")
    compressed = run_outside(sweep, "after", inputs)  # a head solved on what the compressed blocks feed it
    if compressed is not None and world.main:
        sink(compressed, None)
    return {"activations": where}


def _block_bytes(block: nn.Module) -> int:
    return sum(p.numel() * 4 for p in block.parameters())
