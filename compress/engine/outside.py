"""The apply_outside stage: passes compress modules outside the decoder blocks (a quantized token
embedding, an lm_head). It runs twice: before block 0 (phase ``before``: what needs no activations;
while block 0's inputs are captured a compressed embedding computes them, so the sweep calibrates on
what the compressed model feeds its blocks, ``SweepOptions.propagate``), and after the last block
(phase ``after``: the head's input statistics exist, the final norm of the compressed model's last
hidden states). The sink (the exporter) stores what each phase returns in place of the source's
tensors.
"""

from __future__ import annotations

import time

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from compress.checkpoint.source import check_finite, materialize
from compress.engine.context import Sweep
from compress.engine.inputs import BlockInputs, Stop, on, to_device
from compress.engine.records import LayerReport, OutsideResult
from compress.errors import UsageError
from compress.passes import hessian_accumulate, hessian_init
from compress.utils import get_module, replace_linear


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class OutsideStage:
    """What ``Pass.apply_outside`` sees.

    ``phase``: "before" (block 0) or "after" (the last block); ``embedding``: full name of the
    token embedding (``model.embed_tokens``); ``head``: the output head's (``lm_head``; None
    without one); ``tied``: the head computes with the embedding's weight (one stored tensor);
    ``module(name)``: the skeleton's module there (meta: shapes, class, ``padding_idx``);
    ``weight(name)``, ``bias(name)``: its tensors from the checkpoint, float32 on ``device``
    (``bias``: None without one); ``head_hessian()`` (phase "after", with calibration data):
    H = Σ xxᵀ (d, d) of the head's input over the calibration tokens, summed over the ranks."""

    def __init__(self, sweep: Sweep, phase: str, final: BlockInputs | None = None):
        self.sweep, self.phase, self.final = sweep, phase, final
        self.source, self.model, self.device = sweep.source, sweep.model, sweep.device
        self.embedding = _name_of(self.model, self.model.get_input_embeddings())
        head = self.model.get_output_embeddings()
        self.head = None if head is None else _name_of(self.model, head)
        self.tied = self.head is not None and bool(getattr(self.source.config, "tie_word_embeddings", False))
        self._H: torch.Tensor | None = None

    def module(self, name: str) -> nn.Module:
        return get_module(self.model, name)

    def weight(self, name: str) -> torch.Tensor:
        key = f"{name}.weight"
        t = self.source.read([key])[key]
        check_finite(key, t, self.source.path)
        return t.to(self.device).float()

    def bias(self, name: str) -> torch.Tensor | None:
        key = f"{name}.bias"
        return self.source.read([key])[key].to(self.device).float() if self.source.has(key) else None

    def head_hessian(self) -> torch.Tensor:
        if self.final is None or self.head is None:
            raise ValueError("the head's input statistics exist after the last block, with calibration data, in a model with a head")
        if self._H is None:
            self._H = _head_hessian(self.sweep, self.final.hidden, self.embedding, self.head)
        return self._H


class _Feed(nn.Module):
    """Stands in for every block: block 0 returns the batch's final hidden states (``feed[0]``)
    in place of the embeddings it is given, the others pass them on; ``wrap``: as the first item
    of a tuple, for the families whose blocks return one (falcon, bloom: the model reads ``[0]``)."""

    def __init__(self, first: bool, feed: list, wrap: bool):
        super().__init__()
        self.first, self.feed, self.wrap = first, feed, wrap

    def forward(self, hidden_states, *args, **kwargs):
        h = self.feed[0] if self.first else hidden_states
        return (h,) if self.wrap else h


def _head_input(model: nn.Module, blocks: nn.ModuleList, h: torch.Tensor, width: int, head: nn.Module) -> torch.Tensor | None:
    """The head's input (B, T, d) when the model's forward after its blocks runs on the final
    hidden states ``h`` (B, T, d): blocks that return a tensor, else a tuple; None if neither
    form gets there whole."""
    seen: list[torch.Tensor] = []

    def take(module, args):
        seen.append(args[0].detach())
        raise Stop

    hook = head.register_forward_pre_hook(take)
    originals, feed = list(blocks), [h]
    try:
        for wrap in (False, True):
            for i in range(len(blocks)):
                blocks[i] = _Feed(i == 0, feed, wrap)
            try:
                model(inputs_embeds=torch.zeros(*h.shape[:2], width, device=h.device), use_cache=False)
            except Stop:
                if seen and seen[-1].shape[:-1] == h.shape[:-1]:
                    return seen[-1]
            except (IndexError, RuntimeError, TypeError, ValueError):
                pass  # the other form
    finally:
        hook.remove()
        for i in range(len(blocks)):
            blocks[i] = originals[i]
    return None


def _head_hessian(sweep: Sweep, hidden: list[torch.Tensor], embedding: str, head: str) -> torch.Tensor:
    """Σ xxᵀ of the head's input: the model's own forward after its blocks (the final norm, any
    projection) on the final hidden states ``hidden`` (one (B, T, d) tensor per batch), stopped at
    the head. Only the modules between the blocks and the head are loaded, then freed."""
    model, world = sweep.model, sweep.world
    skip = (sweep.blocks_path + ".", embedding + ".", head + ".")
    tail = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(skip)]
    materialize(model, "", sweep.source, skip={n for n, _ in model.named_parameters() if n.startswith(skip)})
    to_device(model, world.device)
    state = hessian_init(get_module(model, head).in_features)
    width = get_module(model, embedding).embedding_dim
    try:
        with torch.no_grad(), on(world.device):
            for h in hidden:
                x = _head_input(model, sweep.blocks, h.to(world.device), width, get_module(model, head))
                if x is None:
                    raise UsageError(f"{sweep.model_type}: the model's forward after its blocks could not be run on their "
                                     "outputs to observe lm_head's input; use embeddings.method: rtn")
                hessian_accumulate(state, x)
    finally:
        for name in tail:
            set_module_tensor_to_device(model, name, "meta")
    world.reduce_stats({head: {"hessian": state}})
    return state["H"]


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` under ``root``, making empty parents as needed."""
    *path, leaf = name.split(".")
    for part in path:
        child = getattr(root, part, None)
        if child is None:
            child = nn.Module()
            setattr(root, part, child)
        root = child
    setattr(root, leaf, module)


def run_outside(sweep: Sweep, phase: str, final: BlockInputs | None = None) -> OutsideResult | None:
    """The apply_outside stage in ``phase``: "before" block 0, or "after" the last block (``final``:
    the activations leaving it; None without calibration data). None where no pass compressed
    anything in this phase."""
    passes = sweep.taking_part("apply_outside")
    if not passes:
        return None
    t0 = time.time()
    stage = OutsideStage(sweep, phase, final)
    holder, layers = nn.Module(), []
    with on(sweep.device):  # the passes' solvers run where the sweep computes
        for p in passes:
            for name, (module, info) in p.apply_outside(stage).items():
                _place(holder, name, module)
                layers.append(LayerReport(name, [p.name], info.pop("rel_output_error", None), info))
    if not layers:
        return None
    holder.to("cpu")  # what the exporter writes
    names = [r.name for r in layers]
    if stage.tied and stage.embedding in names:
        names.append(stage.head)  # a copy of the tied head a checkpoint may store goes too
    replaces = [t for t in sweep.source.weight_map if any(t.startswith(n + ".") for n in names)]
    return OutsideResult(holder, layers, time.time() - t0, replaces, stage.phase)


def swap_in(model: nn.Module, outside: OutsideResult | None) -> dict[str, nn.Module]:
    """Put the compressed outside modules in ``model`` (for a forward); returns what they replaced."""
    if outside is None:
        return {}
    return {r.name: replace_linear(model, r.name, get_module(outside.module, r.name)) for r in outside.layers}


def swap_out(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo ``swap_in``: the skeleton's modules back in place."""
    for name, module in replaced.items():
        replace_linear(model, name, module)
