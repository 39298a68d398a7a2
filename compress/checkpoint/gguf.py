"""GGUF as an export target: the types ``--gguf TYPE`` writes, llama.cpp's rules for which tensor
gets which storage type (the "mixes"), the architectures and tensor names llama.cpp reads.

A TYPE names either one storage type for every quantized tensor (``q4_0``, ``q8_0``, ``iq4_nl``,
``q6_k``, ...) or a mix (``q4_k_m``: mostly Q4_K, with some ``attn_v``/``ffn_down`` at Q6_K and
the output at Q6_K). The per-tensor choice follows llama.cpp's ``llama_tensor_get_type`` (its
published rules, as of the llama.cpp vendored in llama-cpp-python 0.3.36) for a dense model
quantized without an importance matrix, then its fallback: a tensor whose rows are not a
multiple of the type's block (256 for K-quants: the demo's 576 columns) is stored in the type
llama.cpp itself falls back to (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0), or
F16 where no block fits. ``tensor_type`` is that rule; the quantization passes solve on the
grid it names (``compress.quant.ggml``), and the exporter stores what they solved.

Storage grids themselves (block layouts, scale encodings) are in ``compress.quant.ggml``; the
file writer in ``compress.checkpoint.gguf_export``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from compress.errors import UsageError

# TYPE -> (the base storage type, llama.cpp's file type). Mixes end in _m.
TYPES: dict[str, tuple[str, gguf.LlamaFileType]] = {
    "q4_0": ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": ("q4_1", gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": ("q5_0", gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": ("q5_1", gguf.LlamaFileType.MOSTLY_Q5_1),
    "q8_0": ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
    "iq4_nl": ("iq4_nl", gguf.LlamaFileType.MOSTLY_IQ4_NL),
    "q2_k": ("q2_k", gguf.LlamaFileType.MOSTLY_Q2_K),
    "q3_k_m": ("q3_k", gguf.LlamaFileType.MOSTLY_Q3_K_M),
    "q4_k_m": ("q4_k", gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": ("q5_k", gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": ("q6_k", gguf.LlamaFileType.MOSTLY_Q6_K),
}
BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "iq4_nl": 32,
         "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}
# llama.cpp's fallback for a tensor whose row length is not a multiple of the type's block
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
F16, F32 = "f16", "f32"


# ---------------------------------------------------------------- architectures and names


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face model type is written for llama.cpp."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LLAMA rotary pairs rows differently from HF: q/k rows are reordered


ARCHS = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, False),
}


def arch_for(config) -> Arch:
    """The GGUF architecture of an HF config, or a UsageError (exit 2) naming what is not supported."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise UsageError(f"GGUF export: model_type {mt!r} is not one compress writes for llama.cpp (supported: "
                         f"{', '.join(ARCHS)}); export to compressed-tensors instead (drop --gguf)")
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in (None, "default", "linear"):
        raise UsageError(f"GGUF export: rope_scaling type {kind!r} of this {mt} model is not written yet (supported: none, linear)")
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise UsageError(f"GGUF export: mixture-of-experts {mt} models are not written yet")
    return ARCHS[mt]


def name_map(config):
    """gguf's own map from HF tensor names to GGUF ones (``blk.N.attn_q.weight``, ...)."""
    return gguf.get_tensor_name_map(arch_for(config).arch, config.num_hidden_layers)


def gguf_name(tmap, hf_name: str) -> str | None:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


# ---------------------------------------------------------------- which tensor gets which type

_LAYER = re.compile(r"^blk\.(\d+)\.")


def category(gguf_tensor: str) -> str:
    """llama.cpp's tensor category: ``blk.3.attn_v.weight`` -> ``attn_v``, ``output.weight`` -> ``output``."""
    return gguf_tensor.split(".")[-2] if gguf_tensor.startswith("blk.") else gguf_tensor.split(".")[0]


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed(base: str, ftype: str, cat: str, i: int, n: int, n_gqa: int, imatrix: bool) -> str:
    """The type llama.cpp's mix picks for a tensor of category ``cat`` in layer ``i`` of ``n``
    (before the fallback for widths), for the mixes compress writes. ``imatrix``: the weights
    were quantized with calibration statistics (llama.cpp's rules with an importance matrix)."""
    if cat == "attn_v":
        if ftype == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if ftype == "iq4_nl" and n_gqa >= 4:
            return "q5_k"
        if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return "q6_k"
    elif cat == "ffn_down":
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return "q6_k"
        if ftype == "iq4_nl" and i < n // 8 and not imatrix:
            return "q5_k"
        if ftype in ("q4_0", "q5_0") and imatrix and i < n // 8:  # llama.cpp's guard for the first ffn_down layers
            return "q4_1" if ftype == "q4_0" else "q5_1"
    elif cat == "attn_output":
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q4_k"
    return base


def tensor_type(ftype: str, gguf_tensor: str, row: int, config, tied: bool, imatrix: bool = False) -> str:
    """The storage type of one 2-D weight (``gguf_tensor``: its GGUF name; ``row``: its row length,
    HF's in_features) under TYPE ``ftype``, with llama.cpp's fallback applied. ``imatrix``: as
    llama.cpp with an importance matrix (our calibrated solvers: GPTQ, AWQ)."""
    base = TYPES[ftype][0]
    cat = category(gguf_tensor)
    n = config.num_hidden_layers
    m = _LAYER.match(gguf_tensor)
    i = int(m.group(1)) if m else 0
    heads = config.num_attention_heads
    n_gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
    if cat == "output" or (tied and cat == "token_embd"):
        if row % BLOCK[base]:
            t = "q8_0"
        else:
            t = base if base == "q8_0" else "q6_k"
    else:
        t = _mixed(base, ftype, cat, i, n, n_gqa, imatrix)
    return fallback(t, row)


def fallback(t: str, row: int) -> str:
    """llama.cpp's type for a row length its block does not divide (F16 where none fits)."""
    if row % BLOCK[t] == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if row % BLOCK[t] == 0 else F16


def hf_layer_type(ftype: str, hf_name: str, row: int, config, imatrix: bool = False) -> str:
    """``tensor_type`` for an HF Linear name (``model.layers.3.mlp.down_proj``): what the
    quantization passes solve for. A UsageError names a layer llama.cpp has no tensor for."""
    g = gguf_name(name_map(config), hf_name + ".weight")
    if g is None:
        raise UsageError(f"{hf_name}: GGUF export has no llama.cpp tensor name for this layer; list it under the pass's `ignore`")
    return tensor_type(ftype, g, row, config, tied_embeddings(config), imatrix)


def tied_embeddings(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))
