"""Structured pruning that changes shapes: attention heads, MLP channels, the hidden size, blocks.

The result is an ordinary model of the same family with a smaller standard config
(``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``num_hidden_layers``) that every runtime loads unchanged.

The coupling of a family (which tensors read or write the residual stream, which rows of which
tensors belong to a head or an MLP channel) is a table of parameter names below, for the llama
layout (llama, mistral, qwen2, qwen3, gemma 1-3), phi3's fused q/k/v and gate/up, and the fused
experts of mixtral and qwen2/3-moe. A parameter of a decoder block that the table does not know
stops the pass (``UnknownCoupling``): a tensor nobody sliced would leave a model that does not load.

``prune_state(state, config, keep, ...)`` is the pure function: the original tensors, the
original config and what to keep (``Keep``: indices) give the pruned tensors and config.
Removing a channel is exactly zeroing it: the removed heads' and channels' contributions are
dropped, and the norms over a narrower hidden size are rescaled (``norm_scale``) so that with the
removed hidden dimensions zero in the original, the pruned model computes the same function.
``repair`` (least squares on the calibration statistics) then lets the kept input columns of
each consuming Linear absorb what the removed ones contributed: with H = Σ x xᵀ of the Linear's
input, W' = W H[:, K] H[K, K]⁻¹ minimises ‖W X − W' X_K‖ (the structured form of OBS).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

# parameter names inside a decoder block, by role (dim: the axis the role slices)
READS_HIDDEN = {  # input columns read the residual stream (through a norm): sliced by hidden keep
    "self_attn.q_proj.weight": 1, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 1, "self_attn.qkv_proj.weight": 1,
    "mlp.gate_proj.weight": 1, "mlp.up_proj.weight": 1, "mlp.gate_up_proj.weight": 1, "mlp.gate.weight": 1,
    "mlp.experts.gate_up_proj": 2, "mlp.shared_expert.gate_proj.weight": 1, "mlp.shared_expert.up_proj.weight": 1,
    "mlp.shared_expert_gate.weight": 1,
}
WRITES_HIDDEN = {  # output rows write the residual stream
    "self_attn.o_proj.weight": 0, "self_attn.o_proj.bias": 0, "mlp.down_proj.weight": 0, "mlp.down_proj.bias": 0,
    "mlp.experts.down_proj": 1, "mlp.shared_expert.down_proj.weight": 0,
}
UNTOUCHED = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # per head_dim: no width here changes them
NORM = re.compile(r"(^|\.)\w*(layernorm|norm)\.weight$")
# the MLP's channel groups: (prefix, config field of its width, fused experts)
MLP_GROUPS = (("mlp.experts.", None, True), ("mlp.shared_expert.", "shared_expert_intermediate_size", False), ("mlp.", None, False))
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scales by (1 + weight)
SCALED_EMBEDDING = ("gemma", "gemma2", "gemma3_text")  # embeddings × sqrt(hidden_size)


class UnknownCoupling(ValueError):
    """A family or a parameter whose place in the residual stream / heads / MLP is not known."""


@dataclass
class Keep:
    """What stays. Indices are sorted LongTensors; None keeps everything of that kind."""

    layers: list[int]  # the original indices of the blocks kept, in order
    hidden: torch.Tensor | None = None  # residual-stream dimensions
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> query heads kept
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> key/value heads kept
    mlp: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (layer, group prefix) -> channels ((E, k) for experts)


def check_family(config) -> None:
    if config.model_type not in FAMILIES:
        raise UnknownCoupling(f"model_type {config.model_type!r}: structured pruning knows the coupling of "
                              f"{', '.join(FAMILIES)}")
    if getattr(config, "num_local_experts", None) is None and config.model_type == "mixtral":
        raise UnknownCoupling("mixtral config without num_local_experts")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mlp_field(config, prefix: str) -> str:
    """The config field that holds the width of an MLP channel group."""
    if prefix == "mlp.experts.":
        return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
    if prefix == "mlp.shared_expert.":
        return "shared_expert_intermediate_size"
    return "intermediate_size"


def mlp_groups(state: dict, layer: int) -> list[str]:
    """The MLP channel groups present in block ``layer`` (dense layers of an MoE model have none of
    the experts' tensors)."""
    p = f"model.layers.{layer}."
    out = []
    for prefix, _, fused in MLP_GROUPS:
        down = f"{p}{prefix}down_proj" + ("" if fused else ".weight")
        if down in state and not (prefix == "mlp." and f"{p}mlp.experts.down_proj" in state):
            out.append(prefix)
    return out


def mlp_width(state: dict, layer: int, prefix: str) -> int:
    t = state[f"model.layers.{layer}.{prefix}down_proj" + ("" if prefix == "mlp.experts." else ".weight")]
    return t.shape[-1]


# ---------------------------------------------------------------- slicing


def _rows(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of whole units of ``size`` (heads of head_dim rows)."""
    return (idx[:, None] * size + torch.arange(size)).reshape(-1)


def qkv_rows(q: torch.Tensor, kv: torch.Tensor, nq: int, nkv: int, d: int) -> dict[str, torch.Tensor]:
    return {"q": _rows(q, d), "k": _rows(kv, d), "v": _rows(kv, d),
            "qkv": torch.cat([_rows(q, d), nq * d + _rows(kv, d), (nq + nkv) * d + _rows(kv, d)])}


def _slice_layer(name: str, t: torch.Tensor, keep: Keep, layer: int, config, state: dict) -> torch.Tensor:
    """One tensor of block ``layer`` sliced by every role it has."""
    rel = name.split(f"model.layers.{layer}.", 1)[1]
    d, nq, nkv = head_dim(config), config.num_attention_heads, config.num_key_value_heads
    q = keep.heads.get(layer, torch.arange(nq))
    kv = keep.kv_heads.get(layer, torch.arange(nkv))
    rows = qkv_rows(q, kv, nq, nkv, d)
    if rel.startswith("self_attn.") and rel not in UNTOUCHED:
        proj = rel.split(".")[1]
        if proj in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
            t = t.index_select(0, rows[proj.split("_")[0]])
        elif proj == "o_proj" and rel.endswith("weight"):
            t = t.index_select(1, rows["q"])
        elif proj != "o_proj":
            raise UnknownCoupling(f"{name}: an attention tensor structured pruning does not know")
    elif rel.startswith("mlp."):
        t = _slice_mlp(rel, t, keep, layer, state, name)
    if rel in READS_HIDDEN and keep.hidden is not None:
        t = t.index_select(READS_HIDDEN[rel], keep.hidden)
    if rel in WRITES_HIDDEN and keep.hidden is not None:
        t = t.index_select(WRITES_HIDDEN[rel], keep.hidden)
    if NORM.search(rel) and rel not in UNTOUCHED and keep.hidden is not None:
        t = t.index_select(0, keep.hidden)
    return t


def _slice_mlp(rel: str, t: torch.Tensor, keep: Keep, layer: int, state: dict, name: str) -> torch.Tensor:
    for prefix in mlp_groups(state, layer):
        if not rel.startswith(prefix) or (prefix == "mlp." and rel.startswith(("mlp.experts.", "mlp.shared_expert."))):
            continue
        idx = keep.mlp.get((layer, prefix))
        leaf = rel[len(prefix):]
        if idx is None:
            return t
        if prefix == "mlp.experts.":  # (E, 2I, H) and (E, H, I), each expert its own channels
            n = t.shape[-1] if leaf == "down_proj" else t.shape[1] // 2
            if leaf == "down_proj":
                return torch.stack([t[e][:, idx[e]] for e in range(t.shape[0])])
            return torch.stack([t[e][torch.cat([idx[e], n + idx[e]])] for e in range(t.shape[0])])
        if leaf in ("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias"):
            return t.index_select(0, idx)
        if leaf == "gate_up_proj.weight":
            return t.index_select(0, torch.cat([idx, t.shape[0] // 2 + idx]))
        if leaf == "down_proj.weight":
            return t.index_select(1, idx)
        if leaf == "down_proj.bias":
            return t
    if rel in ("mlp.gate.weight", "mlp.shared_expert_gate.weight") or rel.startswith("mlp.gate."):
        return t  # routers: one row per expert (their input columns are hidden dims)
    raise UnknownCoupling(f"{name}: an MLP tensor structured pruning does not know")


# ---------------------------------------------------------------- the pruned config


def pruned_config(config, keep: Keep, state: dict):
    """The config of the pruned model: standard fields only, so every runtime loads it."""
    new = copy.deepcopy(config)
    d = head_dim(config)
    new.head_dim = d  # explicit: hidden / heads no longer gives it
    layers = keep.layers
    if keep.hidden is not None:
        new.hidden_size = len(keep.hidden)
    if keep.heads:
        new.num_attention_heads = _uniform({len(keep.heads[i]) for i in layers if i in keep.heads}, "num_attention_heads")
    if keep.kv_heads:
        new.num_key_value_heads = _uniform({len(keep.kv_heads[i]) for i in layers if i in keep.kv_heads}, "num_key_value_heads")
    for prefix in {p for (_, p) in keep.mlp}:
        widths = {keep.mlp[(i, p)].shape[-1] for (i, p) in keep.mlp if p == prefix and i in layers}
        if widths:
            setattr(new, mlp_field(config, prefix), _uniform(widths, mlp_field(config, prefix)))
    _renumber_layers(new, config, layers)
    return new


def _uniform(widths: set[int], name: str) -> int:
    if len(widths) != 1:
        raise ValueError(f"{name}: per-layer widths {sorted(widths)}; the standard config holds one width")
    return widths.pop()


def _renumber_layers(new, config, layers: list[int]) -> None:
    n = config.num_hidden_layers
    new.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        new.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(config, "mlp_only_layers"):  # qwen2/3-moe: which blocks have a dense MLP
        step = getattr(config, "decoder_sparse_step", 1) or 1
        dense = {i for i in range(n) if i in config.mlp_only_layers or (config.num_experts > 0 and (i + 1) % step != 0)}
        new.mlp_only_layers = [j for j, i in enumerate(layers) if i in dense]
        new.decoder_sparse_step = 1
    if getattr(config, "max_window_layers", None) is not None and config.max_window_layers < n:
        new.max_window_layers = sum(1 for i in layers if i < config.max_window_layers)


# ---------------------------------------------------------------- the pruned tensors


def norm_scale(sq: torch.Tensor | None, hidden: torch.Tensor) -> float:
    """What a norm over the kept hidden dimensions multiplies its weight by: the ratio of the
    root mean square over the kept dimensions to the one over all, from Σx² per dimension of the
    norm's input on calibration data (``sq``). When the removed dimensions are zero this is
    √(H/H') exactly, so the pruned norm computes what the zeroed one does."""
    H, k = (len(sq) if sq is not None else None), len(hidden)
    if sq is None or float(sq.sum()) == 0:
        raise ValueError("norm_scale needs the norm input's Σx² per dimension")
    return float(((sq[hidden].sum() / k) / (sq.sum() / H)).sqrt())


def prune_state(state: dict[str, torch.Tensor], config, keep: Keep, norm_sq: dict[str, torch.Tensor] | None = None,
                repair: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], object]:
    """The pruned tensors and config. ``norm_sq``: per norm parameter name, its input's Σx² per
    dimension (the hidden-size rescaling); ``repair``: per parameter name, a replacement for the
    full tensor computed before slicing (``lstsq_repair``)."""
    check_family(config)
    new_cfg = pruned_config(config, keep, state)
    out = {}
    renumber = {old: new for new, old in enumerate(keep.layers)}
    plus_one = config.model_type in NORM_PLUS_ONE
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue  # the embedding's (tied when the pruned model is built)
        t = repair.get(name, t) if repair else t
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m:
            i = int(m.group(1))
            if i not in renumber:
                continue
            rel = m.group(2)
            if not (rel in READS_HIDDEN or rel in WRITES_HIDDEN or rel in UNTOUCHED or NORM.search(rel) or rel.startswith(("self_attn.", "mlp."))):
                raise UnknownCoupling(f"{name}: a block tensor structured pruning does not know")
            t = _slice_layer(name, t, keep, i, config, state)
            if NORM.search(rel) and rel not in UNTOUCHED and keep.hidden is not None:
                t = _rescale_norm(t, norm_scale(norm_sq[name], keep.hidden) if norm_sq else 1.0, plus_one)
            name = f"model.layers.{renumber[i]}.{rel}"
        elif keep.hidden is not None:
            t = _slice_outer(name, t, keep, config, norm_sq, plus_one)
        out[name] = t.contiguous()
    return out, new_cfg


def _rescale_norm(t: torch.Tensor, c: float, plus_one: bool) -> torch.Tensor:
    return (1 + t) * c - 1 if plus_one else t * c


def _slice_outer(name: str, t: torch.Tensor, keep: Keep, config, norm_sq, plus_one: bool) -> torch.Tensor:
    """Embedding, final norm and lm_head over the kept hidden dimensions."""
    H, k = config.hidden_size, len(keep.hidden)
    scaled = config.model_type in SCALED_EMBEDDING  # x = E[t]·√H: keep E[t]·√H with √H' in the pruned model
    if name == "model.embed_tokens.weight":
        t = t.index_select(1, keep.hidden)
        return t * (H / k) ** 0.5 if scaled else t
    if name == "lm_head.weight":
        return t.index_select(1, keep.hidden)
    if name == "model.norm.weight":
        c = norm_scale(norm_sq[name], keep.hidden) if norm_sq else 1.0
        if scaled and getattr(config, "tie_word_embeddings", False):
            c /= (H / k) ** 0.5  # the tied head was scaled with the embedding
        return _rescale_norm(t.index_select(0, keep.hidden), c, plus_one)
    raise UnknownCoupling(f"{name}: a tensor outside the blocks structured pruning does not know")


def lstsq_repair(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """W (out, in) refitted so that its kept input columns ``kept`` best reproduce W x on the
    inputs whose Σ x xᵀ is H (in, in): W'_K = W H[:, K] (H[K, K] + λI)⁻¹, removed columns zero.
    Returned at full width (the slicing drops the removed columns)."""
    W64, H64 = W.double(), H.double()
    HK = H64[kept][:, kept]
    lam = damp * float(HK.diagonal().mean()) + 1e-12
    HK = HK + lam * torch.eye(len(kept), dtype=torch.float64)
    rhs = W64 @ H64[:, kept]  # (out, k)
    L = torch.linalg.cholesky(HK)
    WK = torch.cholesky_solve(rhs.T, L).T
    out = torch.zeros_like(W64)
    out[:, kept] = WK
    return out.to(W.dtype)
