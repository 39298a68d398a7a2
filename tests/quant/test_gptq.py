import pytest
import torch
from compress.quant.gptq import gptq_quantize
from compress.quant.rtn import QuantScheme, fake_quantize, fit_qparams, rtn_quantize


def _calib(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel scales, like real activations
    A = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ A) * (torch.rand(d, generator=g) * 3 + 0.1)


def _out_err(X, W, Wq):
    return ((X @ (Wq - W).T) ** 2).sum().item() / ((X @ W.T) ** 2).sum().item()


def _exact_sequential(W, X, scheme):
    """The slow, obvious solution GPTQ computes: fix column j by rounding, then re-solve the
    remaining columns' least-squares problem exactly (normal equations on the calibration data),
    column after column. One scale per row, fitted on the original weights."""
    W = W.double().clone()
    X = X.double()
    Y = X @ W.T  # target outputs
    scale, zero = fit_qparams(W.float(), scheme)
    s, z = scale.double()[:, None], zero.double()[:, None]
    d = W.shape[1]
    for j in range(d):
        W[:, j : j + 1] = fake_quantize(W[:, j : j + 1], s, z, scheme.maxq)
        if j + 1 < d:
            R = X[:, j + 1 :]
            resid = Y - X[:, : j + 1] @ W[:, : j + 1].T
            W[:, j + 1 :] = torch.linalg.lstsq(R, resid).solution.T
    return W


def test_gptq_equals_exact_columnwise_solution():
    torch.manual_seed(0)
    X = _calib(512, 12)
    W = torch.randn(6, 12)
    scheme = QuantScheme(bits=3, group_size=-1, symmetric=False, observer="minmax", scale_dtype=torch.float32)
    res = gptq_quantize(W, X.T @ X, scheme, damp=1e-9, blocksize=5)  # odd block: crosses blocks
    ref = _exact_sequential(W, X, scheme)
    torch.testing.assert_close(res.dequantize().double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_gptq_beats_rtn_on_output_error(sym, act_order, group_size):
    X = _calib(2048, 64, seed=1)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=sym)
    rtn = rtn_quantize(W, scheme).dequantize()
    res = gptq_quantize(W, X.T @ X, scheme, act_order=act_order, blocksize=32)
    assert _out_err(X, W, res.dequantize()) < 0.8 * _out_err(X, W, rtn)
    assert res.q.min() >= 0 and res.q.max() <= 15


def test_act_order_gidx_is_a_grouping_of_columns():
    X = _calib(1024, 64, seed=3)
    W = torch.randn(8, 64)
    res = gptq_quantize(W, X.T @ X, QuantScheme(group_size=16), act_order=True)
    counts = torch.bincount(res.g_idx.long())
    assert counts.tolist() == [16, 16, 16, 16]
    assert not torch.equal(res.g_idx, torch.arange(64, dtype=torch.int32) // 16)  # really permuted
    # the grid: each dequantized value sits on its own group's grid
    Wq = res.dequantize()
    s = res.scale[:, res.g_idx.long()]
    assert torch.allclose(Wq / s, torch.round(Wq / s), atol=1e-4)


def test_dead_inputs_and_singular_hessian_escalate_damping():
    X = _calib(256, 32, seed=4)
    X[:, 5] = 0  # a dead input channel
    X[:, 7] = X[:, 6]  # collinear inputs: singular H
    W = torch.randn(4, 32)
    with pytest.warns(UserWarning, match="layer.q"):
        res = gptq_quantize(W, X.T @ X, QuantScheme(group_size=8), damp=0.0, name="layer.q")
    assert res.info["damp"] > 0
    assert torch.isfinite(res.dequantize()).all()
    assert (res.dequantize()[:, 5] == 0).all()


def test_static_groups_keep_natural_grouping_and_beat_rtn():
    X = _calib(2048, 64, seed=5)
    W = torch.randn(16, 64)
    scheme = QuantScheme(bits=4, group_size=16)
    res = gptq_quantize(W, X.T @ X, scheme, act_order=True, static_groups=True)
    assert not res.act_order  # no g_idx to export
    assert torch.equal(res.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    # the static scales are exactly those fitted on the original weights
    for g in range(4):
        s, _ = fit_qparams(W[:, g * 16 : (g + 1) * 16], scheme)
        assert torch.equal(res.scale[:, g], s)
    rtn = rtn_quantize(W, scheme).dequantize()
    assert _out_err(X, W, res.dequantize()) < 0.8 * _out_err(X, W, rtn)
