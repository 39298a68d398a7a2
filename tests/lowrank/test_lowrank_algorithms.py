"""lowrank/svd.py and lowrank/allocate.py against slow, obvious references."""

import itertools

import pytest
import torch
from compress.lowrank.allocate import (
    BudgetError,
    LayerShape,
    parameters,
    sensitivity_ranks,
    uniform_ranks,
)
from compress.lowrank.svd import breakeven_rank, decompose, low_rank, whitening

from compress.errors import UsageError


def _correlated(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T  # strongly correlated channels
    X[:, 3] *= 30  # one outlier channel, as LLM activations have
    W = torch.randn(16, d, generator=g, dtype=torch.float64)
    return W, X


def _out_err(W, Wr, X):
    return float(((X @ (W - Wr).T) ** 2).sum())


def _optimum(W, X, r):
    """The least output error of any rank-r W' (independent of Cholesky): X = QR, so
    ‖X(W − W')ᵀ‖ = ‖R(W − W')ᵀ‖ and Eckart–Young on R·Wᵀ gives the optimum."""
    _, R = torch.linalg.qr(X)
    s = torch.linalg.svdvals(R @ W.T)
    return float((s[r:] ** 2).sum())


@pytest.mark.parametrize("r", [1, 4, 8, 15])
def test_whitened_truncation_is_the_output_optimum_and_beats_plain_svd(r):
    W, X = _correlated()
    H = X.T @ X
    B, A, rel = low_rank(W, r, "whitened", H=H, damp=1e-12)
    err = _out_err(W, (B.double() @ A.double()), X)
    opt = _optimum(W, X, r)
    assert err == pytest.approx(opt, rel=1e-4)  # float32 factors: 1e-4 of the optimum
    assert rel == pytest.approx(opt / float(((X @ W.T) ** 2).sum()), rel=1e-6)
    Bs, As, _ = low_rank(W, r, "svd")
    assert err < 0.9 * _out_err(W, Bs.double() @ As.double(), X)
    Ba, Aa, _ = low_rank(W, r, "asvd", absmean=X.abs().mean(0))
    assert err <= _out_err(W, Ba.double() @ Aa.double(), X) * (1 + 1e-4)


@pytest.mark.parametrize("method", ["whitened", "asvd", "svd"])
def test_component_gains_give_the_exact_output_error_at_every_rank(method):
    W, X = _correlated(seed=1)
    H = X.T @ X
    d = decompose(W, method, H=H, absmean=X.abs().mean(0), damp=1e-12)
    total = float(((X @ W.T) ** 2).sum())
    assert d.total == pytest.approx(total, rel=1e-6)
    for r in range(0, 17, 3):
        if r == 0:
            Wr = torch.zeros_like(W)
        else:
            B, A = d.factors(r)
            Wr = B.double() @ A.double()
        assert d.error(r) == pytest.approx(_out_err(W, Wr, X) / total, rel=1e-3, abs=1e-9)


def test_factors_are_balanced_and_full_rank_is_exact():
    W, X = _correlated(seed=2)
    d = decompose(W, "whitened", H=X.T @ X, damp=1e-12)
    B, A = d.factors(16)  # rank = min(out, in): nothing truncated
    torch.testing.assert_close(B.double() @ A.double(), W, rtol=1e-4, atol=1e-4)
    # the singular values are split evenly: column norms of B equal (whitened) row norms of A
    torch.testing.assert_close(B.norm(dim=0), d.sigma.float().sqrt())


def test_whitening_falls_back_to_eigh_and_refuses_empty_inputs():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.tensor([1e4, 1, 1, 1, 1, 1, 1, -50.0], dtype=torch.float64)) @ Q.T  # not PSD (round-off gone wild)
    S, unscale, info = whitening(H, damp=1e-6)
    assert info["whitening"] == "eigh"
    torch.testing.assert_close(unscale(S), torch.eye(8, dtype=torch.float64), atol=1e-8, rtol=0)  # S·S⁻¹ = I
    S, unscale, info = whitening(torch.eye(8) * 3, damp=0.01)
    assert info["whitening"] == "cholesky"
    with pytest.raises(UsageError, match=r"model.layers.3.mlp.up_proj: XᵀX of its calibration inputs is all zeros"):
        whitening(torch.zeros(8, 8), name="model.layers.3.mlp.up_proj")
    with pytest.raises(UsageError, match=r"up_proj: .*NaN"):
        whitening(torch.full((8, 8), float("nan")), name="up_proj")


def test_dead_input_channels_are_handled_by_damping():
    W, X = _correlated(seed=3)
    X[:, 5] = 0  # a channel that never fires: H is singular
    B, A, rel = low_rank(W, 6, "whitened", H=X.T @ X)
    assert torch.isfinite(B).all() and torch.isfinite(A).all() and 0 <= rel < 1
    B, A, _ = low_rank(W, 6, "asvd", absmean=X.abs().mean(0))
    assert torch.isfinite(A).all()


# ---------------------------------------------------------------- allocation


def _layers(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        i, o = [(64, 64), (64, 32), (64, 128), (128, 64)][k % 4]
        decay = 0.5 + torch.rand(1, generator=g).item() * 4  # some layers nearly low rank, some flat
        gains = torch.logspace(0, -decay, min(i, o), dtype=torch.float64) * (1 + torch.rand(1, generator=g).item() * 100)
        out.append(LayerShape(f"l{k}", i, o, gains, float(gains.sum())))
    return out


@pytest.mark.parametrize("reduction", [0.05, 0.2, 0.35, 0.6, 0.9])
@pytest.mark.parametrize("multiple", [1, 8])
def test_allocations_never_exceed_the_budget(reduction, multiple):
    layers = _layers()
    budget = (1 - reduction) * sum(L.dense for L in layers)
    if sum(multiple * L.unit for L in layers) > budget:  # not even one multiple per layer fits
        for allocate in (sensitivity_ranks, uniform_ranks):
            with pytest.raises(BudgetError, match=f"reduction {reduction:g} leaves fewer parameters"):
                allocate(layers, reduction, multiple)
        return
    for ranks in (sensitivity_ranks(layers, reduction, multiple), uniform_ranks(layers, reduction, multiple)):
        assert parameters(layers, ranks) <= budget
        for L in layers:
            r = ranks[L.name]
            assert r is None or (r % multiple == 0 and 1 <= r < breakeven_rank(L.in_features, L.out_features))


def test_sensitivity_allocation_is_the_greedy_optimum():
    """On small problems: no allocation under the budget has a lower total relative error than
    water-filling's by more than one component's worth (the greedy bound of a knapsack)."""
    layers = [LayerShape(f"l{k}", 8, 6, g, float(g.sum())) for k, g in enumerate([
        torch.tensor([9.0, 4, 2, 1, 0.5, 0.1]), torch.tensor([5.0, 5, 5, 5, 5, 5]), torch.tensor([20.0, 1, 0.1, 0.01, 0, 0])])]

    def err(ranks):
        return sum(0.0 if ranks[L.name] is None else float(L.gains[ranks[L.name]:].sum() / L.total) for L in layers)

    for reduction in (0.3, 0.5, 0.7):
        budget = (1 - reduction) * sum(L.dense for L in layers)
        ours = sensitivity_ranks(layers, reduction)
        best = min(err(dict(zip(["l0", "l1", "l2"], rs)))
                   for rs in itertools.product(*[[*range(1, 4), None]] * 3)
                   if parameters(layers, dict(zip(["l0", "l1", "l2"], rs))) <= budget)
        slack = max(float(L.gains.max() / L.total) for L in layers)
        assert err(ours) <= best + slack
    # the nearly rank-1 layer keeps one component; the budget goes where components are worth more
    ranks = sensitivity_ranks(layers, 0.5)
    assert ranks["l2"] == 1 < ranks["l0"]


def test_uniform_gives_every_layer_the_same_share():
    layers = _layers(n=4)
    ranks = uniform_ranks(layers, 0.25)
    for L in layers:
        assert ranks[L.name] == int(0.75 * L.dense / L.unit)


@pytest.mark.parametrize("r", [2, 5, 9])
def test_original_objective_is_the_optimum_towards_the_original_outputs(r):
    """With C = XᵀX̂ the factors minimise ‖XWᵀ − X̂(BA)ᵀ‖² (X the original inputs, X̂ what the
    compressed model feeds the layer): against the oracle through the QR of X̂."""
    W, X = _correlated(seed=4)
    g = torch.Generator().manual_seed(5)
    Xh = X + 0.2 * X.std() * torch.randn(X.shape, generator=g, dtype=torch.float64) + 0.1 * X[:, [3]]  # drifted inputs
    d = decompose(W, "whitened", H=Xh.T @ Xh, damp=1e-12, C=X.T @ Xh)
    B, A = d.factors(r)
    err = float(((X @ W.T - Xh @ (B.double() @ A.double()).T) ** 2).sum())
    Q, _ = torch.linalg.qr(Xh)
    T = Q.T @ X @ W.T  # the part of XWᵀ any X̂W'ᵀ can reach, in Q's coordinates
    best = float((X @ W.T).pow(2).sum() - T.pow(2).sum() + torch.linalg.svdvals(T)[r:].pow(2).sum())
    assert err == pytest.approx(best, rel=1e-4)
    d0 = decompose(W, "whitened", H=Xh.T @ Xh, damp=1e-12)  # fits W on X̂ instead
    B0, A0 = d0.factors(r)
    assert err < float(((X @ W.T - Xh @ (B0.double() @ A0.double()).T) ** 2).sum())
