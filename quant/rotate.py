"""Rotations that leave a model's function unchanged and make its weights easier to quantize
(QuIP's incoherence processing; QuaRot, Ashkboos et al. 2024). Pure functions on a state dict.

The residual stream of a pre-norm transformer can be rotated by any orthogonal R1 once every
RMSNorm's scale is folded into the Linears that read its output (RMSNorm(x R1) = RMSNorm(x) R1
when its weight is all ones, as ‖x R1‖ = ‖x‖):

* ``fold_norms``: each norm's weight g goes into the columns of the Linears after it (q/k/v after
  the attention norm, gate/up after the MLP norm, lm_head after the final norm: W ← W·diag(g)),
  then g ← 1. A tied lm_head is untied first (the final norm's scale makes it differ from the
  embedding).
* ``rotate_residual`` (R1): the embedding's rows and every Linear reading the stream: W ← W·R1;
  every Linear writing it (o_proj, down_proj, and their biases): W ← R1ᵀ·W.
* ``rotate_heads`` (R2, per attention head, on v/o): each value head's rows W_v[h] ← R2ᵀ·W_v[h]
  and each query head's o_proj columns W_o[:, h] ← W_o[:, h]·R2 (softmax mixes tokens, not
  dimensions, so a head's output is rotated by the same R2).

The rotations are randomized Hadamard matrices (``random_hadamard``): a random ±1 diagonal times
a Hadamard matrix of the width, built as QuaRot does for widths that are not powers of two, from
Sylvester's and Paley's constructions (576 = 4 · 12 · 12); for a width with no such form, the
Walsh–Hadamard matrix of its largest power-of-two factor Kronecker a random orthogonal factor of
the rest. Hadamard entries all have the same magnitude, so a weight's outliers are spread over
all columns.

Families: llama, mistral, qwen2, qwen3 (their fold points are the table below); others are
refused (``check_family``).
"""

from __future__ import annotations

import re

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# layer-relative names: the norm and the Linears reading its output
FOLDS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class UnsupportedFamily(ValueError):
    pass


def check_family(config) -> None:
    if config.model_type not in FAMILIES:
        raise UnsupportedFamily(f"model_type {config.model_type!r}: its norms' fold points are not known here; rotations support "
                                f"{', '.join(FAMILIES)}")


def hadamard(n: int) -> torch.Tensor:
    """The n × n Walsh–Hadamard matrix (Sylvester's construction), scaled to be orthogonal; n a
    power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


PALEY_PRIMES = (11, 19, 43, 59)  # primes q = 3 (mod 4): Paley I gives Hadamard matrices of order q + 1 (12, 20, 44, 60)


def paley(q: int) -> torch.Tensor:
    """The (q+1) × (q+1) Hadamard matrix of Paley's first construction (q a prime, q = 3 mod 4),
    unscaled (±1 entries): I + [[0, 1ᵀ], [-1, Q]] with Q[i, j] the quadratic character of j - i."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, chi[idx]
    return s + torch.eye(q + 1, dtype=torch.float64)


def full_hadamard(n: int) -> torch.Tensor | None:
    """An n × n Hadamard matrix scaled to be orthogonal, where n = 2^k · (Paley orders, up to two
    factors), e.g. 576 = 4 · 12 · 12, 3072 = 256 · 12, 5120 = 256 · 20: Kronecker products of
    Sylvester's and Paley's matrices. None when n has no such form."""
    orders = [1] + [q + 1 for q in PALEY_PRIMES]
    for a in orders:
        for b in orders:
            rest = n // (a * b) if n % (a * b) == 0 else 0
            if rest and not rest & (rest - 1):
                h = hadamard(rest)
                for q in (a, b):
                    if q > 1:
                        h = torch.kron(paley(q - 1) / q**0.5, h)
                return h
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random n × n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An n × n orthogonal matrix: diag(±1) · H_n where a Hadamard matrix of that order is built
    here (``full_hadamard``), else diag(±1) · (H_{2^k} ⊗ Q_m), n = 2^k · m with m odd, H the
    Walsh–Hadamard matrix, Q a random orthogonal m × m factor."""
    g = torch.Generator().manual_seed(seed)
    p = n & -n  # the largest power of two dividing n
    m = n // p
    r = full_hadamard(n)
    if r is None:
        r = torch.kron(hadamard(p), random_orthogonal(m, g))
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * r


def _layers(state: dict) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := LAYER.match(k))})


def fold_norms(state: dict, config) -> dict:
    """``state`` (float tensors) with every RMSNorm's weight folded into the Linears reading its
    output and set to ones; lm_head present (untied) and scaled by the final norm."""
    out = dict(state)
    for i in _layers(state):
        for norm, linears in FOLDS.items():
            g = out[f"model.layers.{i}.{norm}.weight"].double()
            for lin in linears:
                k = f"model.layers.{i}.{lin}.weight"
                out[k] = out[k].double() * g
            out[f"model.layers.{i}.{norm}.weight"] = torch.ones_like(g)
    g = out["model.norm.weight"].double()
    head = out.get("lm_head.weight", out["model.embed_tokens.weight"])
    out["lm_head.weight"] = head.double() * g
    out["model.norm.weight"] = torch.ones_like(g)
    return out


def rotate_residual(state: dict, r1: torch.Tensor) -> dict:
    """R1 on the residual stream of a norm-folded ``state``: embedding rows and readers W·R1,
    writers (and their biases) R1ᵀ·W."""
    out = dict(state)
    r1 = r1.double()
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"].double() @ r1
    out["lm_head.weight"] = out["lm_head.weight"].double() @ r1
    for i in _layers(state):
        for lin in READERS:
            k = f"model.layers.{i}.{lin}.weight"
            out[k] = out[k].double() @ r1
        for lin in WRITERS:
            for part in ("weight", "bias"):
                k = f"model.layers.{i}.{lin}.{part}"
                if k in out:
                    out[k] = r1.T @ out[k].double()
    return out


def rotate_heads(state: dict, r2: torch.Tensor, heads: int, kv_heads: int) -> dict:
    """R2 (head_dim × head_dim) per attention head: value rows R2ᵀ·W_v[h] (and bias), o_proj
    columns W_o[:, h]·R2. ``r2`` (d, d) for every layer, or (L, d, d): layer i's own (learned)."""
    out = dict(state)
    r2s = r2.double()
    d = r2s.shape[-1]
    for i in _layers(state):
        r2 = r2s[i] if r2s.dim() == 3 else r2s
        for part in ("weight", "bias"):
            k = f"model.layers.{i}.self_attn.v_proj.{part}"
            if k in out:
                v = out[k].double()
                out[k] = torch.einsum("ed,hd...->he...", r2.T, v.reshape(kv_heads, d, *v.shape[1:])).reshape(v.shape)
        k = f"model.layers.{i}.self_attn.o_proj.weight"
        o = out[k].double()
        out[k] = (o.reshape(o.shape[0], heads, d) @ r2).reshape(o.shape)
    return out


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def initial_rotations(config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot's R1 (hidden, hidden) and R2 (head_dim, head_dim) for ``seed``: randomized Hadamard."""
    return random_hadamard(config.hidden_size, seed), random_hadamard(head_dim(config), seed + 1)


def rotate_state(state: dict, config, seed: int = 0, r1: bool = True, r2: bool = True, folded: bool = False,
                 matrices: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Norms folded (unless ``folded``), then R1 (hidden size) and R2 (head dim) applied; float64
    values (cast them to the stored dtype when saving). ``matrices``: (R1, R2) to apply instead of
    the seed's (SpinQuant's learned ones, R2 (L, d, d) per layer)."""
    check_family(config)
    m1, m2 = matrices or initial_rotations(config, seed)
    out = state if folded else fold_norms(state, config)
    if r1:
        out = rotate_residual(out, m1)
    if r2:
        out = rotate_heads(out, m2, config.num_attention_heads, config.num_key_value_heads)
    return out
