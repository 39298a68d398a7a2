"""lowrank/allocate.py's greedy allocation over error curves, the probed (block-unit) curves, and
lowrank/losparse.py (W ≈ B·A + S) against slow, obvious references."""

import itertools
import math

import pytest
import torch
from compress.lowrank.allocate import (
    BudgetError,
    LayerShape,
    error_curve,
    parameters,
    probe_ranks,
    probed_errors,
    sensitivity_ranks,
    uniform_ranks,
)
from compress.lowrank.losparse import losparse, output_error, sparse_fit
from compress.lowrank.module import LoSparseLinear
from compress.lowrank.svd import decompose


def _spectra(n=12, seed=0, extra=0.0):
    """Layers of several shapes with known, decaying whitened spectra (gains = σ²)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        i, o = [(64, 64), (64, 32), (64, 128), (128, 64), (96, 96)][k % 5]
        decay = 0.3 + torch.rand(1, generator=g).item() * 4
        gains = torch.logspace(0, -decay, min(i, o), dtype=torch.float64) * (1 + torch.rand(1, generator=g).item() * 100)
        out.append(LayerShape(f"l{k}", i, o, gains, float(gains.sum()), extra=round(extra * i * o)))
    return out


def _total(layers, ranks):
    return sum(0.0 if ranks[L.name] is None else float(error_curve(L)[ranks[L.name]]) for L in layers)


@pytest.mark.parametrize("extra", [0.0, 0.05])
@pytest.mark.parametrize("reduction", [0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("multiple", [1, 8])
def test_greedy_stays_within_the_budget_and_beats_uniform(extra, reduction, multiple):
    layers = _spectra(extra=extra)
    budget = (1 - reduction) * sum(L.dense for L in layers)
    if sum(min(L.dense, multiple * L.unit + L.extra) for L in layers) > budget:  # not even one multiple per layer fits
        with pytest.raises(BudgetError):
            sensitivity_ranks(layers, reduction, multiple)
        return
    try:
        uni = uniform_ranks(layers, reduction, multiple)
    except BudgetError:
        uni = None
    ours = sensitivity_ranks(layers, reduction, multiple)
    assert parameters(layers, ours) <= budget
    for L in layers:  # the sparse residual's nonzeros count: a factored layer costs r·(in + out) + extra
        r = ours[L.name]
        assert r is None or (r % multiple == 0 and r * L.unit + L.extra < L.dense)
    if uni is not None:
        assert _total(layers, ours) <= _total(layers, uni) + 1e-12
    # the budget is spent: nothing one more multiple of any layer costs is left over
    left = budget - parameters(layers, ours)
    assert all(ours[L.name] is None or left < multiple * L.unit or (ours[L.name] + multiple) * L.unit + L.extra >= L.dense
               for L in layers)


def test_greedy_is_the_brute_force_optimum_on_convex_curves_with_equal_steps():
    """8×8 layers: each rank costs 16 and going dense from rank 3 costs 16 more, so on convex
    error curves the greedy is exactly optimal; brute force over every allocation agrees."""
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        layers = []
        for k in range(4):
            gains = torch.rand(4, generator=g, dtype=torch.float64).sort(descending=True).values  # the last: what dense adds
            e = torch.cat([gains.flip(0).cumsum(0).flip(0), torch.zeros(5, dtype=torch.float64)])  # e(r) = Σ_{i≥r}, convex
            layers.append(LayerShape(f"l{k}", 8, 8, errors=e))
        for reduction in (0.3, 0.45, 0.6, 0.7):
            budget = (1 - reduction) * sum(L.dense for L in layers)
            best = min(_total(layers, dict(zip([L.name for L in layers], rs)))
                       for rs in itertools.product(*[[1, 2, 3, None]] * 4)
                       if parameters(layers, dict(zip([L.name for L in layers], rs))) <= budget)
            ours = sensitivity_ranks(layers, reduction)
            assert _total(layers, ours) == pytest.approx(best, abs=1e-12), (trial, reduction)


def test_greedy_on_uneven_costs_is_within_one_step_of_the_brute_force_optimum():
    layers = _spectra(n=3, seed=5)
    layers = [LayerShape(L.name, L.in_features // 8, L.out_features // 8, L.gains[: min(L.in_features, L.out_features) // 8], None)
              for L in layers]
    names = [L.name for L in layers]
    options = [[*range(1, min(L.in_features, L.out_features) + 1), None] for L in layers]
    for reduction in (0.2, 0.4, 0.6):
        budget = (1 - reduction) * sum(L.dense for L in layers)
        best = min(_total(layers, dict(zip(names, rs))) for rs in itertools.product(*options)
                   if parameters(layers, dict(zip(names, rs))) <= budget)
        ours = _total(layers, sensitivity_ranks(layers, reduction))
        step = max(float(error_curve(L)[0] - error_curve(L)[1]) for L in layers)
        assert best <= ours <= best + step


def test_probed_errors_follow_the_measured_shares():
    tail = torch.logspace(2, -3, 33, dtype=torch.float64)  # a layer's own error at rank 0..32
    # one probe: the same share at every rank (the linearization of one probe)
    one = probed_errors(tail, [(8, 0.5)], scale=2.0)
    torch.testing.assert_close(one, tail * 0.25)
    # shares that follow a power law of the error, share = c·e^q: recovered exactly between the
    # probes and beyond the lowest rank probed (q in [0, 1])
    c, q = 0.3, 0.4
    probes = [(r, c * float(tail[r]) ** q) for r in (4, 8, 16)]
    got = probed_errors(tail, probes)
    torch.testing.assert_close(got[:17], c * tail[:17] ** (1 + q))
    torch.testing.assert_close(got[17:], c * float(tail[16]) ** q * tail[17:])  # above the top probe: its share
    # a share that falls as the error grows does not extrapolate below the probes (clamped at q = 0)
    falling = probed_errors(tail, [(8, 0.5), (16, 0.9)])
    torch.testing.assert_close(falling[:8], 0.5 * tail[:8])
    assert bool((falling[1:] <= falling[:-1]).all())  # never more error at a higher rank


def test_probe_ranks_bracket_the_uniform_rank():
    L = LayerShape("l", 576, 1536)
    ranks = probe_ranks(L, 0.3, 8)
    assert len(ranks) == 3 and all(r % 8 == 0 for r in ranks)
    assert ranks[0] < 0.7 * L.dense / L.unit < ranks[2] < L.dense / L.unit
    assert probe_ranks(L, 0.3, 8, count=1) == [ranks[1]]


# ---------------------------------------------------------------- LoSparse


def _layer(seed=0, n=600, d=32, out=24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    X[:, 2] *= 10
    W = torch.randn(out, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    W += (torch.rand(out, d, generator=g) < 0.04) * torch.randn(out, d, generator=g, dtype=torch.float64) * 3  # outliers
    return W, X


def test_column_sparse_fit_is_the_least_squares_optimum_on_its_columns():
    W, X = _layer(seed=1)
    H = X.T @ X
    S = sparse_fit(W, H, nonzeros=5 * W.shape[0] + 3, pattern="column", damp=1e-12)
    J = (S != 0).any(0).nonzero().flatten()
    assert len(J) == 5 and int((S != 0).sum()) <= 5 * W.shape[0] + 3
    # slow reference: least squares of X·Wᵀ on the kept input columns of X
    ref = torch.linalg.lstsq(X[:, J], X @ W.T).solution.T  # (out, |J|)
    torch.testing.assert_close(S[:, J], ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured", "column"])
def test_losparse_beats_lowrank_alone_at_the_same_parameter_count(pattern):
    W, X = _layer()
    H = X.T @ X
    out_f, in_f = W.shape
    budget = 10 * (in_f + out_f)  # low-rank alone: rank 10
    nonzeros = 2 * (in_f + out_f)  # LoSparse: rank 8 + 112 nonzeros, the same count
    B, A, S, info = losparse(W, H, 8, nonzeros, pattern, damp=1e-6)
    assert 8 * (in_f + out_f) + int((S != 0).sum()) <= budget and info["sparse_nonzeros"] == int((S != 0).sum())
    d = decompose(W, "whitened", H, damp=1e-6)
    (Bl, Al), (B8, A8) = d.factors(10), d.factors(8)
    lowrank_only = output_error(W - Bl.double() @ Al.double(), H)
    ours = output_error(W - B.double() @ A.double() - S.double(), H)
    assert ours < output_error(W - B8.double() @ A8.double(), H)  # the residual never hurts
    if pattern == "unstructured":  # the default: better than spending the nonzeros on rank
        assert ours < lowrank_only
    assert info["error"] == pytest.approx(ours / output_error(W, H), rel=1e-4)
    # the obvious reference: the same error measured on the inputs themselves
    assert ours == pytest.approx(float(((X @ (W - B.double() @ A.double() - S.double()).T) ** 2).sum()), rel=1e-6)


def test_losparse_module_computes_ba_plus_s():
    W, X = _layer(seed=2)
    B, A, S, _ = losparse(W, X.T @ X, 6, 100)
    bias = torch.randn(W.shape[0])
    m = LoSparseLinear.from_parts(B, A, S, bias)
    x = torch.randn(5, W.shape[1])
    torch.testing.assert_close(m(x), x @ (B @ A + S).T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.merged()(x), m(x), rtol=1e-5, atol=1e-5)
    assert m.parameters_kept == 6 * sum(W.shape) + int((S != 0).sum())
    assert not m.S.requires_grad and m.A.weight.requires_grad
    assert math.isclose(float((m.dense_weight() - (B @ A + S)).abs().max()), 0.0, abs_tol=1e-6)


def test_typical_energy_leaves_massive_activation_tokens_out():
    from types import SimpleNamespace

    from compress.lowrank.passes import typical_energy

    from compress.engine.dist import World

    y = torch.ones(2, 8, 4)  # (batch, tokens, hidden): every token's ‖y_t‖² = 4
    probe = SimpleNamespace(y=y.clone(), world=World())
    assert typical_energy(probe) == pytest.approx(64.0)
    probe.y[:, 0] = 100.0  # the first token of each window carries a massive activation
    assert typical_energy(probe) == pytest.approx(64.0)  # the total would be 80,000 + 56
