"""Stage preview_block: a sweep over the uncompressed model before the real one, for passes that
allocate across blocks (OWL's per-block sparsity, low-rank's sensitivity): each block runs on the
dense model's activations, its targeted Linears observed for ``preview_stats``; no weight changes."""

from __future__ import annotations

import torch

from compress.arch.adapt import calibrating
from compress.checkpoint.source import materialize, release
from compress.engine.context import Sweep
from compress.engine.inputs import BlockInputs, to_device
from compress.engine.observe import Accumulator, BlockErrorProbe, empty_stats
from compress.passes import Pass
from compress.utils import first_output, get_module, trim_heap


@torch.no_grad()
def _preview_one(sweep: Sweep, i: int, view: BlockInputs, kwargs: list, previewers: list[Pass]) -> None:
    block, prefix = sweep.blocks[i], f"{sweep.blocks_path}.{i}."
    materialize(block, prefix, sweep.source)
    to_device(block, sweep.device)
    names = [n for n, _ in block.named_modules() if any(p in sweep.plan.get(prefix + n, ()) for p in previewers)]
    needed = {s for p in previewers for s in p.preview_stats}
    acc = Accumulator(empty_stats(block, names, needed))

    def hook_for(name):
        def hook(mod, args):
            acc.add(name, args[0], needed)

        return hook

    # one forward per batch both observes and propagates (the weights do not change here)
    handles = [get_module(block, n).register_forward_pre_hook(hook_for(n)) for n in names]
    probe_in = view.hidden[0].clone()
    try:
        with calibrating(block):
            for b, (a, k) in enumerate(kwargs):
                acc.seen.clear()
                view.hidden[b] = first_output(block(view.hidden[b], *a, **k)).detach().float()
    finally:
        for h in handles:
            h.remove()
    stats = acc.reduced(sweep.world)
    probe = BlockErrorProbe(block, probe_in, view.hidden[0], kwargs[0], sweep.world)
    for p in previewers:
        mine = [n for n in names if p in sweep.plan[prefix + n]]
        p.preview_block(prefix, {n: stats[n] for n in mine}, {n: get_module(block, n).weight.detach().float() for n in mine}, probe)
    del probe, probe_in
    release(block)
    trim_heap()


def preview(sweep: Sweep, previewers: list[Pass], inputs: BlockInputs, copy: bool) -> None:
    """Run the preview over every block; ``copy``: keep ``inputs`` unchanged (the sweep starts
    from them)."""
    view = BlockInputs(hidden=[h.clone() for h in inputs.hidden] if copy else inputs.hidden, kwargs=inputs.kwargs)
    for i in range(len(sweep.blocks)):
        _preview_one(sweep, i, view, inputs.kwargs[i], previewers)
    for p in previewers:
        p.preview_done()
