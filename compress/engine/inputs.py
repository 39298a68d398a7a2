"""The calibration activations: captured in front of block 0, kept where they fit (the compute
device, or pinned CPU memory streamed per batch), shared out between ranks and merged back.

The capture runs the model's own forward with each block replaced by a recorder, so masks and
position embeddings are exactly what the model would compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from compress.engine.dist import World, moved


class Stop(Exception):
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
            raise Stop
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
            except Stop:
                pass
    finally:
        for i in range(n):
            blocks[i] = originals[i]
    hidden = [h for (i, h, _, _) in records if i == 0]
    kwargs = [[(a, k) for (j, _, a, k) in records if j == i] for i in range(n)]
    return BlockInputs(hidden=[h.detach().float() for h in hidden], kwargs=kwargs)



def merge_inputs(parts: list[BlockInputs]) -> BlockInputs:
    """Every rank's activations (batches in rank order: the global order), for the resume state
    rank 0 writes; the kwargs of the blocks still to run are what resuming needs."""
    hidden = [h for p in parts for h in p.hidden]
    kwargs = [[ak for p in parts for ak in p.kwargs[j]] for j in range(len(parts[0].kwargs))]
    ref = None if parts[0].reference is None else [h for p in parts for h in p.reference]
    return BlockInputs(hidden, kwargs, ref)


def scatter_inputs(world: World, full: BlockInputs | None) -> BlockInputs:
    """Rank 0's resume state (every batch) shared out: each rank takes its share of the batches,
    for any number of ranks (the state does not depend on how many wrote it)."""
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
