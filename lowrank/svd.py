"""Truncated SVD of a Linear's weight, chosen to minimise the error on its inputs.

A Linear W (out × in) is replaced by B·A, B (out × r), A (r × in). What matters is the output
error on the calibration inputs X (tokens × in), ‖X(W − BA)ᵀ‖²_F = tr((W − BA) H (W − BA)ᵀ)
with H = XᵀX (the engine's ``hessian`` statistic). Three ways to pick the factors:

* ``whitened`` (SVD-LLM, Wang et al. 2024): with H = S·Sᵀ (S the Cholesky factor), the error is
  ‖(W − BA)·S‖²_F, so the best rank-r approximation of W·S (Eckart–Young) gives the best rank-r
  W: truncate W·S = UΣVᵀ and put A = V_rᵀ·S⁻¹. The error of rank r is Σ_{i>r} σ_i² exactly;
* ``asvd`` (Yuan et al. 2023): scale input channel j by s_j = mean|x_j|^α before the SVD, so
  channels with large activations are approximated better: W·diag(s) = UΣVᵀ, A = V_rᵀ·diag(s)⁻¹;
* ``svd``: plain truncated SVD of W (the weight error only; the baseline the others beat).

Each returns the singular triplets it truncates and, when H is given, every component's exact
share of the output error (``gains``): with U orthonormal the error of keeping the first r
components is Σ_{i>r} gains_i for all three methods (for ``whitened`` gains_i = σ_i²). Rank
allocation across layers spends parameters where those gains are largest.

The factors are split as B = U_r·√Σ_r, A = √Σ_r·V_rᵀ·M⁻¹ (balanced magnitudes: both quantize
alike). Everything runs in float64 on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.errors import UsageError

METHODS = ("whitened", "asvd", "svd")


@dataclass
class Decomposition:
    """The SVD of a layer's (scaled) weight, ready to truncate at any rank.

    U (out, k), sigma (k,), Vt (k, in): the SVD of W·M (M the whitening or scaling matrix);
    unscale: applies M⁻¹ from the right to rows of Vt; gains (k,): each component's share of the
    output error on the calibration inputs (None without H); total: ‖X Wᵀ‖² (the error at rank 0).
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vt: torch.Tensor
    unscale: object
    gains: torch.Tensor | None
    total: float | None
    info: dict = field(default_factory=dict)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, rank), A (rank, in)), float32."""
        root = self.sigma[:rank].sqrt()
        B = self.U[:, :rank] * root
        A = self.unscale(root[:, None] * self.Vt[:rank])
        return B.float(), A.float()

    def error(self, rank: int) -> float | None:
        """‖X(W − BA)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs, for the factors of ``rank``."""
        if self.gains is None:
            return None
        return float(self.gains[rank:].sum() / max(self.total, 1e-300))


def whitening(H: torch.Tensor, damp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, object, dict]:
    """A square root S of H + λI (S·Sᵀ = H + λI, λ = damp · mean(diag H)) and x ↦ x·S⁻¹.

    Cholesky first; where H is too ill-conditioned it retries with λ ×10 (three times), then falls
    back to the eigendecomposition H = QΛQᵀ with Λ clamped to λ (S = Q√Λ). Raises UsageError
    naming ``name`` when H is all zeros or not finite (no calibration input reached the layer)."""
    H = H.double()
    if not bool(torch.isfinite(H).all()):
        raise UsageError(f"{name}: its calibration inputs contain NaN or inf (XᵀX is not finite); check the model's weights and the calibration data")
    mean = float(torch.diagonal(H).mean())
    if mean <= 0:
        raise UsageError(f"{name}: XᵀX of its calibration inputs is all zeros (the layer saw no signal); "
                         "use more or other calibration data, or list the layer under `ignore`")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    lam = damp * mean
    for _ in range(4):
        S, bad = torch.linalg.cholesky_ex(H + lam * eye)
        if int(bad) == 0:
            def unscale(M, S=S):  # M·S⁻¹ = (S⁻ᵀ Mᵀ)ᵀ
                return torch.linalg.solve_triangular(S.T, M.T, upper=True).T

            return S, unscale, {"damp": lam / mean, "whitening": "cholesky"}
        lam *= 10
    evals, Q = torch.linalg.eigh(H)
    evals = evals.clamp_min(damp * mean)
    S = Q * evals.sqrt()
    rsqrt = evals.rsqrt()

    def unscale(M, Q=Q, r=rsqrt):  # M·S⁻¹ = M·Λ^{-1/2}Qᵀ
        return (M * r) @ Q.T

    return S, unscale, {"damp": damp, "whitening": "eigh"}


def decompose(W: torch.Tensor, method: str = "whitened", H: torch.Tensor | None = None, absmean: torch.Tensor | None = None,
              damp: float = 0.01, alpha: float = 0.5, name: str = "layer", C: torch.Tensor | None = None) -> Decomposition:
    """The SVD ``method`` truncates, for W (out, in); H (in, in) = X̂ᵀX̂ and absmean (in,) = mean|x̂|.

    ``whitened`` needs H; ``asvd`` needs absmean; H, when given, also yields each component's
    exact output error (``gains``) for every method.

    ``C`` (whitened only) = XᵀX̂, where X̂ are the inputs the layer gets in the compressed model and
    X the original model's at the same tokens: the factors then minimise ‖XWᵀ − X̂(BA)ᵀ‖², the
    distance to the *original* outputs (errors of earlier layers are compensated where the inputs
    allow). With the damping as a pull towards W, the unconstrained optimum is
    W* = W(C + λI)(H + λI)⁻¹, and the best rank r truncates W*·S = W(C + λI)S⁻ᵀ. ``gains`` are then
    the σ² of that matrix (the error beyond what no matrix can fix)."""
    if method not in METHODS:
        raise ValueError(f"unknown low-rank method {method!r}; one of {', '.join(METHODS)}")
    W = W.double()
    info: dict = {}
    if method == "whitened":
        if H is None:
            raise ValueError("whitened SVD needs the inputs' XᵀX (H)")
        S, unscale, info = whitening(H, damp, name)
        if C is None:
            M = W @ S
        else:
            lam = info["damp"] * float(torch.diagonal(H.double()).mean())
            Cd = C.double() + lam * torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
            if info["whitening"] == "cholesky":
                M = W @ torch.linalg.solve_triangular(S, Cd.T, upper=False).T  # W·C·S⁻ᵀ
            else:
                M = W @ Cd @ unscale(torch.eye(C.shape[0], dtype=torch.float64, device=C.device)).T  # S⁻ᵀ = (I·S⁻¹)ᵀ
            info = {**info, "target": "original"}
    elif method == "asvd":
        if absmean is None:
            raise ValueError("asvd needs the inputs' mean |x| per channel")
        s = absmean.double().clamp_min(0) ** alpha
        floor = s[s > 0].min() if bool((s > 0).any()) else torch.tensor(1.0, dtype=s.dtype)
        s = torch.where(s > 0, s, floor)  # a channel that never fired keeps the smallest scale
        M = W * s

        def unscale(X, s=s):
            return X / s
    else:
        M = W

        def unscale(X):
            return X
    U, sigma, Vt = torch.linalg.svd(M, full_matrices=False)
    gains = total = None
    if method == "whitened":
        gains = sigma**2  # ‖(W − W_r)S‖² = Σ_{i>r} σ_i²: the damped objective, exactly
        total = float(gains.sum())
    elif H is not None:
        # component i leaves σ_i u_i (v_iᵀ M⁻¹) out; with U orthonormal the output errors add:
        # ‖X(W − W_r)ᵀ‖² = Σ_{i>r} σ_i² · v_iᵀM⁻¹ H M⁻ᵀv_i
        R = unscale(Vt)  # rows v_iᵀM⁻¹
        gains = sigma**2 * ((R @ H.double()) * R).sum(dim=1)
        total = float(torch.sum((W @ H.double()) * W))
    return Decomposition(U, sigma, Vt, unscale, gains, total, info)


def low_rank(W: torch.Tensor, rank: int, method: str = "whitened", H=None, absmean=None, damp: float = 0.01, alpha: float = 0.5,
             name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(B, A, relative output error) of the rank-``rank`` factorization of W (one call)."""
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} outside [1, {min(W.shape)}] for a {tuple(W.shape)} weight")
    d = decompose(W, method, H, absmean, damp, alpha, name)
    B, A = d.factors(rank)
    return B, A, d.error(rank)


def breakeven_rank(in_features: int, out_features: int) -> float:
    """The rank at which B·A holds as many parameters as W: in·out / (in + out)."""
    return in_features * out_features / (in_features + out_features)
