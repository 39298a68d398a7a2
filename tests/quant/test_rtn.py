import pytest
import torch
from compress.quant.rtn import QuantScheme, dequantize, fit_qparams, rtn_quantize


def _slow_rtn(W, bits, g, sym):
    """Element by element: the obvious min-max round-to-nearest, in float64."""
    out_f, in_f = W.shape
    g = in_f if g == -1 else g
    maxq = 2**bits - 1
    Wq = torch.empty_like(W, dtype=torch.float64)
    for r in range(out_f):
        for c0 in range(0, in_f, g):
            x = W[r, c0 : c0 + g].double()
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            if sym:
                amax = max(-lo, hi)
                s = float(torch.tensor(amax / (maxq / 2)).to(torch.bfloat16).float())
                z = (maxq + 1) // 2
            else:
                s = float(torch.tensor((hi - lo) / maxq).to(torch.bfloat16).float())
                z = min(max(round(-lo / s), 0), maxq)
            for c in range(c0, c0 + g):
                q = min(max(round(W[r, c].item() / s) + z, 0), maxq)
                Wq[r, c] = (q - z) * s
    return Wq


@pytest.mark.parametrize("bits,g,sym", [(4, 8, True), (4, 8, False), (3, -1, False), (8, 16, True), (2, 4, False)])
def test_rtn_matches_elementwise_reference(bits, g, sym):
    torch.manual_seed(0)
    W = torch.randn(5, 32)
    res = rtn_quantize(W, QuantScheme(bits=bits, group_size=g, symmetric=sym, observer="minmax"))
    torch.testing.assert_close(res.dequantize().double(), _slow_rtn(W, bits, g, sym), rtol=0, atol=1e-6)
    assert res.q.min() >= 0 and res.q.max() <= 2**bits - 1
    if sym:
        assert (res.zero == 2 ** (bits - 1)).all()


def test_scales_are_exact_in_storage_dtype():
    W = torch.randn(16, 64)
    for dt in (torch.bfloat16, torch.float16):
        res = rtn_quantize(W, QuantScheme(group_size=32, scale_dtype=dt))
        assert torch.equal(res.scale, res.scale.to(dt).float())


def test_mse_observer_never_worse_than_minmax():
    torch.manual_seed(1)
    W = torch.randn(64, 256) * torch.rand(1, 256) ** 4  # heavy-tailed columns
    W[3, 7] = 12.0  # an outlier
    for sym in (True, False):
        e = {}
        for obs in ("minmax", "mse"):
            res = rtn_quantize(W, QuantScheme(bits=4, group_size=64, symmetric=sym, observer=obs))
            e[obs] = (res.dequantize() - W).abs().pow(2.4).sum().item()
        assert e["mse"] < e["minmax"]


def test_fit_qparams_rejects_unknown_observer():
    with pytest.raises(ValueError, match="observer"):
        fit_qparams(torch.randn(2, 4), QuantScheme(observer="magic"))


def test_bad_group_size():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(4, 576), QuantScheme(group_size=128))


def test_dequantize_with_permuted_gidx():
    q = torch.tensor([[0, 15, 8, 3]], dtype=torch.int32)
    scale = torch.tensor([[1.0, 2.0]])
    zero = torch.tensor([[8, 0]], dtype=torch.int32)
    g_idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    assert dequantize(q, scale, zero, g_idx).tolist() == [[0.0, 7.0, 0.0, 6.0]]


def test_clip_search_in_row_slices_equals_the_whole_tensor_search():
    """_best_ratio computes its errors a slice of rows at a time: the same ratios, bit for bit,
    as the plain (P, rows, k) computation with fake_quantize."""
    from compress.quant.rtn import _best_ratio, fake_quantize, minmax_params

    torch.manual_seed(0)
    w = torch.randn(37, 48) * torch.rand(37, 1)
    sch = QuantScheme(bits=4, group_size=-1, symmetric=False, observer="mse")
    xmin, xmax = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    p = 1 - torch.arange(0, 64, 4, dtype=torch.float32)[:, None] / 80
    s, z = minmax_params(p * xmin, p * xmax, sch)
    err = (fake_quantize(w, s[..., None], z[..., None], sch.maxq) - w).abs().pow(sch.mse_norm).sum(-1)
    ref = p.expand_as(err).gather(0, err.argmin(0, keepdim=True))[0]
    for budget in (1, 500, 1 << 18):  # one row per slice, a few rows, all rows at once
        assert torch.equal(_best_ratio(w, xmin, xmax, p, sch, budget=budget), ref)
