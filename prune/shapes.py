"""Shapes for structured pruning: what to keep for a target shape, the parameter count of a shape,
the least-squares repair, and the search over candidate shapes for a parameter budget.

A ``Shape`` is uniform across blocks (one hidden size, one head count, one MLP width, a number of
blocks), so the pruned model has a standard config. ``select`` keeps the most important
structures (``compress.prune.importance``) for a shape; ``build`` makes the pruned model;
``budget_shapes`` enumerates the shapes that meet a parameter budget (the pass scores them by the
KL divergence of their next-token distribution from the original's on held calibration windows);
``smallest_params`` is the least any shape of that grid reaches.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from compress.prune.importance import Stats, head_scores, hidden_scores, mlp_scores
from compress.prune.structured import (
    READS_HIDDEN,
    Keep,
    qkv_rows,
    check_family,
    head_dim,
    lstsq_repair,
    mlp_field,
    mlp_groups,
    mlp_width,
    prune_state,
)

DIMS = ("hidden", "heads", "intermediate", "layers")


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int  # query heads
    kv_heads: int
    intermediate: int  # config.intermediate_size (other MLP groups scale with it)
    layers: int

    def words(self) -> str:
        return f"hidden {self.hidden}, heads {self.heads}/{self.kv_heads} kv, intermediate {self.intermediate}, layers {self.layers}"


def original_shape(config) -> Shape:
    return Shape(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                 config.intermediate_size, config.num_hidden_layers)


def shape_problem(config, s: Shape) -> str | None:
    """Why ``s`` is not a shape this model can be pruned to (None: it is)."""
    o = original_shape(config)
    for f in ("hidden", "heads", "kv_heads", "intermediate", "layers"):
        v = getattr(s, f)
        if not 1 <= v <= getattr(o, f):
            what = "at least 1 block must stay" if f == "layers" else "at least 1"
            return f"{f} {v}: between 1 and the model's {getattr(o, f)} ({what})"
    if s.heads % s.kv_heads:
        return (f"heads {s.heads} with {s.kv_heads} key/value heads: every key/value group needs the same number of "
                f"query heads (a multiple of {s.kv_heads})")
    if s.hidden % s.heads:
        return (f"hidden {s.hidden} with {s.heads} query heads: transformers needs the hidden size to be a multiple of the "
                f"head count (e.g. {s.hidden // s.heads * s.heads} or {(s.hidden // s.heads + 1) * s.heads})")
    if s.heads // s.kv_heads > o.heads // o.kv_heads:
        return (f"heads {s.heads} with {s.kv_heads} key/value heads: {s.heads // s.kv_heads} query heads per group, more "
                f"than the model's {o.heads // o.kv_heads}")
    return None


def count_params(config) -> int:
    """Every parameter of the model ``config`` describes (tied weights once, embeddings included)."""
    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        m.tie_weights()
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def keep_layers(stats: Stats, n: int, total: int, scores: dict[int, float] | None = None) -> list[int]:
    """The ``n`` blocks to keep: the ones that change the hidden state most (``scores``: block -> importance)."""
    scores = scores if scores is not None else stats.angular
    drop = sorted(range(total), key=lambda i: scores.get(i, 0.0))[: total - n]
    return [i for i in range(total) if i not in drop]


def select(state: dict, config, stats: Stats, s: Shape, layer_scores: dict[int, float] | None = None) -> Keep:
    """What to keep for shape ``s``: the most important blocks, then in each kept block the most
    important key/value groups, query heads within them, and MLP channels; then hidden dimensions."""
    o = original_shape(config)
    keep = Keep(layers=keep_layers(stats, s.layers, o.layers, layer_scores))
    rep_o, rep = o.heads // o.kv_heads, s.heads // s.kv_heads
    for i in keep.layers:
        if (s.heads, s.kv_heads) != (o.heads, o.kv_heads):
            h = head_scores(state, config, stats, i).reshape(o.kv_heads, rep_o)
            groups = _top(h.sum(1), s.kv_heads)
            keep.kv_heads[i] = groups
            keep.heads[i] = torch.cat([g * rep_o + _top(h[g], rep) for g in groups.tolist()])
        for prefix in mlp_groups(state, i):
            width = mlp_width(state, i, prefix)
            k = s.intermediate if mlp_field(config, prefix) == "intermediate_size" else max(1, round(width * s.intermediate / o.intermediate))
            if k < width:
                keep.mlp[(i, prefix)] = _top(mlp_scores(state, stats, i, prefix), k)
    if s.hidden < o.hidden:
        keep.hidden = _top(hidden_scores(state, config, stats, keep.layers), s.hidden)
    return keep


def repairs(state: dict, config, stats: Stats, keep: Keep) -> dict[str, torch.Tensor]:
    """Least-squares refits of the Linears whose inputs lose columns (``lstsq_repair``), at full width."""
    out = {}
    d, nq, nkv = head_dim(config), config.num_attention_heads, config.num_key_value_heads
    for i in keep.layers:
        p = f"model.layers.{i}."
        if i in keep.heads and f"{p}self_attn.o_proj" in stats.H:
            rows = qkv_rows(keep.heads[i], keep.kv_heads.get(i, torch.arange(nkv)), nq, nkv, d)["q"]
            out[p + "self_attn.o_proj.weight"] = lstsq_repair(state[p + "self_attn.o_proj.weight"], stats.H[p + "self_attn.o_proj"], rows)
        for prefix in ("mlp.", "mlp.shared_expert."):
            H = stats.H.get(f"{p}{prefix}down_proj")
            if (i, prefix) in keep.mlp and H is not None:
                name = f"{p}{prefix}down_proj.weight"
                out[name] = lstsq_repair(state[name], H, keep.mlp[(i, prefix)])
        if keep.hidden is not None:
            for rel, dim in READS_HIDDEN.items():
                name, H = p + rel, stats.H.get(p + ("attn_in" if rel.startswith("self_attn.") else "mlp_in"))
                if name in state and H is not None and dim == 1:
                    out[name] = lstsq_repair(out.get(name, state[name]), H, keep.hidden)
    if keep.hidden is not None and not getattr(config, "tie_word_embeddings", False) and "lm_head" in stats.H:
        out["lm_head.weight"] = lstsq_repair(state["lm_head.weight"], stats.H["lm_head"], keep.hidden)
    return out


def build(state: dict, config, keep: Keep, stats: Stats | None, repair: bool = True) -> torch.nn.Module:
    """The pruned model (float32, eval mode), built from its own config: what a runtime loads."""
    fixes = repairs(state, config, stats, keep) if repair and stats is not None else None
    new_state, new_cfg = prune_state(state, config, keep, stats.norm_sq if stats is not None else None, fixes)
    with init_empty_weights(include_buffers=False):  # no random init of weights about to be replaced
        model = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in new_state.items()}, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(new_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned config: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- the search for a budget


def hidden_options(o: Shape, heads: int, dims: tuple[str, ...], multiple: int) -> list[int]:
    """The hidden sizes the search tries with ``heads`` query heads: about ``multiple`` apart,
    each a multiple of both 8 and the head count (transformers refuses to save a config whose
    hidden size the heads do not divide, even with an explicit head_dim)."""
    if "hidden" not in dims:
        return [o.hidden] if o.hidden % heads == 0 else []
    unit = math.lcm(8, heads)
    out = {round((o.hidden - k * multiple) / unit) * unit for k in range(4)}
    return sorted((h for h in out if 0.6 * o.hidden <= h <= o.hidden and h % heads == 0), reverse=True)


def _options(o: Shape, dims: tuple[str, ...], multiple: int) -> dict[str, list]:
    """The values each dimension may take in the search (the original's where it may not change)."""
    rep = o.heads // o.kv_heads
    heads = [(o.heads, o.kv_heads)]
    if "heads" in dims:
        heads += [(o.kv_heads * (rep - 1), o.kv_heads)] if rep > 1 else []
        heads += [(rep * (o.kv_heads - 1), o.kv_heads - 1)] if o.kv_heads > 1 else []
    layers = list(range(o.layers, 0, -1)) if "layers" in dims else [o.layers]
    if "layers" in dims and len(dims) > 1:
        layers = layers[: 1 + max(1, o.layers // 6)]  # mixed with width: a few blocks fewer at most
    return {"heads": heads, "layers": layers}


def budget_shapes(config, target: int, dims: tuple[str, ...], multiple: int = 64) -> list[tuple[Shape, int]]:
    """Every shape in the search grid at or under ``target`` parameters with the widest MLP that
    fits (or, without ``intermediate`` in ``dims``, the shapes that fit), with its parameter count."""
    check_family(config)
    o, opts, out = original_shape(config), _options(original_shape(config), dims, multiple), []
    combos = [(h, nq, nkv, L) for (nq, nkv), L in itertools.product(opts["heads"], opts["layers"])
              for h in hidden_options(o, nq, dims, multiple)]
    for h, nq, nkv, L in combos:
        s = Shape(h, nq, nkv, o.intermediate, L)
        full = count_params(shaped_config(config, s))
        if "intermediate" not in dims or full <= target:
            if full <= target:
                out.append((s, full))
            continue
        step = min(multiple, o.intermediate)
        less = count_params(shaped_config(config, replace(s, intermediate=o.intermediate - step)))
        per = (full - less) / step
        k = int((o.intermediate - (full - target) / per) // step * step)
        if k >= _mlp_floor(o, multiple):
            s = replace(s, intermediate=k)
            out.append((s, count_params(shaped_config(config, s))))
    if "layers" in dims and len(dims) == 1:  # depth only: the most blocks that fit
        out = sorted(out, key=lambda x: -x[0].layers)[:1]
    return out


def _mlp_floor(o: Shape, multiple: int) -> int:
    """The narrowest MLP the search gives a shape: a quarter of the model's, at least one step."""
    return max(min(multiple, o.intermediate), o.intermediate // 4)


def smallest_params(config, dims: tuple[str, ...], multiple: int = 64) -> int:
    """The fewest parameters any shape of ``budget_shapes``' grid reaches (each dimension at its
    narrowest option; the count grows with every one)."""
    o, opts = original_shape(config), _options(original_shape(config), dims, multiple)
    mlp = _mlp_floor(o, multiple) if "intermediate" in dims else o.intermediate
    return min(count_params(shaped_config(config, Shape(min(hs), nq, nkv, mlp, min(opts["layers"]))))
               for nq, nkv in opts["heads"] if (hs := hidden_options(o, nq, dims, multiple)))


def shaped_config(config, s: Shape):
    """``config`` with shape ``s`` (for counting): the fields ``pruned_config`` sets."""
    import copy

    c = copy.deepcopy(config)
    o = original_shape(config)
    c.head_dim = head_dim(config)
    c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size = s.hidden, s.heads, s.kv_heads, s.intermediate
    for f in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(config, f, None):
            setattr(c, f, max(1, round(getattr(config, f) * s.intermediate / o.intermediate)))
    c.num_hidden_layers = s.layers
    if getattr(config, "layer_types", None):
        c.layer_types = config.layer_types[: s.layers]
    if hasattr(config, "mlp_only_layers"):
        c.mlp_only_layers = [i for i in config.mlp_only_layers if i < s.layers]
    return c


@torch.no_grad()
def kl_to(reference_logits: list[torch.Tensor], model, windows: torch.Tensor) -> float:
    """Mean per-token KL(original ‖ model) on ``windows`` (one window per forward)."""
    total, n = 0.0, 0
    for ref, x in zip(reference_logits, windows):
        lp = torch.log_softmax(model(input_ids=x[None], use_cache=False).logits[0].float(), -1)
        lq = torch.log_softmax(ref.float(), -1)
        total += float((lq.exp() * (lq - lp)).sum())
        n += x.numel()
    return total / n
