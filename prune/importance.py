"""What structured pruning measures on calibration data, and the importance of each structure.

``collect(model, windows)`` runs the whole original model once over the calibration windows with
forward hooks and keeps, per block: Σ x xᵀ of the attention's input (what q/k/v read), of the
MLP's input, of o_proj's input (the heads' outputs) and of down_proj's input (the MLP channels);
Σ x² per dimension at every hidden-size norm's input (the norms' rescaling); and the angular
distance between the block's input and output (ShortGPT's block influence, Minitron's depth
importance). Everything is a sum over tokens.

Importance is the output energy a structure contributes, the first-order error of removing it
(Minitron's activation importance, weighted by the consuming weights):
* a query head h: tr(W_o[:, h] H_o[h, h] W_o[:, h]ᵀ); a key/value group: the sum of its heads;
* an MLP channel j: ‖W_down[:, j]‖² H_down[j, j] (fused experts, which no hook sees per expert:
  ‖W_down[:, j]‖ · ‖W_gate[j]‖ · ‖W_up[j]‖, a weight-only proxy);
* a hidden dimension j: Σ over every Linear that reads the residual stream of ‖W[:, j]‖² H[j, j];
* a block: its angular distance (``depth: angular``), or the KL divergence of the model's next-token
  distribution when the block is skipped (``depth: kl``).

``taylor`` (LLM-Pruner's first-order importance) replaces the activation terms by
|Σ w·∂L/∂w| over each structure's weights, the language-modelling loss's gradients summed over
the calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.prune.structured import NORM, READS_HIDDEN, head_dim


@dataclass
class Stats:
    H: dict[str, torch.Tensor] = field(default_factory=dict)  # "<layer prefix>.attn_in" etc. -> Σ x xᵀ
    norm_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # norm parameter name -> Σ x² per dim of its input
    angular: dict[int, float] = field(default_factory=dict)  # block -> Σ over tokens of arccos(cos(x_in, x_out)) / π
    tokens: int = 0
    grads: dict[str, torch.Tensor] | None = None  # taylor: parameter name -> Σ ∂L/∂w


def _first(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _add_H(stats: Stats, key: str, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if key not in stats.H:
        stats.H[key] = torch.zeros(x.shape[1], x.shape[1])
    stats.H[key].addmm_(x.T, x)


def _hooks(model: nn.Module, stats: Stats) -> list:
    hs = []
    layers = model.model.layers
    hidden = model.config.hidden_size

    def pre(key):
        return lambda mod, args, kwargs: _add_H(stats, key, _first(args, kwargs))

    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        reader = getattr(attn, "q_proj", None) or attn.qkv_proj
        hs.append(reader.register_forward_pre_hook(pre(f"{p}.attn_in"), with_kwargs=True))
        hs.append(attn.o_proj.register_forward_pre_hook(pre(f"{p}.self_attn.o_proj"), with_kwargs=True))
        hs.append(layer.mlp.register_forward_pre_hook(pre(f"{p}.mlp_in"), with_kwargs=True))
        for name in ("down_proj", "shared_expert.down_proj"):
            try:
                mod = layer.mlp.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(mod, nn.Linear):
                hs.append(mod.register_forward_pre_hook(pre(f"{p}.mlp.{name}"), with_kwargs=True))
        hs.append(layer.register_forward_hook(_angular_hook(stats, i), with_kwargs=True))
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and w.shape[0] == hidden and NORM.search(name + ".weight"):
            hs.append(mod.register_forward_pre_hook(_sq_hook(stats, name + ".weight"), with_kwargs=True))
    hs.append(model.lm_head.register_forward_pre_hook(pre("lm_head"), with_kwargs=True))
    return hs


def _sq_hook(stats: Stats, key: str):
    def hook(mod, args, kwargs):
        x = _first(args, kwargs).detach().float()
        s = (x * x).reshape(-1, x.shape[-1]).sum(0)
        stats.norm_sq[key] = stats.norm_sq[key] + s if key in stats.norm_sq else s
    return hook


def _angular_hook(stats: Stats, i: int):
    def hook(mod, args, kwargs, out):
        x = _first(args, kwargs).detach().float()
        y = (out[0] if isinstance(out, tuple) else out).detach().float()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1)
        stats.angular[i] = stats.angular.get(i, 0.0) + float((torch.arccos(cos) / torch.pi).sum())
    return hook


@torch.no_grad()
def collect(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress=None) -> Stats:
    """The statistics of module docstring, over ``windows`` (N, seq_len) of token ids."""
    stats = Stats()
    hooks = _hooks(model, stats)
    try:
        for b in range(0, len(windows), batch_size):
            x = windows[b:b + batch_size]
            model(input_ids=x, use_cache=False)
            stats.tokens += x.numel()
            if progress:
                progress(min(b + batch_size, len(windows)), len(windows))
    finally:
        for h in hooks:
            h.remove()
    return stats


def collect_grads(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Σ over ``windows`` of the language-modelling loss's gradient of every block weight (taylor)."""
    params = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.") or n == "lm_head.weight"}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
        p.grad = None
    try:
        for b in range(0, len(windows), batch_size):
            x = windows[b:b + batch_size]
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
            p.grad = None


# ---------------------------------------------------------------- scores


def _contribution(W: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Per input column j of W (out, in): ‖W[:, j]‖² H[j, j] (or ‖W[:, j]‖² without H)."""
    col = (W.float() ** 2).sum(0)
    return col * H.diagonal() if H is not None else col


def _taylor(W: torch.Tensor, g: torch.Tensor, dim: int, size: int = 1) -> torch.Tensor:
    """|Σ w·g| over each unit of ``size`` consecutive slices along ``dim``."""
    s = (W.float() * g.float()).movedim(dim, 0).reshape(W.shape[dim], -1).sum(1)
    return s.reshape(-1, size).sum(1).abs()


def head_scores(state: dict, config, stats: Stats, layer: int) -> torch.Tensor:
    """Importance of each query head of ``layer`` (num_attention_heads,)."""
    d, nq = head_dim(config), config.num_attention_heads
    Wo = state[f"model.layers.{layer}.self_attn.o_proj.weight"].float()
    if stats.grads is not None:
        return _taylor(Wo, stats.grads[f"model.layers.{layer}.self_attn.o_proj.weight"], 1, d)
    H = stats.H[f"model.layers.{layer}.self_attn.o_proj"]
    out = torch.empty(nq)
    for h in range(nq):
        s = slice(h * d, (h + 1) * d)
        out[h] = ((Wo[:, s] @ H[s, s]) * Wo[:, s]).sum()
    return out


def mlp_scores(state: dict, stats: Stats, layer: int, prefix: str) -> torch.Tensor:
    """Importance of each channel of an MLP group: (I,), or (E, I) for fused experts."""
    p = f"model.layers.{layer}.{prefix}"
    if prefix == "mlp.experts.":
        down, gu = state[p + "down_proj"].float(), state[p + "gate_up_proj"].float()  # (E, H, I), (E, 2I, H)
        n = down.shape[-1]
        if stats.grads is not None:
            g = stats.grads
            return (down * g[p + "down_proj"]).sum(1).abs() + (gu * g[p + "gate_up_proj"]).sum(2).reshape(-1, 2, n).sum(1).abs()
        return down.norm(dim=1) * gu[:, :n].norm(dim=2) * gu[:, n:].norm(dim=2)
    W = state[p + "down_proj.weight"]
    if stats.grads is not None:
        return _taylor(W, stats.grads[p + "down_proj.weight"], 1)
    return _contribution(W, stats.H.get(f"model.layers.{layer}.{prefix}down_proj"))


def hidden_scores(state: dict, config, stats: Stats, layers: list[int]) -> torch.Tensor:
    """Importance of each residual-stream dimension (hidden_size,), summed over the kept blocks."""
    score = torch.zeros(config.hidden_size)
    for i in layers:
        for rel, dim in READS_HIDDEN.items():
            name = f"model.layers.{i}.{rel}"
            if name not in state:
                continue
            W = state[name].float()
            W2 = W.reshape(-1, W.shape[-1]) if dim == 2 else W
            if stats.grads is not None:
                score += _taylor(W2, stats.grads[name].reshape(W2.shape), 1)
                continue
            key = "attn_in" if rel.startswith("self_attn.") else "mlp_in"
            score += _contribution(W2, stats.H.get(f"model.layers.{i}.{key}"))
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    if stats.grads is not None and "lm_head.weight" in stats.grads:
        score += _taylor(head, stats.grads["lm_head.weight"], 1)
    elif stats.grads is None:
        score += _contribution(head, stats.H.get("lm_head"))
    return score
