"""What trains during distillation, chosen from what the compressing passes left behind.

``prepare(model, train, pruned)`` swaps each compressed module for a trainable view of it and
marks the parameters that train; ``commit(model)`` swaps the compressed modules back with their
trained tensors, so the model exports exactly as before (same format, same packed layout).

``train`` (the pass's option):

* ``auto`` (default): each layer by what was done to it:
    - a quantized layer (``QuantLinear``, ``Int8Linear``) keeps its integer codes and zero points
      and trains its scales (``ScaleTuned``; PEQA/OmniQuant-style scale tuning). Scales train in
      log space (a step changes every scale by the same relative amount, whatever its size) and
      the forward rounds them to the storage dtype with a straight-through estimator, so the loss
      sees exactly the scales the export stores;
    - a pruned layer trains its surviving weights; the mask is fixed (gradients masked, weights
      re-masked after every step), so the sparsity pattern is unchanged;
    - low-rank factors train as ordinary weights;
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
import torch.nn.functional as F
from torch import nn

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.packing import pack_int32, unpack_int32
from compress.utils import replace_linear

TRAIN_MODES = ("auto", "scales", "weights", "qat")


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in the forward, the identity's gradient to x in the backward."""
    return x + (y - x).detach()


def _stored(log_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(θ) rounded to the storage dtype, straight through."""
    s = log_scale.exp()
    return _ste(s, s.to(dtype).float())


def _codes(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, z) of a QuantLinear as unsigned integers (int16): q (out, in), z (out, G)."""
    half = 1 << (q.bits - 1)
    v = unpack_int32(q.weight_packed, q.bits, q.in_features, dim=1, dense=q.dense).to(torch.int16) + half
    if q.symmetric:
        z = torch.full_like(q.weight_scale, half, dtype=torch.int16)
    else:
        z = unpack_int32(q.weight_zero_point, q.bits, q.out_features, dim=0, dense=q.dense).to(torch.int16) + half
    return v, z


class _ScaleView(nn.Module):
    """What every trainable view of a quantized module shares: the module it stands for
    (``inner``), its scales as a trainable log-space parameter, its bias (trainable too)."""

    def __init__(self, q: nn.Module, train_bias: bool = True):
        super().__init__()
        self.inner = q
        self.log_scale = nn.Parameter(q.weight_scale.float().clamp_min(1e-30).log())
        self.scale_dtype = q.weight_scale.dtype
        self.bias = q.bias
        if self.bias is not None:
            self.bias.requires_grad_(train_bias)

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def commit(self) -> nn.Module:
        """The quantized module again, holding the trained scales."""
        self.inner.weight_scale.copy_(self.log_scale.exp().to(self.scale_dtype))
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return self.inner


class ScaleTuned(_ScaleView):
    """A ``QuantLinear`` whose codes are fixed and whose scales train: Ŵ = (q − z)·exp(θ)[group]."""

    def __init__(self, q: QuantLinear, train_bias: bool = True):
        super().__init__(q, train_bias)
        v, z = _codes(q)
        self.g = q.g_idx()
        self.register_buffer("diff", v - z[:, self.g], persistent=False)  # q − z, int16 (out, in)

    def weight(self) -> torch.Tensor:
        return self.diff.float() * _stored(self.log_scale, self.scale_dtype)[:, self.g]

    def forward(self, x):
        return self._linear(x, self.weight())


class QatLinear(_ScaleView):
    """Quantization-aware training of a ``QuantLinear``: a latent float weight W, fake-quantized
    in the forward, q = clamp(round(W / s) + z, 0, 2^b − 1), Ŵ = (q − z)·s, rounding straight
    through; scales train too (log space). ``commit`` stores the new codes and scales."""

    def __init__(self, q: QuantLinear, train_bias: bool = True):
        super().__init__(q, train_bias)
        _, z = _codes(q)
        self.g = q.g_idx()
        self.register_buffer("zero", z.float()[:, self.g], persistent=False)
        self.weight = nn.Parameter(q.dequantize())
        self.qmax = (1 << q.bits) - 1

    def fake_weight(self) -> torch.Tensor:
        s = _stored(self.log_scale, self.scale_dtype)[:, self.g]
        u = self.weight / s
        q = _ste(u, u.round()).add(self.zero).clamp(0, self.qmax)
        return (q - self.zero) * s

    def forward(self, x):
        return self._linear(x, self.fake_weight())

    @torch.no_grad()
    def commit(self) -> QuantLinear:
        q = self.inner
        s = self.log_scale.exp().to(self.scale_dtype)
        codes = (self.weight / s.float()[:, self.g]).round().add(self.zero).clamp(0, self.qmax).to(torch.int32)
        q.weight_packed.copy_(pack_int32(codes - (1 << (q.bits - 1)), q.bits, dim=1, dense=q.dense))
        return super().commit()


class Int8ScaleTuned(_ScaleView):
    """A W8A8 ``Int8Linear`` with fixed int8 codes and trainable per-channel scales; the per-token
    int8 rounding of the input is straight through."""

    def __init__(self, q: Int8Linear, train_bias: bool = True):
        super().__init__(q, train_bias)
        self.register_buffer("codes", q.weight.to(torch.int16), persistent=False)

    def forward(self, x):
        s_x = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        xq = _ste(x, (x / s_x).round().clamp(-127, 127) * s_x)
        return self._linear(xq, self.codes.float() * _stored(self.log_scale, self.scale_dtype))


WRAPPERS = (ScaleTuned, QatLinear, Int8ScaleTuned)


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
    from compress.lowrank.module import LowRankLinear

    if train not in TRAIN_MODES:
        raise ValueError(f"train: {train!r} is not one of {', '.join(TRAIN_MODES)}")
    prep = Prepared()
    for p in model.parameters():
        p.requires_grad_(False)
    factors = {f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in m.factors()}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            new = QatLinear(mod) if train == "qat" else ScaleTuned(mod)
            replace_linear(model, name, new)
            if train == "qat":
                prep.groups["weights"].append(new.weight)
                prep.counts["qat"] += 1
            else:
                prep.counts["quantized"] += 1
            prep.groups["scales"].append(new.log_scale)
            if new.bias is not None:
                prep.groups["weights"].append(new.bias)
        elif isinstance(mod, Int8Linear):
            new = Int8ScaleTuned(mod)
            replace_linear(model, name, new)
            prep.groups["scales"].append(new.log_scale)
            prep.counts["quantized"] += 1
        elif type(mod) is nn.Linear:
            in_blocks = blocks_path is None or name.startswith(blocks_path + ".")
            kind = "pruned" if name in pruned else "lowrank" if name in factors else "dense"
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
    for name, mod in list(model.named_modules()):
        if isinstance(mod, WRAPPERS):
            replace_linear(model, name, mod.commit())
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
