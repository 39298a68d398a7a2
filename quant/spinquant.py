"""SpinQuant's learned rotations (Liu et al. 2024): R1 (residual stream) and R2 (per layer, each
attention head's values) trained for the quantizer that follows, on the Stiefel manifold.

The rotations of ``compress.quant.rotate`` leave the float model's function unchanged for *any*
orthogonal R1 and R2, so they are free parameters: start from QuaRot's randomized Hadamard
matrices and move them to where the *quantized* model is closest to the original. Each step:

* the Linears' weights are rotated as the fused export will hold them (W·R1 for the stream's
  readers, R1ᵀ·W for its writers, R2 per head on v/o) and fake-quantized on the quantizer's grid
  (round to nearest, per group min-max, straight-through gradient; inputs rounded per token
  too where the quantizer quantizes them, W4A8/W4A4). The embedding's output and lm_head's input
  are rotated by hooks (an unquantized table and head are unchanged by R1, so rotating the 28 M
  rows each step would be wasted work);
* the loss is the distillation loop's: forward KL to the original model's top-k next-token
  distribution, cached once (``compress.distill.losses.topk_forward_kl``);
* the rotations move by Cayley SGD (Li, Fuxin & Todorovic 2020): the Euclidean gradient G gives
  the skew-symmetric W = ½(M Xᵀ − X Mᵀ) (M: momentum of −G), and X ← (I − α/2·W)⁻¹(I + α/2·W)·X,
  an exact Cayley retraction that keeps X orthogonal to float64 precision, step α = min(lr,
  1/‖W‖) so no step turns more than about a radian.

Held-out windows are scored before training and every ``eval_every`` steps: the rotations
returned are the best seen there, never worse than the Hadamard start.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from compress.distill import losses
from compress.quant.passes import auto_group_size
from compress.quant.rtn import QuantScheme, fake_quantize, minmax_params
from torch import nn
from torch.func import functional_call

from compress.errors import TrainingError
from compress.kernels.reference import quantize_input

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Target:
    """The quantization the rotations are trained for (the quantizer's after the rotate pass)."""

    bits: int = 4
    group_size: int | str = 64  # -1: per output channel; auto: the quantizer's per-layer rule
    symmetric: bool = True
    act_bits: int | None = None  # each Linear's input rounded per token (W4A8: 8)


def cayley_step(x: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr: float,
                momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step on the orthogonal group: (new X, new momentum buffer). ``x`` (n, n)
    orthogonal, ``grad`` the Euclidean gradient of the loss at x; float64 in and out."""
    m = -grad if buf is None else momentum * buf - grad
    w = 0.5 * (m @ x.T - x @ m.T)  # skew-symmetric; W·X is −G's projection on the tangent space
    alpha = min(lr, 1.0 / (float(torch.linalg.matrix_norm(w)) + 1e-12))
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    new = torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ x)
    return new, w @ x  # the buffer lives in the tangent space (Li et al.'s M ← W X)


def fake_quantize_ste(w: torch.Tensor, target: Target) -> torch.Tensor:
    """``w`` (out, in) rounded on the target's grid (per group min-max), the gradient passed
    straight through."""
    scheme = QuantScheme(bits=target.bits, group_size=target.group_size, symmetric=target.symmetric, observer="minmax")
    out, k = w.shape
    g = auto_group_size(k) if target.group_size == "auto" else target.group_size
    g = k if g == -1 or k % g else g
    wd = w.detach().float().reshape(-1, g)
    scale, zero = minmax_params(wd.min(1).values.clamp(max=0), wd.max(1).values.clamp(min=0), scheme)
    q = fake_quantize(wd, scale[:, None], zero[:, None], scheme.maxq).reshape(out, k).to(w.dtype)
    return w + (q - w).detach()


def rotated_weights(base: dict, r1: torch.Tensor, r2: torch.Tensor, heads: int, kv_heads: int) -> dict:
    """The decoder Linears' weights (and v's bias) as the fused export holds them: readers W·R1,
    writers R1ᵀ·W (bias too), v's rows R2ᵀ per head, o's columns ·R2 per head; ``r2`` (L, d, d)."""
    out = {}
    d = r2.shape[-1]
    for i in range(r2.shape[0]):
        p = f"model.layers.{i}."
        for lin in READERS:
            out[p + lin + ".weight"] = base[p + lin + ".weight"] @ r1
        for lin in WRITERS:
            out[p + lin + ".weight"] = r1.T @ base[p + lin + ".weight"]
            if p + lin + ".bias" in base:
                out[p + lin + ".bias"] = base[p + lin + ".bias"] @ r1
        v = out[p + "self_attn.v_proj.weight"]
        out[p + "self_attn.v_proj.weight"] = torch.einsum("ed,hdk->hek", r2[i].T, v.reshape(kv_heads, d, -1)).reshape(v.shape)
        if p + "self_attn.v_proj.bias" in base:
            out[p + "self_attn.v_proj.bias"] = (base[p + "self_attn.v_proj.bias"].reshape(kv_heads, d) @ r2[i]).reshape(-1)
        o = out[p + "self_attn.o_proj.weight"]
        out[p + "self_attn.o_proj.weight"] = (o.reshape(o.shape[0], heads, d) @ r2[i]).reshape(o.shape)
    return out


@contextlib.contextmanager
def rotated_stream(model: nn.Module, r1_ref: list, act_bits: int | None):
    """Hooks while the student runs: the embedding's output ·R1, lm_head's input ·R1ᵀ (``r1_ref[0]``,
    read at call time), and each decoder Linear's input rounded per token to ``act_bits``."""
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, y: y @ r1_ref[0]),
               model.get_output_embeddings().register_forward_pre_hook(lambda m, a: (a[0] @ r1_ref[0].T, *a[1:]))]
    if act_bits:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("model.layers."):
                handles.append(m.register_forward_pre_hook(lambda m, a: (quantize_input(a[0], act_bits), *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Problem:
    """What the training sees: the norm-folded float model (its function is the original's, and it
    is the teacher), its frozen decoder weights, and the quantization to train for."""

    model: nn.Module
    base: dict  # the decoder Linears' weights (and biases) of ``model``, float32, detached
    target: Target
    heads: int
    kv_heads: int

    @classmethod
    def of(cls, model: nn.Module, target: Target) -> Problem:
        cfg = model.config
        names = {f"model.layers.{i}.{lin}.{part}" for i in range(cfg.num_hidden_layers) for lin in READERS + WRITERS
                 for part in ("weight", "bias")}
        base = {k: v.detach().float() for k, v in model.state_dict().items() if k in names}
        return cls(model, base, target, cfg.num_attention_heads, cfg.num_key_value_heads)

    def logits(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        """The quantized student's logits on windows ``x`` under rotations r1, r2 (float32)."""
        weights = {k: fake_quantize_ste(v, self.target) if k.endswith(".weight") else v
                   for k, v in rotated_weights(self.base, r1, r2, self.heads, self.kv_heads).items()}
        with rotated_stream(self.model, [r1], self.target.act_bits):
            return functional_call(self.model, weights, (), {"input_ids": x, "use_cache": False}, tie_weights=False).logits


def held_out_kl(problem: Problem, windows: torch.Tensor, topk: tuple, r1: torch.Tensor, r2: torch.Tensor, batch: int) -> float:
    """The mean forward KL to the teacher's top-k on held-out ``windows``."""
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(windows), batch):
            z = problem.logits(windows[b : b + batch], r1.float(), r2.float())
            total += float(losses.topk_forward_kl(z, topk[0][b : b + batch], topk[1][b : b + batch])) * len(z)
    return total / len(windows)


@dataclass
class LearnOptions:
    steps: int = 100
    lr: float = 1.5
    momentum: float = 0.0
    batch_size: int = 2  # windows per step
    topk: int = 64  # the teacher's distribution kept per position
    eval_every: int = 25
    seed: int = 0


def _teacher(problem: Problem, windows: torch.Tensor, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = [], []
    with torch.no_grad():
        for b in range(0, len(windows), batch):
            v, i = losses.teacher_topk(problem.model(input_ids=windows[b : b + batch], use_cache=False).logits.float(), k)
            vals.append(v)
            idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def learn_rotations(problem: Problem, train: torch.Tensor, held: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                    opts: LearnOptions, log=lambda m: None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cayley SGD on (R1, every layer's R2) from ``r1`` (h, h) and ``r2`` (L, d, d), float64;
    returns the best rotations on the held-out windows and a record of the run."""
    t0 = time.time()
    problem.model.eval()
    for p in problem.model.parameters():
        p.requires_grad_(False)
    top_train, top_held = _teacher(problem, train, opts.topk, opts.batch_size), _teacher(problem, held, opts.topk, opts.batch_size)
    x1, x2 = r1.double().clone(), r2.double().clone()
    best = (held_out_kl(problem, held, top_held, x1, x2, opts.batch_size), 0, x1.clone(), x2.clone())
    curve, start_kl, bufs = [], best[0], [None, None]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(opts.seed))
    for step in range(1, opts.steps + 1):
        pick = order[torch.arange((step - 1) * opts.batch_size, step * opts.batch_size) % len(train)]
        p1, p2 = x1.float().requires_grad_(True), x2.float().requires_grad_(True)
        loss = losses.topk_forward_kl(problem.logits(train[pick], p1, p2), top_train[0][pick], top_train[1][pick])
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise TrainingError(f"rotate.learn: the loss is {lv} at step {step}; lower rotate.learn.lr")
        g1, g2 = torch.autograd.grad(loss, (p1, p2))
        x1, bufs[0] = cayley_step(x1, g1.double(), bufs[0], opts.lr, opts.momentum)
        stepped = [cayley_step(x2[i], g2[i].double(), None if bufs[1] is None else bufs[1][i], opts.lr, opts.momentum)
                   for i in range(len(x2))]
        x2, bufs[1] = torch.stack([s[0] for s in stepped]), torch.stack([s[1] for s in stepped])
        curve.append(_sig(lv))
        if step % opts.eval_every == 0 or step == opts.steps:
            kl = held_out_kl(problem, held, top_held, x1, x2, opts.batch_size)
            log(f"rotate.learn: step {step}/{opts.steps}, training KL {lv:.4f}, held-out KL {kl:.4f} (start {start_kl:.4f})")
            if kl < best[0]:
                best = (kl, step, x1.clone(), x2.clone())
    record = {"steps": opts.steps, "lr": opts.lr, "batch_size": opts.batch_size, "windows": len(train), "held_out": len(held),
              "seq_len": int(train.shape[1]), "held_out_kl_start": _sig(start_kl), "held_out_kl": _sig(best[0]),
              "best_step": best[1], "loss_curve": curve, "seconds": round(time.time() - t0, 1)}
    return best[2], best[3], record


def _sig(v: float) -> float:
    return float(f"{v:.6g}")


def orthogonality_error(x: torch.Tensor) -> float:
    """max |XᵀX − I| (float64)."""
    x = x.double()
    return float((x.T @ x - torch.eye(x.shape[0], dtype=x.dtype)).abs().max())

