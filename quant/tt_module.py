"""``TTEmbedding``: a token embedding stored as tensor-train cores (``compress.quant.tt``), and how
exports store it.

Buffers (the state_dict is what the exporter writes), for d cores:
  tt_core_{k}  storage dtype (bf16 from a bf16 checkpoint)  (r_{k-1}, v_k, d_k, r_k), k = 0 … d-1,
               r_0 = r_d = 1; row i of the table is the product of the slices its digits select
               (``compress.quant.tt``: E[i, j] = Π_k G_k[:, i_k, j_k, :])

``compress.json`` lists the TT embeddings under ``tt_embedding.layers`` ({name: {num_embeddings,
embedding_dim, vocab_factors, dim_factors, ranks}}; ``tt_metadata`` writes the section, from the
report info of the embeddings option) with the layout; ``stored_layers`` and ``from_checkpoint``
read it. No compressed-tensors or GGUF format stores TT cores: only our runtime (``compress.load``)
reads these layers; the others refuse the export (``refusal``; ``--target`` refuses the recipe
before any work).

The lm_head: TT stands for the input lookup only. A head tied to the table cannot compute with
cores (a logit needs every row), so the head is untied: stored apart, dense in the checkpoint's
dtype, or quantized where the option's ``head_bits`` asks (``compress.quant.embeddings``); the
export's config.json says ``tie_word_embeddings: false``.

forward(ids): the rows asked for, built from their core slices (``tt_rows``) for the distinct ids
of the batch only, in chunks of at most ``CHUNK`` numbers; the (V, D) table is never formed (only
``dense_weight()`` forms it, for the engine's and distillation's dense views).
"""

from __future__ import annotations

import torch
from compress.quant.tt import TTShape, lookup_width, ranks, tt_full, tt_rows
from torch import nn

from compress.checkpoint.source import section_layers
from compress.errors import InputError
from compress.modules import COMPRESS, CompressedLinear, register_module_type

SECTION = "tt_embedding"  # compress.json section
LAYOUT = ("tt-matrix: rows padded to prod(vocab_factors), row i's digits (mixed radix vocab_factors, most "
          "significant first) select tt_core_k[:, i_k], contracted left to right; columns likewise in dim_factors")
CHUNK = 2**24  # numbers a lookup holds at a time: distinct rows are built in chunks of CHUNK // lookup_width


@register_module_type
class TTEmbedding(CompressedLinear):
    """An ``nn.Embedding`` whose table is a tensor train (see the module docstring). As a Linear
    would see the table: ``in_features`` = embedding_dim, ``out_features`` = num_embeddings."""

    replaces = (nn.Embedding,)

    def __init__(self, shape: TTShape, tt_ranks: list[int], padding_idx: int | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.shape, self.padding_idx = shape, padding_idx
        self.num_embeddings, self.embedding_dim = shape.num_embeddings, shape.embedding_dim
        self.in_features, self.out_features = self.embedding_dim, self.num_embeddings
        self.out_dtype = torch.float32  # the loader's compute dtype once it sets one
        r = [1, *tt_ranks, 1]
        for k, (v, q) in enumerate(zip(shape.vocab, shape.dim)):
            self.register_buffer(f"tt_core_{k}", torch.zeros(r[k], v, q, r[k + 1], dtype=dtype))

    @classmethod
    def from_cores(cls, cores: list[torch.Tensor], shape: TTShape, padding_idx: int | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> TTEmbedding:
        """Hold ``cores`` (``tt_svd``'s) in ``dtype`` (the checkpoint's: what the export stores)."""
        m = cls(shape, ranks(cores), padding_idx, dtype)
        for g, c in zip(m.cores(), cores):
            g.copy_(c.to(dtype))
        return m

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"tt_core_{k}") for k in range(len(self.shape.vocab))]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (*ids.shape, embedding_dim): the rows of ``ids``, each distinct id built once."""
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        cores = [g.float() for g in self.cores()]
        per = max(1, CHUNK // lookup_width(cores))  # rows per chunk: 64 MB of float32 at most
        rows = torch.cat([tt_rows(cores, u, self.shape.vocab) for u in uniq.split(per)])  # (U, D)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids).to(self.out_dtype)

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        """float32 (num_embeddings, embedding_dim): the whole table."""
        return tt_full([g.float() for g in self.cores()], self.shape)

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.out_dtype = dtype

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per table entry: the cores' (576-wide, 49152 rows, ranks 64, bf16: 0.71)."""
        return sum(g.numel() * g.element_size() * 8 for g in self.cores()) / (self.num_embeddings * self.embedding_dim)

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        if runtime == COMPRESS:
            return None
        return (f"{runtime} has no reader for a tensor-train embedding (the token table stored as TT cores, which neither "
                "compressed-tensors nor GGUF stores); compress.load reads it")

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return sorted(section_layers(source.path, SECTION))

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        """The table's element count, num_embeddings × embedding_dim (compress.json)."""
        info = section_layers(source.path, SECTION)[name]
        return int(info["num_embeddings"]) * int(info["embedding_dim"])

    @classmethod
    def from_checkpoint(cls, source, name, embedding, groups) -> TTEmbedding:
        info = section_layers(source.path, SECTION)[name]
        shape = TTShape(int(info["num_embeddings"]), tuple(info["vocab_factors"]), tuple(info["dim_factors"]))
        keys = [f"{name}.tt_core_{k}" for k in range(len(shape.vocab))]
        tensors = source.read(keys)
        m = cls(shape, list(info["ranks"]), embedding.padding_idx, tensors[keys[0]].dtype)
        bad = [f"{k} {tuple(tensors[f'{name}.{k}'].shape)}, not {tuple(v.shape)}" for k, v in m.state_dict().items()
               if tuple(tensors[f"{name}.{k}"].shape) != tuple(v.shape)]
        if bad or (shape.num_embeddings, shape.embedding_dim) != (embedding.num_embeddings, embedding.embedding_dim):
            raise InputError(f"{source.path}: TT embedding {name} ({shape.num_embeddings} × {shape.embedding_dim} in compress.json) "
                             f"does not match the model's {embedding.num_embeddings} × {embedding.embedding_dim} table: "
                             f"{'; '.join(bad) or 'its size'}")
        m.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()})
        return m

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tensor train {'·'.join(map(str, self.shape.vocab))} × "
                f"{'·'.join(map(str, self.shape.dim))}, ranks {ranks(self.cores())}, lookup of the rows only")


def tt_info(m: TTEmbedding) -> dict:
    """What the run's report says of a TT embedding, and what ``tt_metadata`` reads back."""
    return {"tt_vocab_factors": list(m.shape.vocab), "tt_dim_factors": list(m.shape.dim), "tt_ranks": ranks(m.cores()),
            "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
            "tt_parameters": sum(g.numel() for g in m.cores()), "bits_per_weight": round(m.bits_per_weight, 4),
            "compression": round(m.num_embeddings * m.embedding_dim / sum(g.numel() for g in m.cores()), 2)}


def tt_metadata(layers: list) -> dict:
    """``{SECTION: ...}`` for ``compress.json`` from the run's ``LayerReport``s ({} when no layer is
    a TT embedding)."""
    out = {r.name: {"num_embeddings": r.info["num_embeddings"], "embedding_dim": r.info["embedding_dim"],
                    "vocab_factors": r.info["tt_vocab_factors"], "dim_factors": r.info["tt_dim_factors"], "ranks": r.info["tt_ranks"]}
           for r in layers if "tt_ranks" in r.info}
    if not out:
        return {}
    return {SECTION: {"method": "tt-svd", "layout": LAYOUT, "layers": dict(sorted(out.items()))}}
