"""The compressed-tensors ``pack-quantized`` format, and the runtime module that holds it.

Bit layout (the one compressed-tensors writes and vLLM reads): signed integer values
``v = q - 2^(bits-1)`` are offset back to unsigned and laid out as one little-endian bit stream
per row along the packed dimension: value ``i`` occupies bits ``[i·bits, (i+1)·bits)`` of the
stream, 32 bits per int32 word, so ``ceil(n·bits / 32)`` words hold ``n`` values (for 3, 5, 6 and 7
bits a value may straddle two words). Weights are packed along the input dimension (dim 1), zero
points along the output dimension (dim 0). vLLM serves 4 and 8 bits; other widths are for our
own runtime.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FIELDS = ("num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder", "observer", "observer_kwargs")


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed values in ``[-2^(bits-1), 2^(bits-1))`` (rows, n) -> int32 (rows, ceil(n·bits/32))
    (transposed roles for ``dim=0``)."""
    v = values.to(torch.int64) + (1 << (bits - 1))  # unsigned codes
    if dim == 0:
        v = v.T
    rows, n = v.shape
    bitplanes = (v.unsqueeze(-1) >> torch.arange(bits)) & 1  # (rows, n, bits), LSB first
    stream = bitplanes.reshape(rows, n * bits)
    words = math.ceil(n * bits / 32)
    stream = F.pad(stream, (0, words * 32 - n * bits)).reshape(rows, words, 32)
    packed = (stream << torch.arange(32)).sum(-1)  # int64 in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement
    return packed.T.contiguous() if dim == 0 else packed


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: ``size`` signed values per row (int32)."""
    p = packed.T if dim == 0 else packed
    rows, words = p.shape
    stream = ((p.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1).reshape(rows, words * 32)
    planes = stream[:, : size * bits].reshape(rows, size, bits)
    v = (planes << torch.arange(bits)).sum(-1) - (1 << (bits - 1))
    v = v.to(torch.int32)
    return v.T.contiguous() if dim == 0 else v


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as exported (compressed-tensors pack-quantized).

    Buffers (the module's state_dict *is* the checkpoint's tensors for this layer):
      weight_packed      int32  (out, ceil(in·bits/32))        codes, packed along in
      weight_scale       scale_dtype (out, G)                  per-group scales
      weight_zero_point  int32  (ceil(out·bits/32), G)         asymmetric only; packed along out
      weight_g_idx       int32  (in,)                          act-order only: group of each column
      weight_shape       int64  (2,)                           [out, in]
      bias               bias_dtype (out,)                     when the Linear has one

    ``forward`` is the torch reference path: dequantize to float32, cast to the input's dtype,
    ``F.linear``. It is also the oracle the fast kernels are tested against.
    """

    kernel = "torch"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        has_g_idx: bool = False,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.bfloat16,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        G = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, math.ceil(in_features * bits / 32), dtype=torch.int32))
        self.register_buffer("weight_scale", torch.zeros(out_features, G, dtype=scale_dtype))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(math.ceil(out_features * bits / 32), G, dtype=torch.int32))
        if has_g_idx:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, bias_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Pack a ``compress.quant.rtn.QuantResult`` (unsigned codes, float32 scales)."""
        s = result.scheme
        out_f, in_f = result.q.shape
        m = cls(
            in_f, out_f, s.bits, s.group_size, s.symmetric, has_g_idx=result.act_order, bias=bias is not None,
            scale_dtype=s.scale_dtype, bias_dtype=bias_dtype or (bias.dtype if bias is not None else torch.float32),
        )
        half = 1 << (s.bits - 1)
        m.weight_packed.copy_(pack_int32(result.q - half, s.bits, dim=1))
        m.weight_scale.copy_(result.scale.to(s.scale_dtype))
        if not s.symmetric:
            m.weight_zero_point.copy_(pack_int32(result.zero - half, s.bits, dim=0))
        if result.act_order:
            m.weight_g_idx.copy_(result.g_idx)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def g_idx(self) -> torch.Tensor:
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        gw = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.weight_packed.device) // gw

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): (q - z) · s with each column's group from g_idx."""
        v = unpack_int32(self.weight_packed, self.bits, self.in_features, dim=1).float()  # q - 2^(b-1)
        g = self.g_idx()
        s = self.weight_scale.float()[:, g]
        if self.symmetric:
            return v * s
        z = unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0).float()  # z - 2^(b-1)
        return (v - z[:, g]) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "act_order": hasattr(self, "weight_g_idx")}

    @property
    def bits_per_weight(self) -> float:
        n = self.in_features * self.out_features
        total = sum(t.numel() * t.element_size() * 8 for name, t in self.state_dict().items() if name.startswith("weight_"))
        return total / n

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"in={self.in_features}, out={self.out_features}, int{self.bits} {kind} {g}, bias={self.bias is not None}, kernel={self.kernel}"


def quantization_config(groups: list[dict], ignore: list[str]) -> dict:
    """``quantization_config`` for config.json. Each group: targets, bits, group_size (-1 =
    channel), symmetric, act_order. Only weight fields that the compressed-tensors versions vLLM
    pins also know are written (vLLM's parser rejects unknown ones)."""
    import compressed_tensors

    cfg_groups = {}
    for i, g in enumerate(groups):
        channel = g["group_size"] == -1
        cfg_groups[f"group_{i}"] = {
            "targets": list(g["targets"]),
            "weights": {
                "num_bits": g["bits"],
                "type": "int",
                "symmetric": g["symmetric"],
                "group_size": None if channel else g["group_size"],
                "strategy": "channel" if channel else "group",
                "block_structure": None,
                "dynamic": False,
                "actorder": "group" if g["act_order"] else None,
                "observer": "minmax",
                "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": cfg_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "version": compressed_tensors.__version__,
    }


def read_quantization_config(cfg: dict) -> dict[str, dict]:
    """config.json's ``quantization_config`` -> {group name: {targets, bits, group_size,
    symmetric, act_order}}; a ValueError names the field we cannot serve."""
    from compress.errors import InputError

    if cfg.get("quant_method") != "compressed-tensors":
        raise InputError(f"quantization_config.quant_method is {cfg.get('quant_method')!r}; compress reads 'compressed-tensors'")
    out = {}
    for name, g in cfg.get("config_groups", {}).items():
        fmt = g.get("format") or cfg.get("format")
        if fmt != "pack-quantized":
            raise InputError(f"quantization_config.config_groups.{name}.format is {fmt!r}; this version reads 'pack-quantized'")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int":
            raise InputError(f"quantization_config.config_groups.{name}.weights.type is {w.get('type')!r}; only 'int' is supported")
        if g.get("input_activations"):
            raise InputError(f"quantization_config.config_groups.{name}.input_activations: activation quantization is not supported yet")
        strategy = w.get("strategy", "group")
        if strategy not in ("group", "channel"):
            raise InputError(f"quantization_config.config_groups.{name}.weights.strategy {strategy!r} is not supported (group, channel)")
        out[name] = {
            "targets": list(g.get("targets", [])),
            "bits": int(w["num_bits"]),
            "group_size": -1 if strategy == "channel" else int(w["group_size"]),
            "symmetric": bool(w.get("symmetric", True)),
            "act_order": w.get("actorder") == "group",
        }
    return out


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
