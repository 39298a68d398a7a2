"""llama.cpp's (GGML's) storage grids as pure tensor functions: fit a weight's stored block
parameters, round it onto them, dequantize it bit for bit like gguf, and encode the GGUF bytes.

Conventions (shared with GPTQ's grid mode and the GGUF exporter):

* A weight ``W`` (rows, n) is stored row by row (a GGUF row is a weight row) in blocks of
  ``grid.block`` columns: 32 for the legacy types (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl), 256 for
  the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k); ``n`` must be a multiple of ``grid.block``.
* Every ``grid.sub`` consecutive columns of a row share one effective step ``a`` and offset ``b``:
  code ``q`` (an index into ``grid.levels``) stands for ``a * levels[q] + b``. ``levels`` is
  ``arange(L)`` for the uniform types and iq4_nl's 16 fixed values.
* Types without a stored min are symmetric about a fixed level: ``b = -grid.shift * a`` (q4_0:
  shift 8, the stored value is ``d * (q - 8)``; q3_k: 4; q6_k: 32; iq4_nl: 0). q8_0 uses the 255
  codes -127..127 (shift 127): llama.cpp's quantizer never writes -128, which SIMD dot products
  built on sign tricks mishandle.
* ``(a, b)`` are what llama.cpp computes from the stored fields, in float32: legacy ``a = d`` and
  ``b = m`` (q4_1, q5_1) or ``-shift * d``; K-quants ``a = d * sc`` with an integer sub-scale
  ``sc`` under the fp16 super-scale ``d``, and ``b = -(dmin * m)`` (q2_k, q4_k, q5_k) or
  ``-shift * a``. Every product involved is exact in float32 (an fp16 value has 11 significant
  bits, sub-scales and codes at most 8 each), so ``dequantize`` reproduces
  ``gguf.quants.dequantize(encode(q, p), qtype)`` bit for bit (signed zeros included).

Fitting (``fit_params``) minimizes the importance-weighted squared error ``Σ w·(Ŵ − W)²`` of
round-to-nearest, sub-block by sub-block:

1. Per sub-block, 21 candidate steps (as llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants``
   do): the extreme weight on the end level, or the range [min, max] over ``L − 1`` steps, give or
   take ``span`` levels (iq4_nl tries both ends of its asymmetric levels). For each: the codes of
   round-to-nearest, the weighted least-squares (a, b) for those codes, (legacy types) rounding to
   the stored fp16, round-to-nearest again, its error. The least error wins; the plain choice
   without refit (gguf-py's ``quantize``) is scored too, so a block's error is never above
   ``gguf.quants.quantize``'s.
2. K-quants: the fp16 super-scale ``d`` (and ``dmin``) and the integer sub-scales (and mins) are
   searched on each sub-block's quadratic error model (exact while its codes stay put; each min
   absorbs what it can of its rounded step), over candidate super-scales; then polished on the
   weights themselves: every sub-scale/min ±1, ``d``/``dmin`` refitted by least squares over the
   super-block (kept where the error drops), ±1 again. The result is within a few percent of the
   error of unquantized float sub-scales (tests/quant/test_ggml.py bounds it at 10%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

_T = gguf.GGMLQuantizationType
_IQ4_NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_FP16_MAX = 65504.0
_BUDGET = 1 << 18  # elements per temporary in the candidate searches (they stay in cache)
_STEPS = 21  # candidate steps per sub-block; the middle one is llama.cpp's plain choice
_RATIOS = torch.linspace(0.65, 1.05, 9)  # K-quants: super-scale candidates, fractions of the extreme


@dataclass(frozen=True, eq=False)
class GGMLGrid:
    """One llama.cpp storage type (see the module docstring for the conventions)."""

    name: str  # "q4_k"
    qtype: gguf.GGMLQuantizationType
    block: int  # columns per stored block: 32 or 256
    sub: int  # columns sharing one effective (scale, offset)
    levels: torch.Tensor  # float32 (L,), ascending
    has_min: bool  # a stored offset per sub-block (q4_1, q5_1, q2_k, q4_k, q5_k)
    shift: float = 0.0  # symmetric types: b = -shift * a
    scale_range: tuple[int, int] | None = None  # K-quants: the integer sub-scales' range
    min_range: tuple[int, int] | None = None  # K-quants with mins: the integer sub-mins' range
    span: float = 1.0  # half width, in levels, of the step search around the extreme weight
    zero_code: int = 0  # the code written where a sub-block's step is 0 (its value is then b)
    lut: torch.Tensor | None = None  # non-uniform (integer) levels: nearest code of t, by ceil(2t)
    lut_levels: torch.Tensor | None = None  # the same table, holding the levels themselves

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(len(self.levels)))

    @property
    def uniform(self) -> bool:
        return self.lut is None

    @property
    def is_k(self) -> bool:
        return self.scale_range is not None

    @property
    def type_size(self) -> int:
        """Bytes per stored block."""
        return gguf.GGML_QUANT_SIZES[self.qtype][1]


def _make(name, block, sub, n_levels, has_min, *, values=None, shift=0, scale_range=None, min_range=None) -> GGMLGrid:
    levels = torch.arange(n_levels, dtype=torch.float32) if values is None else torch.tensor(values, dtype=torch.float32)
    reach = n_levels - 1 if has_min else float((levels - shift).abs().max())
    zero = int((levels - shift).abs().argmin()) if not has_min else 0
    lut = None if values is None else _nearest_table(values)
    return GGMLGrid(name, _T[name.upper()], block, sub, levels, has_min, float(shift), scale_range, min_range,
                    max(1.0, reach / 16), zero, None if lut is None else lut.float(), None if lut is None else levels[lut])


def _nearest_table(values) -> torch.Tensor:
    """For integer levels: the nearest level's index of every t, by c = ceil(2t) (the midpoints
    between levels are multiples of 1/2, so c decides; a tie goes to the lower level)."""
    mids2 = torch.tensor(values[1:]) + torch.tensor(values[:-1])  # 2 × midpoints
    c = torch.arange(2 * values[0], 2 * values[-1] + 1)
    return torch.bucketize(c, mids2)


GRIDS: dict[str, GGMLGrid] = {
    g.name: g
    for g in (
        _make("q4_0", 32, 32, 16, False, shift=8),
        _make("q4_1", 32, 32, 16, True),
        _make("q5_0", 32, 32, 32, False, shift=16),
        _make("q5_1", 32, 32, 32, True),
        _make("q8_0", 32, 32, 255, False, shift=127),
        _make("iq4_nl", 32, 32, 16, False, values=_IQ4_NL),
        _make("q2_k", 256, 16, 4, True, scale_range=(0, 15), min_range=(0, 15)),
        _make("q3_k", 256, 16, 8, False, shift=4, scale_range=(-32, 31)),
        _make("q4_k", 256, 32, 16, True, scale_range=(0, 63), min_range=(0, 63)),
        _make("q5_k", 256, 32, 32, True, scale_range=(0, 63), min_range=(0, 63)),
        _make("q6_k", 256, 16, 64, False, shift=32, scale_range=(-128, 127)),
    )
}


def grid(name: str) -> GGMLGrid:
    """The grid called ``name`` (case-insensitive: "q4_k", "Q4_K")."""
    g = GRIDS.get(str(name).lower())
    if g is None:
        raise ValueError(f"unknown GGML type {name!r}; known: {', '.join(GRIDS)}")
    return g


@dataclass
class GGMLParams:
    """The fitted, *stored* parameters of a (rows, n) weight.

    scale   float32 (rows, n // sub)   effective step ``a`` of each sub-block
    offset  float32 (rows, n // sub)   effective offset ``b``: value = a * levels[q] + b
    fields  the stored fields, as llama.cpp stores them: ``d`` (and ``m`` for q4_1/q5_1, ``dmin``
            for q2_k/q4_k/q5_k) float32 values exact in fp16, (rows, n // block); K-quants add the
            integer sub-scales ``scales`` (and ``mins``) int32 (rows, n // sub): q3_k's signed
            (the stored 6-bit field minus 32), q6_k's the stored int8.
    """

    grid: GGMLGrid
    scale: torch.Tensor
    offset: torch.Tensor
    fields: dict[str, torch.Tensor]
    _by_sub: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def sub_block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) (rows,) of sub-block ``i``, contiguous (transposed copies made once:
        GPTQ reads one per column)."""
        if self._by_sub is None:
            self._by_sub = (self.scale.T.contiguous(), self.offset.T.contiguous())
        return self._by_sub[0][i], self._by_sub[1][i]

    def columns(self, j0: int, j1: int) -> GGMLParams:
        """The params of columns [j0, j1) (both multiples of ``grid.block``)."""
        g = self.grid
        if j0 % g.block or j1 % g.block:
            raise ValueError(f"columns [{j0}, {j1}) do not start and end on {g.name} blocks of {g.block}")
        n = self.scale.shape[1] * g.sub

        def cut(t: torch.Tensor) -> torch.Tensor:
            unit = n // t.shape[1]
            return t[:, j0 // unit : j1 // unit]

        return GGMLParams(g, cut(self.scale), cut(self.offset), {k: cut(v) for k, v in self.fields.items()})


def params_from_fields(g: GGMLGrid, fields: dict[str, torch.Tensor]) -> GGMLParams:
    """Effective (scale, offset) from the stored fields, in float32 exactly as gguf computes them."""
    d = fields["d"].float()
    if g.is_k:
        per = g.block // g.sub
        a = d.repeat_interleave(per, 1) * fields["scales"].float()
        b = -(fields["dmin"].float().repeat_interleave(per, 1) * fields["mins"].float()) if g.has_min else -g.shift * a
    else:
        a = d.clone()
        b = fields["m"].float().clone() if g.has_min else -g.shift * a
    return GGMLParams(g, a, b, dict(fields))


# ---------------------------------------------------------------- rounding


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (saturating), kept as float32."""
    return t.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()


def _nearest(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: GGMLGrid, *, levels: bool = False) -> torch.Tensor:
    """Codes (float, indices into ``levels``) of the nearest level to ``x`` for steps ``a`` and
    offsets ``b`` broadcast against it; ``g.zero_code`` where ``a == 0`` (every code is then
    ``b``). ``levels=True``: the levels themselves (the same for the uniform types)."""
    zero = a == 0
    a = torch.where(zero, 1.0, a)
    t = (x - b) / a if g.has_min else x / a + g.shift
    if g.uniform:
        q = t.round_().clamp_(0, len(g.levels) - 1)
    else:
        table = (g.lut_levels if levels else g.lut).to(x.device)
        i = t.mul_(2).ceil_().sub_(2 * g.levels[0]).clamp_(0, len(table) - 1).int()
        q = torch.index_select(table, 0, i.view(-1)).view(i.shape)
    return torch.where(zero, float(g.levels[g.zero_code] if levels else g.zero_code), q)


def _level(q: torch.Tensor, g: GGMLGrid) -> torch.Tensor:
    return q if g.uniform else torch.index_select(g.levels.to(q.device), 0, q.int().view(-1)).view(q.shape)


def _value(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: GGMLGrid) -> torch.Tensor:
    """a * levels[q] + b, computed the way gguf's dequantizers do (symmetric: a * (level - shift))."""
    lv = _level(q, g)
    return a * lv + b if g.has_min else a * (lv - g.shift)


def _expand(p: GGMLParams, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sub = p.grid.sub
    if p.scale.shape[1] * sub != k:
        raise ValueError(f"{k} columns given params of {p.scale.shape[1]} sub-blocks of {sub}")
    return p.scale.repeat_interleave(sub, 1), p.offset.repeat_interleave(sub, 1)


def quantize(w: torch.Tensor, p: GGMLParams) -> torch.Tensor:
    """int32 (rows, k) codes: the nearest level of each weight given the fixed params ``p`` (whose
    scale has k // sub columns, e.g. ``p.columns(j0, j1)`` for ``w[:, j0:j1]``)."""
    a, b = _expand(p, w.shape[1])
    return _nearest(w.float(), a, b, p.grid).to(torch.int32)


def dequantize(q: torch.Tensor, p: GGMLParams) -> torch.Tensor:
    """float32 (rows, k): bit-identical to ``gguf.quants.dequantize(encode(q, p), qtype)``."""
    a, b = _expand(p, q.shape[1])
    return _value(q.float(), a, b, p.grid)


def quantize_column(wcol: torch.Tensor, p: GGMLParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column ``j`` of the weight (rows,) rounded on its sub-block's grid (sub-block ``j // sub``):
    ``(codes int32 (rows,), values float32 (rows,))`` (GPTQ's per-column step)."""
    g = p.grid
    a, b = p.sub_block(j // g.sub)
    q = _nearest(wcol.float(), a, b, g)
    return q.to(torch.int32), _value(q, a, b, g)


def rtn(w: torch.Tensor, g: GGMLGrid, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, GGMLParams]:
    """Round to nearest on fitted params: ``(codes int32 (rows, n), params)``."""
    p = fit_params(w, g, importance)
    return quantize(w, p), p


# ---------------------------------------------------------------- fitting: one sub-block


def _weighted_lsq(x, w, lv, a, b, g: GGMLGrid):
    """The (a, b) minimizing Σ w (a·level + b − x)² for fixed levels ``lv`` (C, N, k) of the
    sub-blocks ``x``, ``w`` (N, k); symmetric types fit ``a`` alone (b = −shift·a); K-quants keep
    a ≥ 0, b ≤ 0 (their mins are stored unsigned). Degenerate systems keep the given (a, b)."""
    if not g.has_min:
        v = lv - g.shift
        wv = w * v
        den = (wv * v).sum(-1)
        a2 = torch.where(den > 0, (wv * x).sum(-1) / den, a)
        return a2, -g.shift * a2
    wl = w * lv
    s0, s1, s2 = w.sum(-1), wl.sum(-1), (wl * lv).sum(-1)
    sx, sxl = (w * x).sum(-1), (wl * x).sum(-1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-5 * s0 * s2
    a2, b2 = (s0 * sxl - sx * s1) / det, (s2 * sx - s1 * sxl) / det
    if g.is_k:
        pos = b2 > 0
        a2, b2 = torch.where(pos, sxl / s2, a2).clamp(min=0), b2.clamp(max=0)
    return torch.where(ok, a2, a), torch.where(ok, b2, b)


def _error(x, w, a, b, g: GGMLGrid) -> torch.Tensor:
    """Σ w (ŵ − x)² per sub-block of round-to-nearest with (a, b) (C, N)."""
    a, b = a[..., None], b[..., None]
    lv = _nearest(x, a, b, g, levels=True)
    v = a * lv + b if g.has_min else a * (lv - g.shift)
    return (v - x).square_().mul_(w).sum(-1)


def _search(x, w, a0, b0, g: GGMLGrid, *, refit: bool, store=None):
    """Per sub-block of ``x``, ``w`` (N, k), the best of the candidate (a, b) ``a0``, ``b0``
    (C, N): each optionally refitted by least squares to its round-to-nearest codes, then passed
    through ``store`` (the storage rounding), then scored by the error of round-to-nearest.
    Returns (a, b, error, index of the winner) (N,); the first candidate wins ties.

    Computed a slice of sub-blocks at a time (about ``_BUDGET`` elements per temporary)."""
    C, N = a0.shape
    err, a_all, b_all = (torch.empty(C, N, device=x.device) for _ in range(3))
    step = max(1, _BUDGET // (C * x.shape[1]))
    for r0 in range(0, N, step):
        s = slice(r0, r0 + step)
        xc, wc, a, b = x[s], w[s], a0[:, s], b0[:, s]
        if refit:
            a, b = _weighted_lsq(xc, wc, _nearest(xc, a[..., None], b[..., None], g, levels=True), a, b, g)
        if store is not None:
            a, b = store(a, b)
        err[:, s], a_all[:, s], b_all[:, s] = _error(xc, wc, a, b, g), a, b
    i = err.argmin(0, keepdim=True)
    return a_all.gather(0, i)[0], b_all.gather(0, i)[0], err.gather(0, i)[0], i[0]


def _candidates(x: torch.Tensor, g: GGMLGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, N) candidate (a, b) for the sub-blocks ``x`` (N, k): the extreme weight on the end level
    ``± span`` levels (``make_qx_quants``) or the range [min, max] over ``L − 1 ± span`` steps
    (``make_qkx2_quants``; K-quants keep min ≤ 0). Candidate ``_STEPS // 2`` is exactly gguf's."""
    half = _STEPS // 2
    steps = torch.arange(-half, half + 1, dtype=torch.float32, device=x.device)[:, None] * (g.span / half)
    if g.has_min:
        lo, hi = x.min(1).values, x.max(1).values
        if g.is_k:
            lo = lo.clamp(max=0)
        a = (hi - lo) / (len(g.levels) - 1 + steps)
        return a, lo.expand_as(a)
    v = g.levels.to(x.device) - g.shift
    if v[0] == -v[-1]:  # q8_0: levels symmetric about 0, max |w| on the top one
        ext, ends = x.abs().max(1).values, [v[-1]]
    else:
        ext = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
        ends = [v[0]] if g.uniform else [v[0], v[-1]]
    a = torch.cat([ext / (e + e.sign() * steps) for e in ends])
    return a, -g.shift * a


def _fit_sub(x, w, g: GGMLGrid, store=None):
    """Stage 1: the best (a, b) (N,) per sub-block, and its error."""
    a0, b0 = _candidates(x, g)
    mid = _STEPS // 2
    a1, b1, e1, _ = _search(x, w, a0[mid : mid + 1], b0[mid : mid + 1], g, refit=False, store=store)
    a2, b2, e2, _ = _search(x, w, a0, b0, g, refit=True, store=store)
    better = e2 < e1
    return torch.where(better, a2, a1), torch.where(better, b2, b1), torch.where(better, e2, e1)


def _fit_legacy(x, w, g: GGMLGrid) -> dict[str, torch.Tensor]:
    def store(a, b):
        a = _fp16(a)
        return a, (_fp16(b) if g.has_min else -g.shift * a)

    a, b, _ = _fit_sub(x, w, g, store)
    return {"d": a, "m": b} if g.has_min else {"d": a}


# ---------------------------------------------------------------- fitting: K-quant super-blocks


def _by_slices(fn, n: int, step: int, *ts):
    """``fn`` on slices of ``step`` rows of the tensors ``ts`` (dim 0 of length ``n``), its
    outputs concatenated (bounds the memory of the (candidates × super-blocks) searches)."""
    outs = [fn(*(t[i : i + step] for t in ts)) for i in range(0, n, step)]
    return tuple(torch.cat(o) for o in zip(*outs, strict=True))


def _div_round(A: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, (A / d).round(), 0.0)


def _code_stats(x, w, a, b, g: GGMLGrid) -> torch.Tensor:
    """The quadratic error model of each sub-block at the codes of (a, b): moving to
    (a + Δa, b + Δb) adds h2·Δa² + 2·h1·Δa·Δb + h0·Δb² (columns h0, h1, h2: Σw, Σw·l, Σw·l²);
    symmetric types: h·Δa² with h = Σw·(l − shift)² (one column)."""
    lv = _nearest(x, a[:, None], b[:, None], g, levels=True)
    if not g.has_min:
        v = lv - g.shift
        return (w * v * v).sum(-1, keepdim=True)
    wl = w * lv
    return torch.stack([w.sum(-1), wl.sum(-1), (wl * lv).sum(-1)], -1)


def _k_affine(A, M, h, g: GGMLGrid):
    """Super-scales and integer sub-scales/mins for sub-block steps ``A`` and mins ``M`` (S, J)
    (b = −M) under the error model ``h`` (S, J, 3): every pair of candidate (d, dmin), the extreme
    step and min over ``_RATIOS`` of the top integer; each min is first moved by what best
    absorbs its rounded step (−h1/h0·Δa). Returns d (S,), sc (S, J), dmin (S,), m (S, J)."""
    smax, mmax = g.scale_range[1], g.min_range[1]
    h0, h1, h2 = h.unbind(-1)
    r = _RATIOS.to(A.device)[:, None, None]
    d = _fp16(A.amax(1, keepdim=True) / (smax * r))  # (R, S, 1)
    sc = _div_round(A, d).clamp(0, smax)  # (R, S, J)
    da = d * sc - A
    mt = (M + h1 / h0 * da).clamp(min=0)
    dmin = _fp16(mt.amax(-1, keepdim=True) / (mmax * r[..., None]))  # (R2, R, S, 1)
    m = _div_round(mt, dmin).clamp(0, mmax)  # (R2, R, S, J)
    dm = dmin * m - M
    proxy = (h2 * da * da - 2 * h1 * da * dm + h0 * dm * dm).sum(-1)  # (R2, R, S)
    R2, R, S = proxy.shape
    i = proxy.reshape(R2 * R, S).argmin(0)
    i2, i1, s_ = i // R, i % R, torch.arange(S, device=A.device)
    return d[i1, s_, 0], sc[i1, s_], dmin[i2, i1, s_, 0], m[i2, i1, s_]


def _k_symmetric(A, h, g: GGMLGrid):
    """Super-scale and signed integer sub-scales for the sub-block steps ``A`` (S, J) under the
    error model ``h`` (S, J, 1): the extreme step on either end integer over ``_RATIOS``, each
    also refitted by least squares; the best per super-block. Returns d (S,), sc (S, J)."""
    lo, hi = g.scale_range
    h = h[..., 0]
    r = _RATIOS.to(A.device)[:, None, None]
    ext = A.gather(1, A.abs().argmax(1, keepdim=True))  # (S, 1)
    d = _fp16(torch.cat([ext / (lo * r), ext / (hi * r)]))  # (C, S, 1)
    sc = _div_round(A, d).clamp(lo, hi)
    den = (h * sc * sc).sum(-1, keepdim=True)
    d2 = _fp16(torch.where(den > 0, (h * sc * A).sum(-1, keepdim=True) / den, d))
    d, sc = torch.cat([d, d2]), torch.cat([sc, _div_round(A, d2).clamp(lo, hi)])
    i = (h * (d * sc - A).square()).sum(-1).argmin(0)
    s_ = torch.arange(A.shape[0], device=A.device)
    return d[i, s_, 0], sc[i, s_]


def _k_effective(g: GGMLGrid, d, sc, dmin, m):
    """Effective (a, b) (..., S, J) of super-scales d (S,) and integer sub-scales sc (..., S, J)."""
    a = d[:, None] * sc
    return a, (-(dmin[:, None] * m) if g.has_min else -g.shift * a)


def _k_neighbours(x, w, g: GGMLGrid, d, sc, dmin, m):
    """Every sub-block's integer sub-scale (and min) moved by −1, 0, +1, scored on the weights
    themselves; the best kept (no move on ties). Symmetric types carry zero mins."""
    lo, hi = g.scale_range
    mlo, mhi = g.min_range or (0, 0)
    moves = [(i, j) for i in (0, -1, 1) for j in ((0, -1, 1) if g.has_min else (0,))]
    cs = torch.stack([(sc + i).clamp(lo, hi) for i, _ in moves])
    cm = torch.stack([(m + j).clamp(mlo, mhi) for _, j in moves])
    a0, b0 = _k_effective(g, d, cs, dmin, cm)
    C = len(moves)
    *_, i = _search(x, w, a0.reshape(C, -1), b0.reshape(C, -1), g, refit=False)
    return tuple(t.reshape(C, -1).gather(0, i[None])[0].view_as(sc) for t in (cs, cm))


def _k_lsq(x, w, d, sc, dmin, m, g: GGMLGrid):
    """Least-squares d (and dmin) of super-blocks x, w (S, block) for fixed integer sub-scales
    (and mins) (S, J) and the round-to-nearest codes of the current (d, dmin), rounded to fp16."""
    S, J = sc.shape
    a, b = _k_effective(g, d, sc, dmin, m)
    xs, ws = x.view(S, J, -1), w.view(S, J, -1)
    lv = _nearest(xs, a[..., None], b[..., None], g, levels=True)
    f1 = (sc[..., None] * (lv if g.has_min else lv - g.shift)).view(S, -1)
    xs, ws = xs.reshape(S, -1), ws.reshape(S, -1)
    s11, s1x = (ws * f1 * f1).sum(-1), (ws * f1 * xs).sum(-1)
    if not g.has_min:
        return _fp16(torch.where(s11 > 0, s1x / s11, d)), dmin
    f2 = -m[..., None].expand(S, J, g.sub).reshape(S, -1)
    s12, s22, s2x = (ws * f1 * f2).sum(-1), (ws * f2 * f2).sum(-1), (ws * f2 * xs).sum(-1)
    det = s11 * s22 - s12 * s12
    ok = det > 1e-5 * s11 * s22
    alone = (s22 == 0) & (s11 > 0)  # no mins in use: d alone
    d2 = torch.where(ok, (s22 * s1x - s12 * s2x) / det, torch.where(alone, s1x / s11, d))
    dmin2 = torch.where(ok, (s11 * s2x - s12 * s1x) / det, dmin)
    return _fp16(d2.clamp(min=0)), _fp16(dmin2.clamp(min=0))


def _k_error(x, w, g: GGMLGrid, d, sc, dmin, m) -> torch.Tensor:
    """Error of round-to-nearest per super-block (S,)."""
    a, b = _k_effective(g, d, sc, dmin, m)
    return _search(x, w, a.reshape(1, -1), b.reshape(1, -1), g, refit=False)[2].view(sc.shape).sum(-1)


def _k_rescale(x, w, g: GGMLGrid, d, sc, dmin, m):
    """d (and dmin) refitted by least squares over each super-block, kept where that lowers the
    error of round-to-nearest."""
    S = sc.shape[0]
    xs, ws = x.view(S, g.block), w.view(S, g.block)
    d2, dmin2 = _by_slices(lambda *t: _k_lsq(*t, g), S, max(1, _BUDGET // g.block), xs, ws, d, sc, dmin, m)
    keep = _k_error(x, w, g, d2, sc, dmin2, m) < _k_error(x, w, g, d, sc, dmin, m)
    return torch.where(keep, d2, d), torch.where(keep, dmin2, dmin)


def _fit_k(x, w, g: GGMLGrid) -> dict[str, torch.Tensor]:
    """Stage 1 per sub-block (float steps and mins), then the stored super-block fields."""
    a, b, _ = _fit_sub(x, w, g)
    J = g.block // g.sub
    S = a.numel() // J
    h = _by_slices(lambda *t: (_code_stats(*t, g),), a.numel(), max(1, _BUDGET // g.sub), x, w, a, b)[0]
    step = max(1, _BUDGET // (J * len(_RATIOS) ** 2))
    if g.has_min:
        d, sc, dmin, m = _by_slices(lambda *t: _k_affine(*t, g), S, step, a.view(S, J), (-b).view(S, J), h.view(S, J, 3))
    else:
        d, sc = _by_slices(lambda *t: _k_symmetric(*t, g), S, step, a.view(S, J), h.view(S, J, 1))
        dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
    sc, m = _k_neighbours(x, w, g, d, sc, dmin, m)
    d, dmin = _k_rescale(x, w, g, d, sc, dmin, m)
    sc, m = _k_neighbours(x, w, g, d, sc, dmin, m)
    fields = {"d": d, "scales": sc.to(torch.int32)}
    if g.has_min:
        fields |= {"dmin": dmin, "mins": m.to(torch.int32)}
    return fields


# ---------------------------------------------------------------- the public fit


def _importance(importance, w: torch.Tensor) -> torch.Tensor:
    """Per-element error weights (rows, n): ones, or the importance with a tiny floor (a fully
    weightless sub-block still gets finite parameters, fitted on the plain error)."""
    if importance is None:
        return torch.ones_like(w)
    imp = torch.as_tensor(importance).detach().to(w.device, torch.float32).expand(w.shape)
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and non-negative")
    mean = imp.mean()
    return torch.ones_like(w) if mean == 0 else imp + 1e-6 * mean


def fit_params(w: torch.Tensor, g: GGMLGrid, importance: torch.Tensor | None = None) -> GGMLParams:
    """Fitted stored parameters of ``w`` (rows, n) on grid ``g`` (n a multiple of ``g.block``),
    minimizing the ``importance``-weighted squared error of round-to-nearest (importance: None,
    (n,) or (rows, n), non-negative: e.g. the Hessian's diagonal, like llama.cpp's imatrix)."""
    w = w.detach().float()
    if w.dim() != 2 or w.shape[1] % g.block:
        raise ValueError(f"{g.name} stores rows in blocks of {g.block}; got a weight of shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds non-finite values")
    rows = w.shape[0]
    x = w.reshape(-1, g.sub)
    wt = _importance(importance, w).reshape(-1, g.sub)
    fields = _fit_k(x, wt, g) if g.is_k else _fit_legacy(x, wt, g)
    return params_from_fields(g, {k: v.reshape(rows, -1) for k, v in fields.items()})


# ---------------------------------------------------------------- GGUF bytes


def _pack(v: np.ndarray, nbits: int, width: int) -> np.ndarray:
    """Pack the (B, n) small integers ``v`` (< 2**nbits) into bytes the way ggml interleaves them:
    runs of ``8 // nbits`` consecutive groups of ``width`` values share ``width`` bytes, group k
    at bit ``nbits * k`` (element ``i·width·(8/nbits) + k·width + l`` → byte ``i·width + l``)."""
    B = v.shape[0]
    per = 8 // nbits
    v = v.reshape(B, -1, per, width) << (np.arange(per, dtype=np.uint8) * nbits)[:, None]
    return v.sum(axis=2, dtype=np.uint8).reshape(B, -1)


def _half(t: np.ndarray) -> np.ndarray:
    return t.astype("<f2").view(np.uint8)


def _scales_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """q4_k/q5_k: 8 six-bit scales and mins in 12 bytes (the low 4 of each in bytes 0-7, the top
    2 of scales/mins 4-7 in the top bits of bytes 0-3 and 4-7)."""
    lo = np.concatenate([sc[:, :4], mn[:, :4]], 1) | ((np.concatenate([sc[:, 4:], mn[:, 4:]], 1) >> 4) << 6)
    return np.concatenate([lo, (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], 1)


def _blocks_legacy(g: GGMLGrid, c: np.ndarray, f: dict[str, np.ndarray]) -> list[np.ndarray]:
    head = [_half(f["d"])] + ([_half(f["m"])] if g.has_min else [])
    if g.name == "q8_0":
        return head + [(c.astype(np.int16) - 127).astype(np.int8).view(np.uint8)]
    if g.bits == 5:  # q5_0, q5_1: the 5th bits as a little-endian uint32, then the nibbles
        head.append(np.packbits(c >> 4, axis=1, bitorder="little"))
    return head + [_pack(c & 15, 4, 16)]


def _blocks_k(g: GGMLGrid, c: np.ndarray, f: dict[str, np.ndarray]) -> list[np.ndarray]:
    d = _half(f["d"])
    sc = f["scales"]
    if g.name == "q2_k":
        return [sc.astype(np.uint8) | (f["mins"].astype(np.uint8) << 4), _pack(c, 2, 32), d, _half(f["dmin"])]
    if g.name == "q3_k":
        u = (sc + 32).astype(np.uint8)
        return [_pack(c >> 2, 1, 32), _pack(c & 3, 2, 32), _pack(u & 15, 4, 8), _pack(u >> 4, 2, 4), d]
    if g.name == "q6_k":
        return [_pack(c & 15, 4, 64), _pack(c >> 4, 2, 32), sc.astype(np.int8).view(np.uint8), d]
    head = [d, _half(f["dmin"]), _scales_6bit(sc.astype(np.uint8), f["mins"].astype(np.uint8))]
    if g.name == "q5_k":
        head.append(_pack(c >> 4, 1, 32))
    return head + [_pack(c & 15, 4, 32)]


def encode(q: torch.Tensor, p: GGMLParams) -> np.ndarray:
    """The GGUF tensor data of codes ``q`` (rows, n) on params ``p``: uint8
    (rows, n // block * type_size), row-major (GGUF row = weight row)."""
    g = p.grid
    rows, n = q.shape
    if n % g.block or p.scale.shape != (rows, n // g.sub):
        raise ValueError(f"codes {tuple(q.shape)} do not match {g.name} params of scale {tuple(p.scale.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= len(g.levels)):
        raise ValueError(f"{g.name} codes lie in [0, {len(g.levels) - 1}]")
    B = rows * (n // g.block)
    c = q.detach().cpu().numpy().astype(np.uint8).reshape(B, g.block)
    f = {k: v.detach().cpu().numpy().reshape(B, -1) for k, v in p.fields.items()}
    f = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int32)) for k, v in f.items()}
    parts = _blocks_k(g, c, f) if g.is_k else _blocks_legacy(g, c, f)
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == g.type_size, (g.name, out.shape)
    return out.reshape(rows, -1)
