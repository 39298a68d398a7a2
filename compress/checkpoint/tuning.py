"""Trainable views of the quantized formats: what distillation trains in place of a ``QuantLinear``
or an ``Int8Linear`` (their ``trainable(train)`` returns one of these).

* ``ScaleTuned``: a ``QuantLinear``'s integer codes and zero points stay fixed and its scales
  train (PEQA/OmniQuant-style scale tuning);
* ``QatLinear``: a latent float weight trains through fake quantization, and the scales
  (LLM-QAT-style); ``commit`` re-quantizes it to new codes;
* ``Int8ScaleTuned``: a W8A8 ``Int8Linear``'s per-channel scales train, its codes fixed.

Scales train in log space (a step changes every scale by the same relative amount, whatever its
size) and the forward rounds them to the storage dtype with a straight-through estimator, so the
loss sees exactly the scales the export stores. ``commit()`` writes the trained values back into
the module and returns it: same format, same packed layout. Zero points are integer codes in the
compressed-tensors format, so they do not train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint.packing import pack_int32, unpack_int32
from compress.modules import TrainableView

if TYPE_CHECKING:  # the formats import this module
    from compress.checkpoint.formats import Int8Linear, QuantLinear


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in the forward, the identity's gradient to x in the backward."""
    return x + (y - x).detach()


def _stored(log_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(θ) rounded to the storage dtype, straight through."""
    s = log_scale.exp()
    return _ste(s, s.to(dtype).float())


def _codes(q: "QuantLinear") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, z) of a QuantLinear as unsigned integers (int16): q (out, in), z (out, G)."""
    half = 1 << (q.bits - 1)
    v = unpack_int32(q.weight_packed, q.bits, q.in_features, dim=1, dense=q.dense).to(torch.int16) + half
    if q.symmetric:
        z = torch.full_like(q.weight_scale, half, dtype=torch.int16)
    else:
        z = unpack_int32(q.weight_zero_point, q.bits, q.out_features, dim=0, dense=q.dense).to(torch.int16) + half
    return v, z


class _ScaleView(TrainableView):
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

    def train_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"scales": [self.log_scale], "weights": [] if self.bias is None else [self.bias]}

    @torch.no_grad()
    def commit(self) -> nn.Module:
        """The quantized module again, holding the trained scales."""
        self.inner.weight_scale.copy_(self.log_scale.exp().to(self.scale_dtype))
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return self.inner


class ScaleTuned(_ScaleView):
    """A ``QuantLinear`` whose codes are fixed and whose scales train: Ŵ = (q − z)·exp(θ)[group]."""

    def __init__(self, q: "QuantLinear", train_bias: bool = True):
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

    counts_as = "qat"

    def __init__(self, q: "QuantLinear", train_bias: bool = True):
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

    def train_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().train_groups()
        return {**groups, "weights": [self.weight, *groups["weights"]]}

    @torch.no_grad()
    def commit(self) -> "QuantLinear":
        q = self.inner
        s = self.log_scale.exp().to(self.scale_dtype)
        codes = (self.weight / s.float()[:, self.g]).round().add(self.zero).clamp(0, self.qmax).to(torch.int32)
        q.weight_packed.copy_(pack_int32(codes - (1 << (q.bits - 1)), q.bits, dim=1, dense=q.dense))
        return super().commit()


class Int8ScaleTuned(_ScaleView):
    """A W8A8 ``Int8Linear`` with fixed int8 codes and trainable per-channel scales; the per-token
    int8 rounding of the input is straight through."""

    def __init__(self, q: "Int8Linear", train_bias: bool = True):
        super().__init__(q, train_bias)
        self.register_buffer("codes", q.weight.to(torch.int16), persistent=False)

    def forward(self, x):
        s_x = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        xq = _ste(x, (x / s_x).round().clamp(-127, 127) * s_x)
        return self._linear(xq, self.codes.float() * _stored(self.log_scale, self.scale_dtype))

    def train_groups(self) -> dict[str, list[nn.Parameter]]:
        # the scales only: the bias is marked trainable (train_bias) but was never given to the
        # optimizer for W8A8 layers; kept as it was
        return {"scales": [self.log_scale]}
