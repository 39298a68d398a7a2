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

from dataclasses import dataclass, field

from torch import nn

from compress.errors import UsageError


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path of the decoder-block ModuleList
    sequence: tuple[tuple[str, ...], ...] = field(default_factory=tuple)  # Linear groups, in order
    # (submodule, group index): once that group is compressed, the submodule's output is final
    # and the engine computes it once per calibration batch instead of once per later pass
    replay: tuple[tuple[str, int], ...] = ()


_LLAMA = Family(
    blocks="model.layers",
    sequence=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    replay=(("self_attn", 1),),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": Family(
        blocks="model.layers",
        sequence=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        replay=(("self_attn", 1),),
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
    ),
}


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


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
        f"nn.ModuleList of num_hidden_layers={num_layers} modules, found {len(candidates)}). "
        f"Known families: {', '.join(sorted(FAMILIES))}; add an entry to compress/families.py"
    )


def linear_groups(block: nn.Module, model_type: str) -> list[list[str]]:
    """Groups of Linear names (relative to the block) in calibration order."""
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"architecture {model_type!r}: its decoder block has no nn.Linear layers to compress")
    fam = FAMILIES.get(model_type)
    if fam is not None and fam.sequence:
        listed = [n for g in fam.sequence for n in g]
        if set(listed) == set(linears):
            return [list(g) for g in fam.sequence]
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
