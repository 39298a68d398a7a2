"""What trains during distillation, chosen from what the compressing passes left behind.

``prepare(model, train, pruned)`` swaps each compressed module for the trainable view it gives
(``CompressedLinear.trainable``; the quantized formats' views are in
``compress.checkpoint.tuning``) and marks the parameters that train; ``commit(model)`` swaps the
compressed modules back with their trained tensors, so the model exports exactly as before (same
format, same packed layout).

``train`` (the pass's option):

* ``auto`` (default): each layer by what was done to it:
    - a quantized layer (``QuantLinear``, ``Int8Linear``) keeps its integer codes and zero points
      and trains its scales (``ScaleTuned``; PEQA/OmniQuant-style scale tuning), in log space,
      rounded to the storage dtype straight through, so the loss sees the scales the export stores;
    - a pruned layer trains its surviving weights; the mask is fixed (gradients masked, weights
      re-masked after every step), so the sparsity pattern is unchanged;
    - low-rank factors (``factors()`` of their module) train as ordinary weights;
    - untouched Linears, embeddings and the head stay frozen.
  The norms (and biases of the trained layers) train in every mode.
* ``scales``: only quantization scales, norms and biases.
* ``weights``: every dense Linear of the decoder blocks trains (masks still fixed), quantized
  layers their scales.
* ``qat``: quantized layers train a latent float weight (initialised from the dequantized one)
  through fake quantization with a straight-through estimator, and their scales; ``commit``
  re-quantizes it to new integer codes (LLM-QAT-style). Zero points stay fixed.

Zero points are integer codes in the compressed-tensors format, so they do not train.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.modules import factors, trainable, trainable_views
from compress.utils import replace_linear

TRAIN_MODES = ("auto", "scales", "weights", "qat")


class Prepared:
    """The parameters that train, in groups (``scales`` train in log space at their own rate),
    and the masks that keep pruned weights at zero."""

    def __init__(self):
        self.groups: dict[str, list[nn.Parameter]] = {"scales": [], "weights": [], "norms": []}
        self.masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.counts: dict[str, int] = {"quantized": 0, "qat": 0, "pruned": 0, "lowrank": 0, "dense": 0, "norms": 0}

    def parameters(self) -> list[nn.Parameter]:
        return [p for ps in self.groups.values() for p in ps]

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def apply_masks(self) -> None:
        for p, m in self.masks:
            p.mul_(m)


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower() and any(True for _ in mod.parameters(recurse=False))


def prepare(model: nn.Module, train: str = "auto", pruned: set[str] = frozenset(), blocks_path: str | None = None) -> Prepared:
    """Freeze ``model``, then make trainable what ``train`` says (module docstring). ``pruned``:
    full names of pruned Linears (their zeros are a mask); ``blocks_path``: the decoder blocks'
    ModuleList (dense Linears outside it never train; None: the whole model is one block)."""
    if train not in TRAIN_MODES:
        raise ValueError(f"train: {train!r} is not one of {', '.join(TRAIN_MODES)}")
    prep = Prepared()
    for p in model.parameters():
        p.requires_grad_(False)
    subs = {f"{n}.{f}" for n, m in model.named_modules() for f in factors(m)}
    for name, mod in list(model.named_modules()):
        new = trainable(mod, train)
        if new is not None:
            replace_linear(model, name, new)
            for group, params in new.train_groups().items():
                prep.groups[group].extend(params)
            prep.counts[new.counts_as] += 1
        elif type(mod) is nn.Linear:
            in_blocks = blocks_path is None or name.startswith(blocks_path + ".")
            kind = "pruned" if name in pruned else "lowrank" if name in subs else "dense"
            trains = in_blocks and (train == "weights" or train in ("auto", "qat") and kind != "dense")
            if trains:
                mod.weight.requires_grad_(True)
                prep.groups["weights"].append(mod.weight)
                if mod.bias is not None:
                    mod.bias.requires_grad_(True)
                    prep.groups["weights"].append(mod.bias)
                if kind == "pruned":
                    mask = mod.weight.detach() != 0
                    prep.masks.append((mod.weight, mask))
                    mod.weight.register_hook(lambda g, m=mask: g * m)
                prep.counts[kind] += 1
        elif _is_norm(mod):  # the blocks' norms and the final one
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
                prep.groups["norms"].append(p)
            prep.counts["norms"] += 1
    return prep


def commit(model: nn.Module) -> None:
    """Put the compressed modules back, holding their trained scales (and codes, for qat)."""
    for name, view in trainable_views(model):
        replace_linear(model, name, view.commit())
    for p in model.parameters():
        p.requires_grad_(False)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor's current value, by parameter name (to restore the best
    or last good weights)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, t in saved.items():
        params[n].copy_(t)
