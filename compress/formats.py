"""The compressed-tensors ``pack-quantized`` format, and the runtime module that holds it.

A quantized Linear is stored as these tensors (the names compressed-tensors, transformers and
vLLM read; ``QuantLinear``'s state_dict is exactly this set):

    weight_packed      int32        (out, packed_size(in))        codes, packed along in (dim 1)
    weight_scale       scale dtype  (out, G)                      per-group scales (bf16 default)
    weight_zero_point  int32        (packed_size(out), G)         asymmetric only; packed along out (dim 0)
    weight_g_idx       int32        (in,)                         act-order only: group of each column
    weight_shape       int64        (2,)                          [out, in]
    bias               bias dtype   (out,)                        when the Linear has one

``G = in / group_size`` (one group per row for ``group_size = -1``, the "channel" strategy).

Bit layout. Codes and zero points are stored *signed*, ``v = q - 2^(bits-1)`` (compressed-tensors'
convention), and packed as the unsigned ``v + 2^(bits-1)``. Along the packed dimension every run
of values is one little-endian bit stream: value ``i`` occupies stream bits
``[i·bits, (i+1)·bits)`` and int32 word ``k`` holds stream bits ``[32k, 32k + 32)``, bit 0 first.
Two layouts exist, and they differ only for widths that do not divide 32:

* ``dense=True`` (compressed-tensors >= 0.18): one stream per row, ``ceil(n·bits / 32)`` words;
  for 3, 5, 6 and 7 bits a value may straddle two words.
* ``dense=False`` (compressed-tensors <= 0.17): ``32 // bits`` values per word, never straddling;
  the top ``32 mod bits`` bits of each word are unused; ``ceil(n / (32 // bits))`` words.

For 2, 4 and 8 bits the two are the same bits. We write dense (what the pinned library reads)
and read either, choosing by the ``version`` recorded in the checkpoint's config. vLLM serves
only 4 and 8 bits; other widths run on our own runtime (and transformers' dequantizing loader).
"""

from __future__ import annotations

import math
from importlib.metadata import version as _dist_version

import torch
import torch.nn.functional as F
from packaging.version import InvalidVersion, Version
from torch import nn

from compress.errors import InputError

# QuantizationArgs fields that every compressed-tensors version from 0.9 to 0.20 knows. vLLM pins
# an older compressed-tensors whose pydantic models forbid unknown fields (0.12+), so a config
# that names a newer field (scale_dtype, zp_dtype, ...) would be refused there.
WEIGHT_FIELDS = (
    "num_bits", "type", "symmetric", "group_size", "strategy",
    "block_structure", "dynamic", "actorder", "observer", "observer_kwargs",
)
DENSE_SINCE = (0, 18)  # the first compressed-tensors release that packs 3/5/6/7 bits densely


class FormatError(InputError, ValueError):
    """A checkpoint's quantization_config asks for something this runtime cannot serve."""


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 to pack into int32, got {bits}")


def _layout(bits: int, dense: bool) -> tuple[int, int]:
    """(values, words) per packing unit: 32 values fill exactly ``bits`` words when dense."""
    return (32, bits) if dense else (32 // bits, 1)


def packed_size(n: int, bits: int, dense: bool = True) -> int:
    """Number of int32 words that hold ``n`` values of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(n * bits / 32) if dense else math.ceil(n / (32 // bits))


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1, *, dense: bool = True) -> torch.Tensor:
    """Pack signed integers in ``[-2^(bits-1), 2^(bits-1))`` into int32 words along ``dim``.

    values: any integer dtype, any shape; size ``n`` along ``dim``.
    Returns int32 of the same shape except ``packed_size(n, bits, dense)`` along ``dim``.
    """
    _check_bits(bits)
    half = 1 << (bits - 1)
    u = values.to(torch.int64).movedim(dim, -1) + half  # (..., n) unsigned codes
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        # out-of-range values would spill into their neighbours' bits
        raise ValueError(f"values out of the signed {bits}-bit range [{-half}, {half - 1}]")
    n = u.shape[-1]
    per, words = _layout(bits, dense)
    units = math.ceil(n / per)
    u = F.pad(u, (0, units * per - n)).reshape(*u.shape[:-1], units, per)  # (..., units, per)
    # int64 so that shifting into bit 31 is plain arithmetic; converted to two's complement below
    out = u.new_zeros(*u.shape[:-1], words)  # (..., units, words)
    for i in range(per):
        word, off = divmod(i * bits, 32)
        out[..., word] |= (u[..., i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles (dense only): the high bits open the next word
            out[..., word + 1] |= u[..., i] >> (32 - off)
    # dense units hold whole multiples of 32 values; words past ceil(n·bits/32) are pure padding
    out = out.reshape(*out.shape[:-2], units * words)[..., : packed_size(n, bits, dense)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1, *, dense: bool = True) -> torch.Tensor:
    """Inverse of ``pack_int32``: ``size`` signed values along ``dim`` (int32)."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    p = packed.movedim(dim, -1)  # (..., words)
    if p.shape[-1] != packed_size(size, bits, dense):
        raise ValueError(f"{p.shape[-1]} words along dim {dim} cannot hold exactly {size} {bits}-bit values")
    per, words = _layout(bits, dense)
    units = math.ceil(size / per)
    p = F.pad(p, (0, units * words - p.shape[-1])).reshape(*p.shape[:-1], units, words)
    out = p.new_empty(*p.shape[:-1], per)  # (..., units, per)
    for i in range(per):
        word, off = divmod(i * bits, 32)
        lo = min(bits, 32 - off)  # how many of value i's bits sit in its first word
        # int32 >> is arithmetic (copies the sign bit); the mask keeps only the value's bits
        v = (p[..., word] >> off) & ((1 << lo) - 1)
        if lo < bits:
            v |= (p[..., word + 1] & ((1 << (bits - lo)) - 1)) << lo
        out[..., i] = v
    out = out.reshape(*out.shape[:-2], units * per)[..., :size] - (1 << (bits - 1))
    return out.movedim(-1, dim).contiguous()


class QuantLinear(nn.Module):
    """A Linear whose weight is held exactly as exported (compressed-tensors pack-quantized).

    Buffers (see the module docstring for the layout; the state_dict *is* the export):
      weight_packed      int32        (out, packed_size(in))
      weight_scale       scale_dtype  (out, G)
      weight_zero_point  int32        (packed_size(out), G)     only when not symmetric
      weight_g_idx       int32        (in,)                     only when has_g_idx
      weight_shape       int64        (2,)                      [out, in]
      bias               bias_dtype   (out,)                    frozen Parameter, when bias=True

    ``forward`` dispatches through ``compress.kernels.wna16_linear``: on the CPU the torch reference
    path (dequantize to float32, cast to the input's dtype, ``F.linear``; the oracle every fast
    kernel is tested against), on a GPU Triton or CUDA. ``backend`` forces one (None: automatic,
    or $COMPRESS_KERNEL); ``kernel`` names the backend that ran last.
    """

    kernel = "torch"
    backend: str | None = None

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
        *,
        dense: bool = True,
    ):
        super().__init__()
        _check_bits(bits)
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.dense = bits, group_size, symmetric, dense
        G = 1 if group_size == -1 else in_features // group_size
        i32 = dict(dtype=torch.int32)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_size(in_features, bits, dense), **i32))
        self.register_buffer("weight_scale", torch.zeros(out_features, G, dtype=scale_dtype))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(packed_size(out_features, bits, dense), G, **i32))
        if has_g_idx:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, **i32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        # a frozen Parameter, not a buffer: model code that walks parameters (tying, dtype casts) sees it
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, bias_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Pack a ``compress.quant.rtn.QuantResult`` (unsigned codes, float32 scales, int zeros).

        The result's scales must be exact in ``scheme.scale_dtype`` and a symmetric result's zeros
        must all be ``2^(bits-1)``; otherwise the stored layer would not compute what was measured.
        """
        s = result.scheme
        out_f, in_f = result.q.shape
        if bias_dtype is None:
            bias_dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_f, out_f, s.bits, s.group_size, s.symmetric, has_g_idx=result.act_order,
                bias=bias is not None, scale_dtype=s.scale_dtype, bias_dtype=bias_dtype)
        half = 1 << (s.bits - 1)
        scale = result.scale.to(s.scale_dtype)
        if not torch.equal(scale.float(), result.scale.float()):
            raise ValueError(f"scales are not exactly representable in {s.scale_dtype}; quantize with that scale_dtype")
        m.weight_packed.copy_(pack_int32(result.q - half, s.bits, dim=1))
        m.weight_scale.copy_(scale)
        if s.symmetric:
            if not bool((result.zero == half).all()):
                raise ValueError(f"a symmetric scheme stores no zero point; all zeros must be {half}")
        else:
            m.weight_zero_point.copy_(pack_int32(result.zero - half, s.bits, dim=0))
        if result.act_order:
            m.weight_g_idx.copy_(result.g_idx)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def g_idx(self) -> torch.Tensor:
        """int64 (in,): the group of each input column."""
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        gw = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.weight_packed.device) // gw

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): Ŵ[:, j] = (q[:, j] - z[:, g_j]) · s[:, g_j]."""
        g = self.g_idx()
        v = unpack_int32(self.weight_packed, self.bits, self.in_features, dim=1, dense=self.dense).float()  # q - 2^(b-1)
        s = self.weight_scale.float()[:, g]  # (out, in)
        if self.symmetric:  # z = 2^(b-1): the stored signed value is q - z already
            return v * s
        z = unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0, dense=self.dense).float()  # z - 2^(b-1)
        return (v - z[:, g]) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch (CPU, the reference: dequantize then F.linear), triton or cuda; see compress.kernels
        from compress.kernels import wna16_linear

        return wna16_linear(x, self)

    def spec(self) -> dict:
        """The scheme as ``quantization_config`` groups describe it."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "act_order": hasattr(self, "weight_g_idx")}

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: packed codes plus scale, zero-point and g_idx overhead
        (weight_shape and bias excluded). int4 g128 with bf16 scales: 4 + 16/128 = 4.125."""
        stored = [self.weight_packed, self.weight_scale]
        stored += [getattr(self, k) for k in ("weight_zero_point", "weight_g_idx") if hasattr(self, k)]
        return sum(t.numel() * t.element_size() * 8 for t in stored) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        g = "channel" if self.group_size == -1 else f"group_size={self.group_size}"
        act = ", act_order" if hasattr(self, "weight_g_idx") else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} {kind}, {g}{act}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8Linear(nn.Module):
    """A W8A8 Linear as compressed-tensors ``int-quantized`` stores it: int8 weights with one
    scale per output channel; the input is quantized per token at run time (dynamic, symmetric).

    Buffers (the state_dict *is* the export):
      weight        int8         (out, in)   signed codes in [-128, 127]
      weight_scale  scale_dtype  (out, 1)    Ŵ = weight · weight_scale
      bias          bias_dtype   (out,)      frozen Parameter, when bias=True

    ``forward``: x_q, s_x = per-token int8 of x; y = (x_q @ weightᵀ as int32) · s_x · s_w (+ bias),
    through ``compress.kernels.int8_linear`` (exact int32 accumulation on every backend).
    """

    kernel = "torch"
    quantizes_activations = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 scale_dtype: torch.dtype = torch.bfloat16, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = 8, -1, True
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, bias_dtype: torch.dtype | None = None) -> "Int8Linear":
        """From an 8-bit, per-channel, symmetric ``QuantResult`` (zeros all 128)."""
        s = result.scheme
        if (s.bits, s.group_size, s.symmetric) != (8, -1, True):
            raise ValueError(f"W8A8 needs an 8-bit per-channel symmetric weight, got bits={s.bits} group_size={s.group_size} symmetric={s.symmetric}")
        out_f, in_f = result.q.shape
        if bias_dtype is None:
            bias_dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_f, out_f, bias=bias is not None, scale_dtype=s.scale_dtype, bias_dtype=bias_dtype)
        m.weight.copy_((result.q - result.zero).to(torch.int8))
        m.weight_scale.copy_(result.scale.reshape(out_f, 1).to(s.scale_dtype))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): the weight the int8 codes stand for."""
        return self.weight.float() * self.weight_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import compress.kernels as kernels

        # backend: set by compress.load(kernel=...), like QuantLinear's (None: automatic)
        return kernels.int8_linear(x, self.weight, self.weight_scale, self.bias, backend=getattr(self, "backend", None))

    def spec(self) -> dict:
        return {"bits": 8, "group_size": -1, "symmetric": True, "act_order": False, "activations": {"bits": 8, "dynamic": True}}

    @property
    def bits_per_weight(self) -> float:
        return 8 + self.weight_scale.element_size() * 8 / self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, W8A8 int8 per-channel weights, "
                f"dynamic per-token int8 activations, bias={self.bias is not None}, kernel={self.kernel}")


def _activation_args() -> dict:
    """compressed-tensors QuantizationArgs of dynamic per-token symmetric int8 activations."""
    return {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
        "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {},
    }


def quantization_config(groups: list[dict], ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json: weight-only ``pack-quantized`` groups, and
    ``int-quantized`` W8A8 groups (a group with ``activations``: int8 weights per channel, int8
    activations per token, dynamic).

    Each group: ``targets`` (module class names or ``re:`` patterns), ``bits``, ``group_size``
    (-1 = per output channel), ``symmetric``, ``act_order``: False, True / "group" (columns carry
    ``weight_g_idx``; compressed-tensors >= 0.19 refuses this) or "weight" (activation order used
    while quantizing only; stored like no act-order, readable everywhere).
    """
    cfg_groups = {}
    for i, g in enumerate(groups):
        bits, gs, act = g["bits"], g["group_size"], g.get("act_order", False)
        _check_bits(bits)
        if gs != -1 and gs <= 0:
            raise ValueError(f"group {i}: group_size must be positive or -1 (channel), got {gs}")
        if act not in (False, None, True, "group", "weight"):
            raise ValueError(f"group {i}: act_order must be a bool, 'group' or 'weight', got {act!r}")
        channel = gs == -1
        w8a8 = bool(g.get("activations"))
        if w8a8 and (bits, gs, bool(g["symmetric"])) != (8, -1, True):
            raise ValueError(f"group {i}: W8A8 needs 8-bit per-channel symmetric weights")
        cfg_groups[f"group_{i}"] = {
            "targets": list(g["targets"]),
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": bool(g["symmetric"]),
                "strategy": "channel" if channel else "group",
                "group_size": None if channel else gs,
                "dynamic": False,
                "actorder": "group" if act is True else (act or None),
                "observer": "minmax",
                "observer_kwargs": {},
                "block_structure": None,
            },
            "input_activations": _activation_args() if w8a8 else None,
            "output_activations": None,
            "format": "int-quantized" if w8a8 else "pack-quantized",
        }
    formats = {g["format"] for g in cfg_groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": cfg_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        # the reader picks the bit layout of 3/5/6/7-bit weights from this (see DENSE_SINCE)
        "version": _dist_version("compressed-tensors"),
    }


def read_quantization_config(cfg: dict) -> dict[str, dict]:
    """config.json's ``quantization_config`` -> ``{group name: scheme}``, enough to rebuild each
    layer's QuantLinear. A scheme: targets, bits, group_size (-1 = channel), symmetric, act_order
    (True when the layers store ``weight_g_idx``) and dense (the bit layout, from ``version``).

    Raises FormatError (a ValueError and an InputError) naming the field we cannot serve.
    """
    def bad(field, value, want):
        return FormatError(f"quantization_config.{field} is {value!r}; compress reads {want}")

    if cfg.get("quant_method") != "compressed-tensors":
        raise bad("quant_method", cfg.get("quant_method"), "'compressed-tensors'")
    if cfg.get("quantization_status", "compressed") != "compressed":
        # frozen/calibrated checkpoints hold float weights plus scales, not packed codes
        raise bad("quantization_status", cfg.get("quantization_status"), "'compressed'")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if cfg.get(field):  # each would change what the model computes beyond the packed weights
            raise bad(field, cfg[field], "an empty value (weight-only quantization)")
    dense = True  # without a version: the current layout
    if cfg.get("version") is not None:
        try:
            dense = Version(str(cfg["version"])).release[:2] >= DENSE_SINCE
        except InvalidVersion:
            raise bad("version", cfg["version"], "a compressed-tensors version such as '0.20.0'") from None
    out = {}
    for name, g in (cfg.get("config_groups") or {}).items():
        at = f"config_groups.{name}"
        fmt = g.get("format") or cfg.get("format")
        if fmt not in ("pack-quantized", "int-quantized"):
            raise bad(f"{at}.format", fmt, "'pack-quantized' or 'int-quantized'")
        if g.get("output_activations"):
            raise bad(f"{at}.output_activations", g["output_activations"], "null")
        act = g.get("input_activations")
        if fmt == "int-quantized":
            want = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
            if not act or any(act.get(k, want[k] if k == "type" else None) != v for k, v in want.items()):
                raise bad(f"{at}.input_activations", act, "dynamic per-token symmetric int8 (W8A8)")
        elif act:
            raise bad(f"{at}.input_activations", act, "null (pack-quantized is weight-only)")
        w = g.get("weights")
        if not w:
            raise bad(f"{at}.weights", w, "a weight scheme")
        if w.get("type", "int") != "int":
            raise bad(f"{at}.weights.type", w.get("type"), "'int'")
        bits = w.get("num_bits")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise bad(f"{at}.weights.num_bits", bits, "2..8")
        strategy = w.get("strategy") or ("channel" if w.get("group_size") == -1 else "group")
        if strategy not in ("group", "channel"):
            raise bad(f"{at}.weights.strategy", strategy, "'group' or 'channel'")
        if w.get("dynamic"):
            raise bad(f"{at}.weights.dynamic", w["dynamic"], "false")
        if w.get("block_structure"):
            raise bad(f"{at}.weights.block_structure", w["block_structure"], "null")
        gs = w.get("group_size")
        if strategy == "group" and not (isinstance(gs, int) and gs > 0):
            raise bad(f"{at}.weights.group_size", gs, "a positive group size")
        actorder = w.get("actorder")
        if actorder not in (None, False, True, "group", "dynamic", "weight", "static"):
            raise bad(f"{at}.weights.actorder", actorder, "null, 'group' or 'weight'")
        out[name] = {
            "targets": list(g.get("targets") or []),
            "bits": bits,
            "group_size": -1 if strategy == "channel" else gs,
            "symmetric": bool(w.get("symmetric", True)),
            "act_order": actorder in (True, "group", "dynamic"),  # only these store weight_g_idx
            "dense": dense or bits in (2, 4, 8),  # the layouts agree where bits divide 32
            "format": fmt,
        }
        if fmt == "int-quantized" and (bits, out[name]["group_size"], out[name]["symmetric"]) != (8, -1, True):
            raise bad(f"{at}.weights", w, "8-bit per-channel symmetric weights (W8A8)")
    return out


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Set any submodule at dotted ``name`` (e.g. ``model.layers.0.mlp.up_proj``) to ``module``;
    returns the module it replaced."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old
