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


def test_original_target_is_the_least_squares_fit_to_the_original_outputs():
    """original_target(W, H, C) = argmin_V ‖XWᵀ − X̂Vᵀ‖ (lstsq on the data, damping → 0)."""
    from compress.quant.gptq import original_target

    X = _calib(1024, 24, seed=3).double()
    X_hat = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    W = torch.randn(10, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.linalg.lstsq(X_hat, X @ W.T).solution.T
    got = original_target(W, X_hat.T @ X_hat, X.T @ X_hat, damp=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    same = original_target(W, X_hat.T @ X_hat, X_hat.T @ X_hat, damp=0.01)  # C = H: W itself
    torch.testing.assert_close(same, W, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits", [3, 4])
def test_original_objective_gets_closer_to_the_original_outputs(bits):
    """GPTQ with C (the original model's inputs X against the compressed model's X̂) lands nearer
    the original outputs XWᵀ than GPTQ on X̂ alone, on the same data."""
    X = _calib(2048, 64, seed=6)
    X_hat = X + 0.25 * X.std() * torch.randn(X.shape, generator=torch.Generator().manual_seed(7))
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(8))
    scheme = QuantScheme(bits=bits, group_size=16, symmetric=True)
    H, C = X_hat.T @ X_hat, X.T @ X_hat
    plain = gptq_quantize(W, H, scheme, act_order=True, static_groups=True).dequantize()
    orig = gptq_quantize(W, H, scheme, act_order=True, static_groups=True, C=C).dequantize()

    def err(Wq):
        return ((X @ W.T - X_hat @ Wq.T) ** 2).sum().item()

    assert err(orig) < 0.9 * err(plain)


def test_cli_objective_original_runs_end_to_end_and_bad_values_exit_2(tmp_path):
    """`compress quantize --objective original` puts `objective: original` in the gptq pass (the
    engine then runs the original block beside the compressed one for the paired statistic) and
    exports; an unknown objective is exit 2 naming the field, before any work."""
    import json

    from conftest import save_tiny
    from typer.testing import CliRunner

    from compress.cli import app

    tiny = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "out"
    args = ["quantize", str(tiny), "-o", str(out), "--bits", "3", "--group-size", "16", "--samples", "4", "--seq-len", "32", "--no-eval"]
    r = CliRunner().invoke(app, [*args, "--objective", "original"])
    assert r.exit_code == 0, r.output
    assert "objective: original" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "report.json").read_text())["export"]["bits_per_parameter"] > 0
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, [*args[:3], str(plain), *args[4:]]).exit_code == 0
    from safetensors.torch import load_file

    a, b = (load_file(next(iter(sorted(d.glob("*.safetensors"))))) for d in (out, plain))
    codes = [k for k in a if k.endswith("weight_packed")]
    # the first block's inputs are the same in both models; later blocks fit the original outputs
    assert codes and any(not torch.equal(a[k], b[k]) for k in codes)
    bad = tmp_path / "bad"
    r = CliRunner().invoke(app, [*args[:3], str(bad), *args[4:], "--objective", "teacher"])
    assert r.exit_code == 2 and "objective" in r.output and not bad.exists(), r.output


def test_outliers_keep_the_worst_rounded_weights_and_lower_the_error():
    """gptq_quantize(outliers=k): per column exactly k distinct rows kept at their (bf16) values,
    the rest on the grid; the output error falls below plain GPTQ's on the same data."""
    X = _calib(2048, 64, seed=9)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(10))
    W[3, 7] = 12.0  # a large weight the group's grid clips
    scheme = QuantScheme(bits=3, group_size=16, symmetric=True)
    plain = gptq_quantize(W, X.T @ X, scheme, act_order=True, static_groups=True)
    res = gptq_quantize(W, X.T @ X, scheme, act_order=True, static_groups=True, outliers=2)
    rows, vals = res.outliers
    assert rows.shape == vals.shape == (64, 2) and all(len(set(r.tolist())) == 2 for r in rows)
    assert torch.equal(vals, vals.to(torch.bfloat16).float()) and 3 in rows[7].tolist()
    Wq = res.dequantize().clone()
    Wq[rows, torch.arange(64)[:, None].expand(-1, 2)] = vals
    assert _out_err(X, W, Wq) < 0.8 * _out_err(X, W, plain.dequantize())
    with pytest.raises(ValueError, match="outliers and a pruning mask"):
        gptq_quantize(W, X.T @ X, scheme, outliers=1, mask=torch.ones_like(W, dtype=torch.bool))


def test_outlier_layer_dequantizes_to_the_codes_with_the_outliers_in_place():
    from compress.quant.outliers_module import OutlierQuantLinear

    X = _calib(512, 32, seed=11)
    W = torch.randn(20, 32, generator=torch.Generator().manual_seed(12))
    res = gptq_quantize(W, X.T @ X, QuantScheme(bits=4, group_size=16, symmetric=False), outliers=3)
    m = OutlierQuantLinear.from_outliers(res, torch.randn(20), torch.bfloat16, torch.bfloat16)
    want = res.dequantize().clone()
    rows, vals = res.outliers
    for j in range(32):  # the slow, obvious overwrite
        for i in range(3):
            want[rows[j, i], j] = vals[j, i]
    assert torch.equal(m.dequantize(), want) and m.weight_outlier_rows.dtype == torch.int16
    assert m.quant_spec() is None and "compress.load reads them" in OutlierQuantLinear.refusal({}, "vLLM")
    x = torch.randn(5, 32)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, want, m.bias.float()), rtol=1e-5, atol=1e-5)
