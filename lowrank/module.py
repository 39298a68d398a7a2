"""``LowRankLinear``: a Linear replaced by two, y = B(A(x)), and how exports store it.

The factors are ordinary submodules: ``A`` (in → rank, no bias) and ``B`` (rank → out, the
original bias), plain ``nn.Linear`` with trainable parameters (distillation trains them), or
compressed modules themselves when a quantization pass ran on the factors (``lowrank`` then
``rtn``/``gptq`` in one recipe). Their state_dict is the export: ``<layer>.A.weight``,
``<layer>.B.weight``, ``<layer>.B.bias`` (or the packed tensors of a quantized factor), and
``compress.json`` lists each layer's rank under ``lowrank.layers`` (``lowrank_metadata`` writes
the section, ``stored_layers`` reads it) so ``compress.load`` rebuilds the module. A ``merged``
export stores ``merged()``, the factors multiplied back into ``<layer>.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.checkpoint.source import read_metadata
from compress.errors import InputError
from compress.modules import CompressedLinear, dense_weight, register_module_type


@register_module_type
class LowRankLinear(CompressedLinear):
    container = True  # stores its factors (plain or quantized Linears), nothing else
    merge_on_export = True  # export.lowrank: merged stores B·A as one dense weight

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 A: nn.Module | None = None, B: nn.Module | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = A if A is not None else nn.Linear(in_features, rank, bias=False, device=device)
        self.B = B if B is not None else nn.Linear(rank, out_features, bias=bias, device=device)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """B (out, r), A (r, in) and the bias (out,), copied into new parameters."""
        m = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None)
        m.A.weight.data = A.detach().clone().float()
        m.B.weight.data = B.detach().clone().float()
        if bias is not None:
            m.B.bias.data = bias.detach().clone().float()
        return m

    @property
    def bias(self):
        return getattr(self.B, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def parameters_kept(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    # the compressed-module protocol (compress.modules); merged() is the base's: B·A and the bias
    def factors(self) -> dict[str, nn.Module]:
        return {"A": self.A, "B": self.B}

    def dense_weight(self) -> torch.Tensor:
        return dense_weight(self.B) @ dense_weight(self.A)

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return _stored(source, sparse=False)

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> LowRankLinear:
        info = read_metadata(source.path)["lowrank"]["layers"][name]
        r = int(info["rank"])
        if not 1 <= r <= min(linear.in_features, linear.out_features):
            raise InputError(f"{source.path / 'compress.json'}: {name} has rank {r}, outside [1, {min(linear.in_features, linear.out_features)}]")
        # plain meta factors: the loader fills them like any Linear, and replaces a quantized one
        # (``<name>.A`` among its stored layers) with its compressed type, as it does any layer
        return cls(linear.in_features, linear.out_features, r, bias=linear.bias is not None, device="meta")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _stored(source, sparse: bool) -> list[str]:
    """The factored layers of a ``factored`` export: with a sparse residual (``sparse_nonzeros``
    in their metadata) or without; a rank of None means the layer was left dense."""
    lr = read_metadata(source.path).get("lowrank", {})
    if lr.get("export") != "factored":
        return []
    return sorted(k for k, v in lr.get("layers", {}).items() if v.get("rank") is not None and ("sparse_nonzeros" in v) == sparse)


@register_module_type
class LoSparseLinear(LowRankLinear):
    """y = B(A(x)) + S·x: the low-rank factors plus a sparse residual S (``lowrank.losparse``).

    S (out, in) is a frozen parameter stored densely (zeros outside its support; the mask is
    S ≠ 0): ``<layer>.S`` beside ``<layer>.A.weight`` and ``<layer>.B.weight``, and
    ``compress.json`` gives its nonzero count (``sparse_nonzeros``), which the parameter count
    uses. A ``merged`` export stores B·A + S as one dense weight. Distillation trains A and B;
    S stays as fitted (training it densely would lose its sparsity)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 A: nn.Module | None = None, B: nn.Module | None = None, device=None):
        super().__init__(in_features, out_features, rank, bias, A, B, device)
        self.S = nn.Parameter(torch.zeros(out_features, in_features, device=device), requires_grad=False)

    @classmethod
    def from_parts(cls, B: torch.Tensor, A: torch.Tensor, S: torch.Tensor, bias: torch.Tensor | None = None) -> LoSparseLinear:
        """B (out, r), A (r, in), S (out, in) and the bias (out,), copied into new parameters."""
        m = cls.from_factors(B, A, bias)
        m.S.data = S.detach().clone().float()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) + nn.functional.linear(x, self.S.to(x.dtype))

    @property
    def nonzeros(self) -> int:
        return int((self.S != 0).sum())

    @property
    def parameters_kept(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self.nonzeros

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight() + self.S.detach().float()

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return _stored(source, sparse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse_nonzeros={self.nonzeros if not self.S.is_meta else '?'}"


def lowrank_metadata(layers: list, export: str) -> dict | None:
    """The ``lowrank`` section of ``compress.json`` from the run's ``LayerReport``s (those the
    lowrank pass ran on carry a ``rank`` in their info, None where a layer stayed dense);
    ``export``: ``factored`` or ``merged`` (ExportConfig.lowrank). None when no layer was factored."""
    factored = {r.name: r.info for r in layers if "rank" in r.info}
    if not factored:
        return None
    return {
        "export": export,
        "method": min({i["method"] for i in factored.values()}),
        "parameters_kept": sum(i["params_kept"] for i in factored.values()),
        "parameters_dense": sum(i["params_dense"] for i in factored.values()),
        "layers": {k: {"rank": i["rank"], "params_kept": i["params_kept"],
                       **({"sparse_nonzeros": i["sparse_nonzeros"]} if i.get("sparse_nonzeros") is not None and i["rank"] is not None else {})}
                   for k, i in sorted(factored.items())},
    }
