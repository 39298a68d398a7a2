"""Online rotations (QuaRot's R4): a randomized Hadamard matrix applied to a Linear's *input* at
run time, its transpose fused into the weight offline, so the Linear computes the same function
while its input has no outlier channels left to break per-token activation quantization (W4A8).

The MLP's down projection reads SiLU(gate)·up, whose channels carry the largest activation
outliers of a llama block, and nothing before it is linear in that input (the product is not), so
the rotation cannot be folded into an earlier weight: x ↦ x·R is computed on every forward, and
W_down ← W_down·R once (y = x Wᵀ = (x R)(W R)ᵀ, as R Rᵀ = I).

R = diag(s) · (F_1 ⊗ … ⊗ F_m), the factors each at most 16 wide where the width allows (Sylvester
blocks and Paley's orders 12, 20, 44, 60; a random orthogonal factor for an odd rest), so the
online product costs n · Σ f_i multiply-adds per token instead of n²: 1536 = 12 · 16 · 8 costs
36 per element (the down projection itself: 576 per element on the demo).

How a model carries it: compress.json ``rotation.r4`` = {"targets": layer-relative name suffix,
"size", "seed", "checksum"}; ``install`` registers an ``OnlineRotation`` forward pre-hook on every
targeted Linear of a model skeleton (``ModelSource.skeleton`` calls it, so calibration, ``compress
eval`` and ``compress.load`` all compute it); ``compress.utils.replace_linear`` carries the hook
to the module replacing a Linear (it is marked ``carried``). The checksum (of R's float64 signs and factors) refuses a checkpoint whose
matrix this version would build differently. Transformers and vLLM do not compute it: exports
carrying it are refused there (see ``quant.rotate_pass``).
"""

from __future__ import annotations

import hashlib

import torch
from compress.quant.rotate import PALEY_PRIMES, hadamard, paley, random_orthogonal
from torch import nn

from compress.errors import InputError

DOWN = "mlp.down_proj"  # R4's target: the MLP's down projection (layer-relative suffix)
MAX_FACTOR = 16  # Sylvester blocks are split to at most this width


def hadamard_factors(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Orthogonal float64 factors whose Kronecker product (in list order) is an n × n Hadamard
    matrix (Paley orders times a power of two, as ``rotate.full_hadamard``), or, where n has no
    such form, H_{2^k} ⊗ Q_m with Q a random orthogonal factor of the odd rest m."""
    orders = [1] + [q + 1 for q in PALEY_PRIMES]
    for a in orders:
        for b in orders:
            rest = n // (a * b) if n % (a * b) == 0 else 0
            if rest and not rest & (rest - 1):
                return [paley(q - 1) / q**0.5 for q in (b, a) if q > 1] + _sylvester(rest)
    p = n & -n
    return _sylvester(p) + [random_orthogonal(n // p, torch.Generator().manual_seed(seed))]


def _sylvester(p: int) -> list[torch.Tensor]:
    """H_p as Kronecker factors of at most MAX_FACTOR (H_{ab} = H_a ⊗ H_b for powers of two)."""
    out = []
    while p > 1:
        f = min(p, MAX_FACTOR)
        out.append(hadamard(f))
        p //= f
    return out


def signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)  # its own stream, apart from R1's and R2's
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def apply_factored(x: torch.Tensor, s: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x · diag(s) · (F_1 ⊗ … ⊗ F_m) over x's last axis, one factor at a time (float32 or x's
    dtype where wider)."""
    shape, dt = x.shape, x.dtype
    work = torch.float64 if dt == torch.float64 else torch.float32
    y = x.to(work) * s.to(work)
    lead = y.shape[:-1]
    pre, post = 1, shape[-1]
    for f in factors:
        k = f.shape[0]
        post //= k
        y = y.reshape(*lead, pre, k, post)
        y = torch.einsum("...pkq,kl->...plq", y, f.to(work))
        pre *= k
    return y.reshape(shape).to(dt)


def dense(n: int, seed: int) -> torch.Tensor:
    """The float64 n × n matrix R the factored product computes (x · R)."""
    return apply_factored(torch.eye(n, dtype=torch.float64), signs(n, seed), hadamard_factors(n, seed))


def checksum(n: int, seed: int) -> str:
    """A hash of the signs and factors that define R (not of the dense n × n matrix: 254 MB at
    n = 5632, built at every load)."""
    h = hashlib.sha256(signs(n, seed).numpy().tobytes())
    for f in hadamard_factors(n, seed):
        h.update(f.numpy().tobytes())
    return h.hexdigest()[:16]


class OnlineRotation:
    """A forward pre-hook: the Linear's input x ↦ x · R (R = ``dense(size, seed)``)."""

    carried = True  # compress.utils.replace_linear moves it to the module replacing its Linear

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.s, self.factors = signs(size, seed), hadamard_factors(size, seed)

    def __call__(self, module: nn.Module, args: tuple):
        return (apply_factored(args[0], self.s, self.factors), *args[1:])

    def __repr__(self) -> str:
        return f"OnlineRotation(size={self.size}, seed={self.seed})"


def section(size: int, seed: int) -> dict:
    """compress.json's ``rotation.r4``."""
    return {"targets": DOWN, "size": size, "seed": seed, "checksum": checksum(size, seed)}


def rotations_of(module: nn.Module) -> list[OnlineRotation]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, OnlineRotation)]


def install(model: nn.Module, r4: dict | None, where: str = "compress.json") -> int:
    """Register R4's pre-hook on every Linear named ``*.{r4['targets']}``; returns how many."""
    if not r4:
        return 0
    size, seed = int(r4["size"]), int(r4["seed"])
    if checksum(size, seed) != r4.get("checksum"):
        raise InputError(f"{where}: rotation.r4 (size {size}, seed {seed}) names a matrix this version of compress builds "
                         "differently (checksum mismatch); load it with the version that wrote it")
    hook, n = OnlineRotation(size, seed), 0
    for name, m in model.named_modules():
        if name.endswith("." + r4["targets"]) and not rotations_of(m):
            m.register_forward_pre_hook(hook)
            n += 1
    return n
