"""KV-cache quantization in our runtime (KV8, KV4), with QuaRot's R3: an online Hadamard on each
head's queries and keys.

What the cache holds is what attention reads: every key and value vector (one per token and
head, after RoPE for keys) is rounded to symmetric ``bits``-bit integers times its own scale,
absmax / (2^(bits-1) - 1). Keys carry outlier channels (a few RoPE frequencies dominate), which a
4-bit grid cannot hold; R3 multiplies queries and keys by the same orthogonal R (head_dim ×
head_dim) after RoPE, which leaves every q·kᵀ unchanged (q R Rᵀ kᵀ) and spreads the outliers
over all channels before the keys are rounded. R3 changes no weight.

How it runs: ``install`` registers the attention function ``compress_kv`` (transformers'
``AttentionInterface``) and gives each attention module its settings; the function rounds the keys
and values (and rotates q and k) and then calls transformers' SDPA attention. The rounding is
applied where attention reads the cache, token by token, so the result is what a cache storing
the codes computes; the cache itself stays in the compute dtype (the memory saving of stored
codes is not built). Calibration does not see it (the layer-wise solvers calibrate on
unquantized attention).

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
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compress.errors import InputError

NAME = "compress_kv"  # the attention implementation registered with transformers
SECTION = "kv_cache"  # the compress.json section


def quantize_vectors(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Each vector along t's last axis rounded to symmetric ``bits``-bit integers times its own
    scale absmax / (2^(bits-1) - 1) (zero vectors stay zero), in t's dtype."""
    qmax = (1 << (bits - 1)) - 1
    x = t.float()
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    return (torch.round(x / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-qmax, qmax) * s).to(t.dtype)


def kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: q (B, H, Tq, D), k and v (B, Hkv, Tk, D)."""
    cfg = module.compress_kv
    r3 = cfg.get("r3")
    if r3 is not None:
        query, key = r3.rotate(query), r3.rotate(key)
    key, value = quantize_vectors(key, cfg["bits"]), quantize_vectors(value, cfg["bits"])
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, kv_attention)


class HeadRotation:
    """R3: x ↦ x · R over the last (head_dim) axis (``compress.quant.online``'s factored R)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.s, self.factors = online.signs(size, seed), online.hadamard_factors(size, seed)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return online.apply_factored(x, self.s, self.factors)


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
