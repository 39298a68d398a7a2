"""KV-cache quantization in our runtime (KV8, KV4), with QuaRot's R3: an online Hadamard on each
head's queries and keys.

What attention reads: every key and value vector (one per token and head, after RoPE for keys)
rounded to symmetric ``bits``-bit integer codes times its own scale, absmax / (2^(bits-1) - 1),
the scale a number of the compute dtype (bf16 for our exports on a GPU: the codes are taken against
the scale as stored, so what a cache stores is exactly what it dequantizes to). Keys carry outlier
channels (a few RoPE frequencies dominate), which a 4-bit grid cannot hold; R3 multiplies queries
and keys by the same orthogonal R (head_dim × head_dim) after RoPE, which leaves every q·kᵀ
unchanged (q R Rᵀ kᵀ) and spreads the outliers over all channels before the keys are rounded. R3
changes no weight.

How it runs: ``install`` registers the attention function ``compress_kv`` (transformers'
``AttentionInterface``, with SDPA's masks) and gives each attention module its settings. Two
paths compute the same function:

* the code cache, ``new_cache(model)`` (a ``CodeCache``, what ``compress serve``'s ``generate``
  passes as ``past_key_values``): each layer stores, per new key and value vector, its integer
  codes (int8 at 8 bits; at 4 bits two codes per uint8 byte) and its scale (one per batch, head
  and token, in the compute dtype), keys rotated by R3 before rounding; it returns the dequantized
  keys and values, marked so that attention only rotates the queries. The stored bytes are about
  1/2 (KV8) and 1/4 (KV4) of a bf16 cache, plus one scale per vector (2 bytes in bf16; ``nbytes``):
  0.516 and 0.266 of it at head_dim 64. Attention reads one layer's keys and values dequantized at
  a time (transient, the size of that layer's bf16 cache).
* emulated, without a cache or with transformers' ``DynamicCache`` (perplexity evaluation, a
  plain ``model.generate``): the attention function rotates the keys and rounds keys and values
  where it reads them; the cache, if any, stays in the compute dtype and saves no memory.

Calibration does not see the rounding (the layer-wise solvers calibrate on unquantized attention).

How a model carries it: compress.json ``kv_cache`` = {"bits"}, written by the quantizer
(``kv_cache: {bits: 8|4}`` on gptq/rtn/awq), and ``rotation.r3`` = {"size", "seed", "checksum"}
from ``rotate: {r3: true}``; ``ModelSource.skeleton`` calls ``install``. The weights are
unchanged by either, so other runtimes serve the same weights with their own (unquantized)
cache: the export records that only compress.load quantizes the cache.
"""

from __future__ import annotations

import torch
from compress.quant import online
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compress.errors import InputError

NAME = "compress_kv"  # the attention implementation registered with transformers
SECTION = "kv_cache"  # the compress.json section
MARK = "compress_kv_codes"  # attribute of the tensors a CodeLayer returns: (bits, r3) they were rounded with


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the rounding computes: float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def vector_codes(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vector along t's last axis as int8 codes in [-qmax, qmax], qmax = 2^(bits-1) - 1, and
    its scale absmax / qmax rounded to t's dtype (shape t.shape[:-1] + (1,)); the codes are taken
    against the rounded scale, so codes × scale is the vector's rounding. Zero vectors: scale 0."""
    qmax = (1 << (bits - 1)) - 1
    x = t.to(work_dtype(t.dtype))
    s = (x.abs().amax(dim=-1, keepdim=True) / qmax).to(t.dtype)
    sw = s.to(x.dtype)
    codes = torch.round(x / torch.where(sw > 0, sw, torch.ones_like(sw))).clamp_(-qmax, qmax)
    return codes.to(torch.int8), s


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes × scale (scales broadcast over the last axis), computed in ``work_dtype``, in ``dtype``."""
    w = work_dtype(dtype)
    return (codes.to(w) * scales.to(w)).to(dtype)


def quantize_vectors(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Each vector along t's last axis rounded to symmetric ``bits``-bit integers times its own
    scale absmax / (2^(bits-1) - 1) in t's dtype (zero vectors stay zero), in t's dtype: what the
    code cache stores and returns (``vector_codes``, ``dequantize``)."""
    return dequantize(*vector_codes(t, bits), t.dtype)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] along an even last axis -> uint8, two per byte: element 2i in the low
    nibble, 2i + 1 in the high one, each stored as code + 8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit codes pack in pairs; the last axis has {codes.shape[-1]}")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """``pack4``'s inverse: uint8 (..., n) -> int8 codes (..., 2n)."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def from_code_cache(key: torch.Tensor, value: torch.Tensor, cfg: dict) -> bool:
    """Whether key and value come from a ``CodeLayer`` (rotated where R3 is, and rounded) for the
    settings ``cfg``; a mark for other settings is an error, not something to round again."""
    mark = getattr(key, MARK, None)
    if mark is None and getattr(value, MARK, None) is None:
        return False
    want = (cfg["bits"], cfg.get("r3"))
    if getattr(value, MARK, None) != mark or mark[0] != want[0] or mark[1] is not want[1]:
        raise RuntimeError(f"attention got keys and values from a code cache built for other settings ({mark} and "
                           f"{getattr(value, MARK, None)}, the module has {want}); build the cache after kv_cache.install")
    return True


def kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: q (B, H, Tq, D), k and v (B, Hkv, Tk, D). Keys and values
    from a ``CodeCache`` are already rotated and rounded; others are rotated and rounded here."""
    cfg = module.compress_kv
    r3 = cfg.get("r3")
    if r3 is not None:
        query = r3.rotate(query)
    if not from_code_cache(key, value, cfg):
        if r3 is not None:
            key = r3.rotate(key)
        key, value = quantize_vectors(key, cfg["bits"]), quantize_vectors(value, cfg["bits"])
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, kv_attention)
# and SDPA's masks: an implementation without a mask function gets none from transformers (no
# padding mask, no sliding window), which SDPA then reads as plain causal attention
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class HeadRotation:
    """R3: x ↦ x · R over the last (head_dim) axis (``compress.quant.online``'s factored R)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.s, self.factors = online.signs(size, seed), online.hadamard_factors(size, seed)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return online.apply_factored(x, self.s, self.factors)


class CodeLayer(DynamicLayer):
    """One attention layer's cache as integer codes: ``keys``/``values`` hold the codes, (B, Hkv, T,
    D) int8 at 8 bits or (B, Hkv, T, D/2) uint8 at 4 bits (``pack4``); ``key_scales``/
    ``value_scales`` (B, Hkv, T, 1) in the compute dtype. ``update`` rotates the new keys by R3
    (when given), stores their codes and scales and returns the whole cache dequantized, marked."""

    def __init__(self, bits: int, r3: HeadRotation | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"a code cache stores 8 or 4 bits, not {bits}")
        self.bits, self.r3 = bits, r3
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.bits == 4 and (key_states.shape[-1] % 2 or value_states.shape[-1] % 2):
            raise ValueError(f"a 4-bit code cache packs two codes per byte; head_dim is {key_states.shape[-1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        code = torch.int8 if self.bits == 8 else torch.uint8
        self.keys = torch.tensor([], dtype=code, device=self.device)
        self.values = torch.tensor([], dtype=code, device=self.device)
        self.key_scales = torch.tensor([], dtype=self.dtype, device=self.device)
        self.value_scales = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scales = vector_codes(t, self.bits)
        return (codes if self.bits == 8 else pack4(codes)), scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return dequantize(codes if self.bits == 8 else unpack4(codes), scales, self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.r3 is not None:
            key_states = self.r3.rotate(key_states)
        kc, ks = self.encode(key_states.to(self.dtype))
        vc, vs = self.encode(value_states.to(self.dtype))
        self.keys, self.key_scales = torch.cat([self.keys, kc], dim=-2), torch.cat([self.key_scales, ks], dim=-2)
        self.values, self.value_scales = torch.cat([self.values, vc], dim=-2), torch.cat([self.value_scales, vs], dim=-2)
        keys, values = self.decode(self.keys, self.key_scales), self.decode(self.values, self.value_scales)
        setattr(keys, MARK, (self.bits, self.r3))
        setattr(values, MARK, (self.bits, self.r3))
        return keys, values

    def stored(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None]

    def _scales(self, fn) -> None:
        if self.is_initialized:
            self.key_scales, self.value_scales = fn(self.key_scales), fn(self.value_scales)

    # DynamicLayer's bookkeeping moves keys and values (here the codes) along the batch and token
    # axes; each method below does the same to the scales
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.key_scales.dim() > 1:
            n = self.keys.shape[-2]
            self._scales(lambda s: s[..., :n, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._scales(lambda s: s.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._scales(lambda s: s[indices, ...])
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._scales(lambda s: s.index_select(0, beam_idx.to(s.device)))
        super().reorder_cache(beam_idx)

    def offload(self):
        super().offload()
        self._scales(lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._scales(lambda s: s.to(self.device, non_blocking=True))
        super().prefetch()

    def reset(self) -> None:
        super().reset()
        self._scales(lambda s: s.zero_())


class CodeCache(Cache):
    """The cache of a model with ``install``'s rounding: a ``CodeLayer`` (its bits and R3) for each
    attention layer that has settings, a plain ``DynamicLayer`` for any other layer index. Or, without
    a model, ``settings``: one {"bits", "r3"} (or None: a plain layer) per layer index. Sliding-window
    layers (gemma3, mistral) keep every token too: the mask applies the window, nothing is dropped."""

    def __init__(self, model: nn.Module | None = None, *, settings: list[dict | None] | None = None):
        if (model is None) == (settings is None):
            raise ValueError("CodeCache takes a model or settings")
        if model is not None:
            found = {m.layer_idx: m.compress_kv for m in attention_modules(model) if hasattr(m, "compress_kv")}
            if not found:
                raise ValueError("the model has no KV-cache quantization (kv_cache.install): use transformers' DynamicCache")
            n = max(int(getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", 0) or 0), max(found) + 1)
            settings = [found.get(i) for i in range(n)]
        super().__init__(layers=[CodeLayer(s["bits"], s.get("r3")) if s else DynamicLayer() for s in settings])

    def nbytes(self) -> int:
        return nbytes(self)


def nbytes(cache: Cache) -> int:
    """The bytes a cache stores: codes and scales of ``CodeLayer``s, keys and values of other layers."""
    total = 0
    for layer in cache.layers:
        tensors = layer.stored() if isinstance(layer, CodeLayer) else [layer.keys, layer.values]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def new_cache(model: nn.Module) -> CodeCache | None:
    """A ``CodeCache`` for ``model`` (pass it to ``generate`` as ``past_key_values``), or None when
    the model computes without KV-cache quantization (no settings, or another attention function)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        return None
    if not any(hasattr(m, "compress_kv") for m in attention_modules(model)):
        return None
    return CodeCache(model)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]


def install(model: nn.Module, section: dict | None, r3: dict | None = None, where: str = "compress.json") -> int:
    """Give every attention module of ``model`` the cache rounding of ``section`` (compress.json
    ``kv_cache``) and R3 (``rotation.r3``); returns how many. None or {}: nothing."""
    if not section:
        return 0
    bits = int(section["bits"])
    if bits not in (4, 8):
        raise InputError(f"{where}: kv_cache.bits is {bits}; compress quantizes the cache to 8 or 4 bits")
    rot = None
    if r3:
        if online.checksum(int(r3["size"]), int(r3["seed"])) != r3.get("checksum"):
            raise InputError(f"{where}: kv_cache.r3 names a matrix this version of compress builds differently (checksum "
                             "mismatch); load it with the version that wrote it")
        rot = HeadRotation(int(r3["size"]), int(r3["seed"]))
    mods = attention_modules(model)
    for m in mods:
        m.compress_kv = {"bits": bits, "r3": rot}
    if mods:
        model.config._attn_implementation = NAME  # the attention modules read it at every forward
    return len(mods)


def r3_section(config, seed: int) -> dict:
    """compress.json's ``rotation.r3`` for a model of ``config``."""
    n = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"size": n, "seed": seed, "checksum": online.checksum(n, seed)}
