"""Architecture knowledge, in one table: where the decoder blocks are and how their Linears group.

``sequence`` lists, per block, the groups of Linears in the order their inputs become available
during the block's forward pass: Linears in one group read the same input (q/k/v read the
normed hidden state), and each group's input depends on the groups before it. The engine uses it
for "true sequential" calibration: a group is calibrated on inputs produced by the already
compressed groups before it, as the compressed model will see them.

Families not in the table fall back to the generic rule: the decoder blocks are the
``nn.ModuleList`` of ``config.num_hidden_layers`` modules, and all Linears of a block form one group
(calibrated together on the block's original input). A model where neither works gets an error
that says what is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from torch import nn

from compress.errors import UsageError
from compress.utils import get_module


@dataclass(frozen=True)
class Smooth:
    """One place where a per-channel scale can be folded (AWQ, SmoothQuant): ``prev`` (a norm
    or a Linear) produces the input of ``linears``; dividing ``prev``'s output channels by ``s``
    and multiplying the Linears' input columns by ``s`` leaves the block's function unchanged.
    ``inspect`` is the submodule whose output AWQ measures (it reads the Linears' input)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path of the decoder-block ModuleList
    sequence: tuple[tuple[str, ...], ...] = field(default_factory=tuple)  # Linear groups, in order
    # (submodule, group index): once that group is compressed, the submodule's output is final
    # and the engine computes it once per calibration batch instead of once per later pass
    replay: tuple[tuple[str, int], ...] = ()
    # (submodule, its Linear, group index): the submodule's output is that Linear applied to the
    # Linear's input (an MLP ends in down_proj); the input is kept from the group's calibration
    # pass, so propagating the finished block runs the Linear alone, not the whole MLP again
    replay_input: tuple[tuple[str, str, int], ...] = ()
    # scale-folding points, in forward order; Linear→Linear points apply only where the shapes
    # match (v→o needs as many KV heads as query heads) and the op between is linear or ReLU
    smooth: tuple[Smooth, ...] = ()
    # Gemma's RMSNorm multiplies by (1 + weight): folding 1/s there sets weight' = (1+weight)/s - 1
    norm_plus_one: bool = False


def _llama_smooth(mlp_norm: str) -> tuple[Smooth, ...]:
    return (
        Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Smooth("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        Smooth(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        # down reads act(gate)·up, linear in up's output channels
        Smooth("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


_LLAMA = Family(
    blocks="model.layers",
    sequence=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    replay=(("self_attn", 1),),
    replay_input=(("mlp", "mlp.down_proj", 3),),  # mlp(x) = down_proj(act(gate_proj(x)) * up_proj(x))
    smooth=_llama_smooth("post_attention_layernorm"),
)
# gemma2/3 normalise the attention output with post_attention_layernorm; the MLP reads
# pre_feedforward_layernorm
_GEMMA2 = replace(_LLAMA, smooth=_llama_smooth("pre_feedforward_layernorm"), norm_plus_one=True)

_FALCON = Family(
    blocks="transformer.h",
    sequence=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    replay=(("self_attention", 1),),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": replace(_LLAMA, norm_plus_one=True),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": Family(
        blocks="model.layers",
        sequence=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        replay=(("self_attn", 1),),
        replay_input=(("mlp", "mlp.down_proj", 3),),  # mlp(x) = down_proj(up * act(gate))
        # fused qkv and gate_up: only the norms fold (v→o and up→down would need half a Linear)
        smooth=(
            Smooth("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            Smooth("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ),
    ),
    # GPT-2: Conv1D layers, made Linears by compress.arch.adapt; c_attn is the fused q/k/v
    "gpt2": Family(
        blocks="transformer.h",
        sequence=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        replay=(("attn", 1),),
        replay_input=(("mlp", "mlp.c_proj", 3),),  # mlp(x) = c_proj(gelu(c_fc(x))), dropout off
        smooth=(Smooth("ln_1", ("attn.c_attn",), "attn"), Smooth("ln_2", ("mlp.c_fc",), "mlp")),
    ),
    # phi-2: attention and MLP in parallel on one norm's output; only that norm could fold, and
    # it feeds two modules, so no scale-folding point is declared (awq/smoothquant: a clear error)
    "phi": Family(
        blocks="model.layers",
        sequence=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), ("self_attn.dense", "mlp.fc2")),
    ),
    # fused query_key_value; attention and MLP in parallel by default (use_parallel_residual),
    # each on its own norm
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        sequence=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        replay=(("attention", 1),),
        smooth=(
            Smooth("input_layernorm", ("attention.query_key_value",), "attention"),
            Smooth("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
        ),
    ),
    # falcon's default layout runs attention and MLP in parallel on one norm: nothing folds there
    "falcon": _FALCON,
    "bloom": replace(_FALCON, smooth=(
        Smooth("input_layernorm", ("self_attention.query_key_value",), "self_attention"),
        Smooth("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    )),
    # Mixture of experts: compress.arch.adapt unfuses the experts into one Linear per expert and
    # projection (``*`` stands for the expert index). The router reads the MLP norm's output too,
    # so only the attention's points fold.
    "mixtral": Family(
        blocks="model.layers",
        sequence=(*_LLAMA.sequence[:2], ("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"), ("block_sparse_moe.experts.*.w2",)),
        replay=(("self_attn", 1),),
        smooth=_llama_smooth("post_attention_layernorm")[:2],
    ),
    "opt": Family(
        blocks="model.decoder.layers",
        sequence=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        replay=(("self_attn", 1),),
        smooth=(
            Smooth("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            Smooth("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            Smooth("final_layer_norm", ("fc1",), "fc1"),
            Smooth("fc1", ("fc2",), "fc2"),  # ReLU between: relu(x/s) = relu(x)/s for s > 0
        ),
    ),
}


_QWEN_MOE = Family(
    blocks="model.layers",
    sequence=(
        *_LLAMA.sequence[:2],
        # sparse layers: experts, shared expert and its gate; dense layers (mlp_only_layers): a llama MLP
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
         "mlp.shared_expert_gate", "mlp.gate_proj", "mlp.up_proj"),
        ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
    ),
    replay=(("self_attn", 1),),
    smooth=_llama_smooth("post_attention_layernorm")[:2],
)
FAMILIES.update(qwen2_moe=_QWEN_MOE, qwen3_moe=_QWEN_MOE)


def expand(patterns, names: list[str]) -> list[str]:
    """The ``names`` that ``patterns`` list, in pattern order (``*`` matches an index: ``experts.*.w1``)."""
    out: list[str] = []
    for p in patterns:
        if "*" not in p:
            out += [p] if p in names else []
        else:
            rx = re.compile(re.escape(p).replace(r"\*", r"\d+") + "$")
            out += sorted((n for n in names if rx.match(n)), key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
    return out


def find_blocks(model: nn.Module, model_type: str, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: from the family table, else the generic rule."""
    fam = FAMILIES.get(model_type)
    if fam is not None:
        try:
            blocks = get_module(model, fam.blocks)
            if isinstance(blocks, nn.ModuleList):
                return fam.blocks, blocks
        except AttributeError:
            pass
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and num_layers is not None and len(mod) == num_layers
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise UsageError(
        f"unsupported architecture {model_type!r}: could not find its decoder blocks (expected an "
        f"nn.ModuleList of num_hidden_layers={num_layers} modules, found {len(candidates)}); module classes in the model: "
        f"{_classes(model)}. Supported families: {', '.join(sorted(FAMILIES))} (others work when their blocks are such a "
        "list of modules holding nn.Linear or transformers Conv1D layers); add an entry to compress/families.py"
    )


def _classes(module: nn.Module, limit: int = 12) -> str:
    names = sorted({type(m).__name__ for m in module.modules()})
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def linear_groups(block: nn.Module, model_type: str) -> list[list[str]]:
    """Groups of Linear names (relative to the block) in calibration order."""
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(
            f"architecture {model_type!r}: its decoder block has no nn.Linear layers to compress (module classes in a block: "
            f"{_classes(block)}). Supported families: {', '.join(sorted(FAMILIES))}; a family whose layers are another "
            "module type needs an adapter in compress/arch.py"
        )
    fam = FAMILIES.get(model_type)
    if fam is not None and fam.sequence:
        groups = [g for g in (expand(seq, linears) for seq in fam.sequence) if g]
        listed = [n for g in groups for n in g]
        if len(listed) == len(set(listed)) and set(listed) == set(linears):
            return groups
    return [linears]  # generic: one group, calibrated on the block's original inputs


def replay_points(block: nn.Module, model_type: str) -> dict[int, list[str]]:
    """{group index: submodules whose outputs are final once that group is compressed}; only
    when the family's groups were recognised in this block (see ``linear_groups``)."""
    fam = FAMILIES.get(model_type)
    if fam is None or linear_groups(block, model_type) == [[n for n, m in block.named_modules() if isinstance(m, nn.Linear)]]:
        return {}
    out: dict[int, list[str]] = {}
    for path, g in fam.replay:
        out.setdefault(g, []).append(path)
    return out


def replay_input_points(block: nn.Module, model_type: str) -> dict[int, list[tuple[str, str]]]:
    """{group index: [(submodule, its Linear)]} of ``Family.replay_input``, where the family's
    groups were recognised in this block."""
    fam = FAMILIES.get(model_type)
    if fam is None or not replay_points(block, model_type):
        return {}
    out: dict[int, list[tuple[str, str]]] = {}
    for path, lin, g in fam.replay_input:
        out.setdefault(g, []).append((path, lin))
    return out


def smooth_points(block: nn.Module, model_type: str) -> tuple[list[Smooth], bool]:
    """The family's scale-folding points that exist in this block with matching shapes, and
    whether its norms multiply by (1 + weight). Unknown families get a clear error."""
    fam = FAMILIES.get(model_type)
    if fam is None or not fam.smooth:
        raise UsageError(
            f"architecture {model_type!r}: no scale-folding points are known for it (awq, smoothquant need "
            f"them: which norm or Linear feeds which Linears); supported: "
            f"{', '.join(sorted(k for k, f in FAMILIES.items() if f.smooth))}; add `smooth` to its entry in compress/families.py"
        )
    out = []
    for sm in fam.smooth:
        try:
            prev = get_module(block, sm.prev)
            lins = [get_module(block, n) for n in sm.linears]
        except AttributeError:
            continue
        width = prev.out_features if isinstance(prev, nn.Linear) else getattr(prev, "weight", None)
        width = width if isinstance(width, int) else (None if width is None else width.shape[0])
        if width is not None and all(isinstance(l, nn.Linear) and l.in_features == width for l in lins):
            out.append(sm)
    return out, fam.norm_plus_one
