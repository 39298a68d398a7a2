"""GPTQ: accurate post-training quantization with second-order error feedback.

Objective, per Linear: ``min_Ŵ ‖X Ŵᵀ − X Wᵀ‖²`` over ``Ŵ`` on the quantization grid, with
``H = XᵀX`` from calibration inputs. Columns are rounded one at a time and each rounding error is
pushed into the not-yet-rounded columns through the inverse Hessian (see ``compress.obs``).
Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023, Algorithm 1.

Options beyond the paper's core loop:

* ``act_order``: visit columns in order of decreasing ``H_jj`` (largest activations first). Groups
  are then formed in that order, so each column's group is recorded in ``g_idx`` (exported; the
  runtime gathers scales through it).
* A group's scale and zero point are fitted when the loop reaches its first column, on the
  weights as they are *then* (already carrying the error of earlier columns).
* ``static_groups``: instead, fit every group's scale and zero point up front on the original
  weights, groups being consecutive columns. Combined with ``act_order`` this keeps the column
  visiting order but needs no ``g_idx`` (plain grouping: every runtime serves it).
* ``weak_columns``: OWQ's weak columns (Lee et al., "OWQ: Outlier-Aware Weight Quantization",
  AAAI 2024). The ``k`` input columns of largest sensitivity ``λ_j ‖ΔW_{:,j}‖²`` (the paper's
  criterion: ``λ_j = H_jj``, ``ΔW`` the round-to-nearest error on the layer's own grid) stay in
  16 bit. They are visited *last* and never rounded (only cast to the storage dtype), so GPTQ on
  the other columns is exact GPTQ over them, and every rounding error is pushed into the weak
  columns too: their stored values are the least-squares best given the rounded ones. The grid
  of the quantized part is fitted without them (a weak column is left out of its group's range),
  and their codes are their group's zero point, so the packed part dequantizes to 0 there.
"""

from __future__ import annotations

import torch
from compress.quant import ggml
from compress.quant.rtn import (
    QuantResult,
    QuantScheme,
    check_group_size,
    fit_qparams,
    quantize_codes,
    rtn_quantize,
)

from compress.obs import blockwise_solve, inverse_cholesky, prepare_hessian


class ColumnRounder:
    """GPTQ's per-column step (a ``compress.obs.ColumnStep``): round column ``j`` (a position in
    visiting order) on its group's grid, recording codes, scales and zero points.

    ``W`` (out, in) is the weight already permuted to visiting order ``perm`` (in,). Shared with
    SparseGPT's joint sparse + quantized mode, which calls it for the columns it keeps."""

    def __init__(self, W: torch.Tensor, perm: torch.Tensor, scheme: QuantScheme, static_groups: bool,
                 fit_on: torch.Tensor | None = None, outliers: int = 0, outlier_dtype: torch.dtype = torch.bfloat16,
                 weak: int = 0):
        """``fit_on`` (out, in), visiting order: the weights static groups are fitted on (default
        ``W``; SparseGPT's joint mode passes the pruned weights, whose range the kept ones have).
        ``outliers``: per column, that many weights with the largest rounding error are kept
        instead, in ``outlier_dtype`` (SpQR's outliers; the error feedback sees the kept value).
        ``weak``: the last ``weak`` columns of the visiting order are OWQ's weak columns, kept
        whole in ``outlier_dtype`` and left out of every group's fit."""
        out_f, in_f = W.shape
        self.scheme, self.perm, self.static = scheme, perm, static_groups
        self.k, self.outlier_dtype = outliers, outlier_dtype
        self.nq = in_f - weak  # visiting positions >= nq are weak columns
        if outliers:
            self.out_rows = torch.zeros(in_f, outliers, dtype=torch.int64)  # row j: the column visited j-th
            self.out_vals = torch.zeros(in_f, outliers)
        self.weak_vals = torch.zeros(weak, out_f)  # row i: the weak column visited (nq + i)-th, as kept
        self.gw = scheme.group_width(in_f)
        G = scheme.groups(in_f)
        # kept transposed, (G, out) and (in, out), so the per-column reads and writes are contiguous
        self.scale = torch.zeros(G, out_f)
        self.zero = torch.zeros(G, out_f)
        self.codes = torch.zeros(in_f, out_f)  # row j: the codes of the column visited j-th
        if static_groups:  # natural groups, fitted once on the original weights
            order = torch.argsort(perm)
            Wn = (W if fit_on is None else fit_on)[:, order]  # (out, in) in original column order
            quantized = order < self.nq  # (in,) original order: not a weak column
            for g in range(G):
                cols = slice(g * self.gw, (g + 1) * self.gw)
                self.scale[g], self.zero[g] = self.fit(Wn[:, cols][:, quantized[cols]])
        # visiting position -> group
        self.group_of = (perm // self.gw) if static_groups else (torch.arange(in_f) // self.gw)

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's scale and zero point from its quantized columns ``w`` (out, n); a group of weak
        columns only (n = 0) gets the smallest scale: its codes are all the zero point."""
        return fit_qparams(w if w.shape[1] else w.new_zeros(w.shape[0], 1), self.scheme)

    def __call__(self, j: int, w: torch.Tensor, current, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The rounded column (out,); rows where ``keep`` (out,) is False get the zero point's
        code, so they dequantize to exactly 0 (a pruned weight stays pruned)."""
        # with act_order (not static), groups follow the visiting order
        g = int(self.group_of[j])
        if not self.static and j % self.gw == 0:  # the group's quantized columns (weak ones are last)
            self.scale[g], self.zero[g] = self.fit(current(j, min(j + self.gw, self.nq)) if j < self.nq else w.new_zeros(w.shape[0], 0))
        s, z = self.scale[g], self.zero[g]
        if j >= self.nq:
            return self.keep_weak(j, w, z, keep)
        c = quantize_codes(w, s, z, self.scheme.maxq)
        if keep is not None:
            c = torch.where(keep, c, z)
        self.codes[j] = c
        deq = (c - z) * s
        if self.k:
            top = torch.topk((w - deq).abs(), self.k).indices
            kept = w[top].to(self.outlier_dtype).float()
            deq[top] = kept
            self.out_rows[j], self.out_vals[j] = top, kept
        return deq

    def keep_weak(self, j: int, w: torch.Tensor, z: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """A weak column: its current value (error feedback included) in the storage dtype, pruned
        rows zero; its codes are the zero point (the packed part is 0 there). With outliers too,
        its first ``k`` rows are recorded as its outliers, so either overwrite gives the same."""
        kept = w.to(self.outlier_dtype).float()
        if keep is not None:
            kept = torch.where(keep, kept, torch.zeros_like(kept))
        self.codes[j] = z
        self.weak_vals[j - self.nq] = kept
        if self.k:
            self.out_rows[j] = torch.arange(self.k)
            self.out_vals[j] = kept[: self.k]
        return kept

    def result(self, act_order: bool, info: dict) -> QuantResult:
        invperm = torch.argsort(self.perm)
        weak = self.weak_vals.shape[0]
        return QuantResult(
            q=self.codes.T[:, invperm].to(torch.int32),
            scale=self.scale.T.contiguous(),
            zero=self.zero.T.contiguous().to(torch.int32),
            g_idx=self.group_of[invperm].to(torch.int32),  # natural order: arange(in) // gw unless visiting-order groups
            scheme=self.scheme,
            # only groups in visiting order need g_idx (act-order, or weak columns moved last)
            act_order=(act_order or weak > 0) and not self.static,
            info=info,
            outliers=(self.out_rows[invperm], self.out_vals[invperm]) if self.k else None,
            weak=(self.perm[self.nq :].clone(), self.weak_vals.T.contiguous()) if weak else None,
        )


def activation_order(W: torch.Tensor, H: torch.Tensor, act_order: bool,
                     last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, H, perm)`` permuted to visit columns by decreasing ``H_jj`` (or unpermuted), the
    columns ``last`` (k,) (weak columns) after all the others, in the order given."""
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    if last is not None and last.numel():
        at_end = torch.zeros(W.shape[1], dtype=torch.bool, device=perm.device)
        at_end[last] = True
        perm = torch.cat([perm[~at_end[perm]], last])
    if act_order or last is not None and last.numel():
        W, H = W[:, perm], H[perm[:, None], perm[None, :]]  # one gather: no second (in, in) copy
    return W, H, perm


def weak_column_scores(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """OWQ's sensitivity of each input column (in,): ``λ_j ‖ΔW_{:,j}‖²`` with ``λ_j = H_jj`` and
    ``ΔW = W − RTN(W)``, the round-to-nearest error on the layer's grid (all columns). A column
    scores high when its input carries outliers (large ``H_jj``) and its weights round badly."""
    dW = W.float() - rtn_quantize(W.float(), scheme).dequantize()  # (out, in)
    return torch.diag(H).float() * (dW**2).sum(0)


def weak_columns_of(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, k: int) -> torch.Tensor:
    """The ``k`` columns of largest ``weak_column_scores``, ascending, int64 (k,)."""
    return torch.sort(torch.topk(weak_column_scores(W, H, scheme), k).indices).values


def original_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose outputs on the compressed model's inputs best match the *original* model's
    outputs: argmin_V ‖XWᵀ − X̂Vᵀ‖² = W(C + λI)(H + λI)⁻¹, with H = X̂ᵀX̂, C = XᵀX̂ and the damping
    λ = damp · mean(diag H) as a pull towards W (C = H gives W back). Since ‖XWᵀ − X̂Ŵᵀ‖² =
    ‖X̂(W* − Ŵ)ᵀ‖² + const, GPTQ on W* with H minimises the distance to the original outputs:
    earlier layers' errors are compensated where the inputs allow (GPTAQ's asymmetric calibration,
    Li et al. 2025). float64; ``W`` (out, in)."""
    n = H.shape[0]
    lam = damp * float(torch.diagonal(H).double().mean().clamp_min(1e-12))
    eye = torch.eye(n, dtype=torch.float64, device=H.device)
    L = torch.linalg.cholesky(H.double() + lam * eye)
    rhs = (C.double() + lam * eye).T @ W.double().T  # (in, out): (C + λI)ᵀ Wᵀ
    return torch.cholesky_solve(rhs, L).T.to(W.dtype).contiguous()


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
    name: str = "",
    C: torch.Tensor | None = None,
    outliers: int = 0,
    outlier_dtype: torch.dtype = torch.bfloat16,
    weak_columns: int = 0,
) -> QuantResult:
    """Quantize ``W`` (out, in) given ``H`` (in, in) = Σ xxᵀ over calibration inputs.

    ``mask`` (out, in) bool, True = kept: weights already pruned stay exactly zero (their code is
    the zero point) and the solver pushes the rounding error of the kept ones around them.
    ``C`` (in, in) = Σ x·x̂ᵀ, the original model's inputs against these: quantize
    ``original_target(W, H, C)`` instead of W (the original outputs as the target).
    ``outliers``: per input column, the ``outliers`` weights whose rounding error is largest stay
    unquantized (in ``outlier_dtype``), and the result's ``outliers`` holds them: (rows, values),
    each (in, outliers), column j's kept rows and values (SpQR's dense-and-sparse, with a fixed
    count per column). ``weak_columns``: that many whole input columns (OWQ's weak columns, see
    the module docstring) stay unquantized in ``outlier_dtype``; the result's ``weak`` holds them:
    (columns (k,), values (out, k)), values after the error feedback (pruned rows zero)."""
    if outliers and mask is not None:
        raise ValueError(f"{name}: outliers and a pruning mask together are not supported")
    in_f = W.shape[1]
    if not check_group_size(in_f, scheme.group_size):
        raise ValueError(f"{name}: group_size {scheme.group_size} does not divide in_features {in_f}")
    if not 0 <= weak_columns < in_f:
        raise ValueError(f"{name}: weak_columns {weak_columns} must be below in_features {in_f}")
    if C is not None:
        W = original_target(W, H, C, damp)
        if mask is not None:
            W = W * mask
    weak = weak_columns_of(W, H, scheme, weak_columns) if weak_columns else None
    W, H = prepare_hessian(W, H)  # copies: the caller's H is left as it was
    W, H, perm = activation_order(W, H, act_order, last=weak)
    U, damp_used = inverse_cholesky(H, damp, name)  # damps H in place
    del H
    rounder = ColumnRounder(W, perm, scheme, static_groups, outliers=outliers, outlier_dtype=outlier_dtype, weak=weak_columns)
    if mask is None:
        step = rounder
    else:
        keep_t = mask[:, perm].T.contiguous()  # (in, out) in visiting order: row j is column j's mask

        def step(j, w, current):
            return rounder(j, w, current, keep_t[j])

    _, losses = blockwise_solve(W, U, step, blocksize)
    return rounder.result(act_order, {"damp": damp_used, "loss": float(losses.sum())})


# ---------------------------------------------------------------- GGUF storage grids


class GridRounder:
    """GPTQ's column step on a llama.cpp storage grid (``compress.quant.ggml``): every block's
    stored parameters (fp16 scales, the K-quants' quantized sub-block scales and mins) are chosen
    before the loop, as llama.cpp stores them, so the solver compensates exactly the rounding
    llama.cpp will compute. ``perm``: the visiting order (act-order or natural)."""

    def __init__(self, W: torch.Tensor, perm: torch.Tensor, params):
        self.params, self.perm = params, perm.tolist()
        self.codes = torch.zeros(W.shape[1], W.shape[0], dtype=torch.int32)  # row j: column visited j-th

    def __call__(self, j: int, w: torch.Tensor, current) -> torch.Tensor:
        codes, values = ggml.quantize_column(w, self.params, self.perm[j])
        self.codes[j] = codes
        return values


def gptq_quantize_grid(
    W: torch.Tensor,
    H: torch.Tensor,
    grid,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    name: str = "",
):
    """GPTQ of ``W`` (out, in) on the GGML grid ``grid`` (a ``compress.quant.ggml.GGMLGrid``)
    given ``H`` (in, in). The blocks' parameters are fitted up front on the original weights,
    weighting each column by ``H_jj`` (the mean squared activation, what llama.cpp's importance
    matrix holds); then columns are rounded in act-order (``act_order``) or natural order, each
    on its block's fixed grid, with the error pushed into the columns not yet rounded. Returns
    ``(codes int32 (out, in), params, info)``: ``ggml.encode(codes, params)`` is the tensor's
    GGUF data."""
    W, H = prepare_hessian(W, H)
    params = ggml.fit_params(W, grid, importance=torch.diag(H).clone())
    W, H, perm = activation_order(W, H, act_order)
    U, damp_used = inverse_cholesky(H, damp, name)
    del H
    rounder = GridRounder(W, perm, params)
    _, losses = blockwise_solve(W, U, rounder, blocksize)
    codes = rounder.codes.T[:, torch.argsort(perm)].contiguous()
    return codes, params, {"damp": damp_used, "loss": float(losses.sum())}
