"""Perplexity one decoder block at a time: a model larger than memory is evaluated with the flat
memory it is compressed with (``compress.engine``).

The whole-model path (``compress.eval.perplexity`` on ``compress.checkpoint.load.load_source``) holds every
weight in float32, packed layers dequantized beside their codes, plus the checkpoint's tensors
while it reads them: about 6 bytes per parameter of a bf16 checkpoint, so a model that compresses
on a machine could not be evaluated on it. Here the same windows go through the engine's pieces:

1. capture: the skeleton (meta parameters) with everything outside the blocks loaded except the
   head; the model's own forward, its blocks replaced by recorders
   (``compress.engine.capture_inputs``), gives each batch's input to block 0 and the keyword
   arguments every block gets (rotary tables, masks: the model computes them once per forward
   and hands the same tensors to every block, so they are held once). Those weights are freed;
2. sweep: each block in turn is loaded from disk (compressed layers as the module types the
   checkpoint stores, built as ``load_source`` builds them), runs every batch in place, and is
   freed;
3. head: the final norm and head (and whatever else the model applies after its blocks: OPT's
   project_out, logit soft-capping) run in the model's own forward, its blocks replaced by a
   stand-in that hands back each batch's final hidden states; the NLL is summed by the whole-model
   path's own ``next_token_nll``, so the two agree to float rounding.

Peak memory: the hidden states of every window (n × T × hidden × 4 bytes), one block (float32,
plus its packed codes), and the head with one batch's logits; it does not grow with the depth.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import psutil
import torch
from accelerate.utils import set_module_tensor_to_device
from compress.eval.perplexity import next_token_nll, summary
from torch import nn

from compress.arch.families import find_blocks
from compress.checkpoint.load import replace_stored, stored_modules, tie_head
from compress.checkpoint.source import ModelSource, materialize, release
from compress.engine import capture_inputs
from compress.modules import keep_dense
from compress.utils import first_output, trim_heap

# The whole model is loaded only when its estimate (``whole_model_bytes``) is at most this share of
# the memory available: the estimate leaves out the interpreter's own growth and allocator slack.
FIT = 0.8


class _Finished(nn.Module):
    """Stands in for every block in the head's forward: block 0 returns the batch's final hidden
    states (``feed[0]``) in place of the embeddings it is given, the others pass them on; as a
    1-tuple where the real blocks return tuples (falcon, bloom: the model reads ``outputs[0]``)."""

    def __init__(self, first: bool, feed: list, as_tuple: bool = False):
        super().__init__()
        self.first, self.feed, self.as_tuple = first, feed, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.feed[0] if self.first else hidden_states
        return (out,) if self.as_tuple else out


def _param_names(model: nn.Module, module: nn.Module | None) -> set[str]:
    """Full names of ``module``'s parameters inside ``model`` (the head, the input embeddings)."""
    return {f"{path}.{n}" for path, m in model.named_modules() if m is module and module is not None for n, _ in m.named_parameters()}


@torch.no_grad()
def layerwise_perplexity(source: ModelSource, windows: torch.Tensor, batch_size: int = 1, progress=lambda done, total: None) -> dict:
    """``windows`` (n, T) int64 -> the dict ``compress.eval.perplexity.perplexity`` returns, with
    ``"mode": "layerwise"``. ``progress(done, total)`` counts the blocks, then the head."""

    t0 = time.time()
    model = source.skeleton(allow_quantized=True)
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))
    n = len(blocks)

    def in_blocks() -> set[str]:  # asked anew: compressed modules change the parameter names (low-rank factors)
        return {p for p, _ in model.named_parameters() if p.startswith(blocks_path + ".")}

    stored = stored_modules(source, model)
    # compressed layers outside the blocks (none in our exports) are small: loaded once, kept
    replace_stored(model, source, {k: v for k, v in stored.items() if not k.startswith(blocks_path + ".")})
    head = _param_names(model, model.get_output_embeddings())
    tied = getattr(source.config, "tie_word_embeddings", False)

    # 1. capture: every batch's input to block 0, and the kwargs of each block
    skip = in_blocks() | head
    outside = [p for p, t in model.named_parameters() if t.is_meta and p not in skip]
    materialize(model, "", source, skip=skip)
    batches = list(torch.split(windows, batch_size))
    inputs = capture_inputs(model, blocks, batches)
    hidden = inputs.hidden  # hidden[b]: (B, T, hidden) float32, replaced block by block
    for p in outside:
        set_module_tensor_to_device(model, p, "meta")
    trim_heap()

    # 2. sweep: one block in memory at a time
    as_tuple = False  # whether the blocks return tuples (the stand-ins below must too)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_path}.{i}."
        replace_stored(model, source, {k: v for k, v in stored.items() if k.startswith(prefix)})
        materialize(block, prefix, source)
        keep_dense(block)  # each packed layer dequantized once for all the batches
        for b, (args, kwargs) in enumerate(inputs.kwargs[i]):
            out = block(hidden[b], *args, **kwargs)
            as_tuple, hidden[b] = isinstance(out, (tuple, list)), first_output(out).detach().float()  # the input is freed
        keep_dense(block, on=False)  # the dense copies are no parameters: release would not free them
        release(block)
        trim_heap()
        progress(i + 1, n + 1)
    del inputs  # the kwargs (masks, rotary tables) are no longer needed

    # 3. head: the model's own forward after its blocks, on the final hidden states. The input
    # embeddings stay on the meta device unless the head is tied to them: the stand-in ignores
    # what they would compute, so the forward gets zero embeddings of the right shape instead.
    emb = model.get_input_embeddings()
    skip = in_blocks() | (head if tied else _param_names(model, emb))
    materialize(model, "", source, skip=skip)
    if tied:
        tie_head(model)  # a quantized embedding's head reads its packed table
    feed: list = [None]
    originals = list(blocks)
    for i in range(n):
        blocks[i] = _Finished(i == 0, feed, as_tuple)
    nll = 0.0
    try:
        for b, x in enumerate(batches):
            feed[0], hidden[b] = hidden[b], None  # freed with this batch's logits
            placeholder = torch.zeros(*x.shape, emb.embedding_dim)  # (B, T, embedding dim)
            nll += next_token_nll(model(inputs_embeds=placeholder, use_cache=False).logits, x)  # logits (B, T, V)
            feed[0] = None
    finally:
        for i in range(n):
            blocks[i] = originals[i]
    progress(n + 1, n + 1)
    return summary(nll, windows, t0, "layerwise")


def whole_model_bytes(source: ModelSource, batch_size: int, seq_len: int) -> int:
    """The whole-model path's peak, estimated: every parameter in float32 (packed layers
    dequantized), the checkpoint's tensors as read (``materialize`` reads them all before it
    converts them; packed codes also stay beside their dequantized copies), and one batch's
    logits with cross-entropy's copies of them. Low-rank checkpoints are counted at their dense
    size (an overestimate: they load as factors)."""
    model = source.skeleton(allow_quantized=True)  # meta parameters: shapes only
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else getattr(source.config, "vocab_size", 0)
    return 4 * params + source.disk_bytes() + 3 * batch_size * seq_len * vocab * 4


def _cgroup_room() -> int | None:
    """Memory left under this container's cgroup limit (v2, else v1), page cache that the kernel
    reclaims first (inactive files) not counted as used; None without a limit."""
    for limit, usage, stat, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        root = Path("/sys/fs/cgroup")
        try:
            cap, used = int((root / limit).read_text()), int((root / usage).read_text())
        except (OSError, ValueError):  # no such file, or "max": no limit at this level
            continue
        try:
            stats = dict(line.split() for line in (root / stat).read_text().splitlines())
            used -= int(stats.get(inactive, 0))
        except (OSError, ValueError):
            pass
        return cap - used
    return None


def available_memory_bytes() -> int:
    """Memory this process can still take: the least of the machine's available memory, the room
    left under an address-space limit (``ulimit -v``, RLIMIT_AS: it counts virtual memory, so the
    process's own mappings are subtracted) and the cgroup's limit (containers)."""

    room = [psutil.virtual_memory().available]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room.append(soft - psutil.Process().memory_info().vms)
    cg = _cgroup_room()
    if cg is not None:
        room.append(cg)
    return max(0, min(room))


def use_layerwise(source: ModelSource, pc, log=print) -> bool:
    """Whether ``PerplexityConfig`` ``pc`` evaluates ``source`` layer by layer: ``layerwise: true``
    or ``false`` says so; ``auto`` does when the whole model would not fit (and logs why)."""
    if pc.layerwise != "auto":
        return bool(pc.layerwise)
    need, have = whole_model_bytes(source, pc.batch_size, pc.seq_len), available_memory_bytes()
    if need <= FIT * have:
        return False
    log(f"perplexity layer by layer: the model needs {need / 1e9:.1f} GB in fp32, {have / 1e9:.1f} GB is available")
    return True
