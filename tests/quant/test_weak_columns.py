"""GPTQ with OWQ's weak columns (``gptq: {weak_columns: k}``): the k input columns of largest
sensitivity ``H_jj · ‖ΔW_j‖²`` kept whole in bf16 beside the codes, visited last so they absorb
the other columns' rounding error; stored in ``OutlierQuantLinear``, reloaded by compress.load,
refused by every other runtime, bad values refused before any work."""

import json

import pytest
import torch
from compress.quant.gptq import gptq_quantize, weak_column_scores
from compress.quant.outliers_module import OutlierQuantLinear
from compress.quant.rtn import QuantScheme, fit_qparams, rtn_quantize
from conftest import compressed_in_memory, save_tiny

from compress.errors import UsageError

OUTLIER_CHANNELS = [3, 17, 40, 41]


def _planted(n=2048, d=64, out=32, seed=0):
    """Correlated inputs with a few outlier channels (as LLM activations have), and a weight."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    X = torch.randn(n, d, generator=g) @ A
    X[:, OUTLIER_CHANNELS] *= 25
    return X, torch.randn(out, d, generator=g)


def _out_err(X, W, Wq):
    return ((X @ (Wq - W).T) ** 2).sum().item() / ((X @ W.T) ** 2).sum().item()


def _slow_scores(W, H, scheme):
    """OWQ's λ_j ‖ΔW_{:,j}‖², one column at a time."""
    dW = W - rtn_quantize(W, scheme).dequantize()
    return torch.tensor([float(H[j, j]) * sum(float(dW[i, j]) ** 2 for i in range(W.shape[0])) for j in range(W.shape[1])])


@pytest.mark.parametrize("act_order,static", [(True, True), (False, True), (True, False), (False, False)])
def test_the_kept_columns_are_the_top_k_by_owq_sensitivity(act_order, static):
    X, W = _planted()
    H = X.T @ X
    scheme = QuantScheme(bits=3, group_size=16, symmetric=True)
    res = gptq_quantize(W, H, scheme, act_order=act_order, static_groups=static, weak_columns=6)
    slow = _slow_scores(W, H, scheme)
    torch.testing.assert_close(weak_column_scores(W, H, scheme), slow.float(), rtol=1e-4, atol=0)
    cols, vals = res.weak
    assert cols.tolist() == sorted(torch.topk(slow, 6).indices.tolist())
    assert set(OUTLIER_CHANNELS) <= set(cols.tolist()) and vals.shape == (32, 6)
    # g_idx only where the groups follow the visiting order (the weak columns moved last)
    assert res.act_order == (not static)


def test_weak_columns_are_stored_bit_exactly():
    """Uncorrelated inputs (diagonal H): no error reaches another column, so a weak column is kept
    exactly as it was, in bf16; its codes are the zero point (the packed part is 0 there), and the
    module's dequantized weight holds the stored values bit for bit."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 48, generator=g)
    d = torch.rand(48, generator=g) + 0.1
    d[[5, 30]] = 400.0
    H = torch.diag(d)
    res = gptq_quantize(W, H, QuantScheme(bits=4, group_size=16, symmetric=False), act_order=True, static_groups=True, weak_columns=3)
    cols, vals = res.weak
    assert {5, 30} <= set(cols.tolist())
    assert torch.equal(vals, W[:, cols].to(torch.bfloat16).float())
    m = OutlierQuantLinear.from_outliers(res, None, None, torch.bfloat16)
    assert torch.equal(m.weight_weak_values, vals.to(torch.bfloat16)) and torch.equal(m.weight_weak_columns.long(), cols)
    assert m.weight_weak_columns.dtype == torch.int16 and not hasattr(m, "weight_outlier_rows")
    assert torch.equal(m.dequantize()[:, cols], vals)
    assert torch.equal(res.dequantize()[:, cols], torch.zeros(24, 3))  # codes = zero point
    # with a pruning mask, the pruned weights of a weak column stay zero
    mask = torch.rand(24, 48, generator=g) > 0.5
    pruned = gptq_quantize(W * mask, H, QuantScheme(bits=4, group_size=16), weak_columns=3, mask=mask)
    assert torch.equal(pruned.weak[1], (W * mask)[:, pruned.weak[0]].to(torch.bfloat16).float())


@pytest.mark.parametrize("static", [True, False])
def test_weak_columns_absorb_the_rounding_error_as_least_squares_says(static):
    """Visited last and never rounded, the weak columns end at the best values given the rounded
    ones: V = W_w + (W_q − Ŵ_q) H_qw H_ww⁻¹ (float64, tiny damping, float32 storage)."""
    X, W = _planted(d=48, out=24, seed=3)
    X, W = X.double(), W.double()
    H = X.T @ X
    res = gptq_quantize(W.float(), H.float(), QuantScheme(bits=3, group_size=16, symmetric=False, scale_dtype=torch.float32),
                        act_order=True, static_groups=static, weak_columns=4, damp=1e-8, outlier_dtype=torch.float32)
    cols, vals = res.weak
    q = torch.ones(48, dtype=torch.bool)
    q[cols] = False
    Wq = res.dequantize().double()
    V = W[:, cols] + (W[:, q] - Wq[:, q]) @ H[q][:, cols] @ torch.linalg.inv(H[cols][:, cols])
    torch.testing.assert_close(vals.double(), V, atol=2e-3 * float(V.abs().max()), rtol=0)


def test_the_grid_leaves_the_weak_columns_out():
    """A weak column's huge weights do not widen its group's range: static groups are fitted on
    the group's other columns only (per channel: on every other column)."""
    X, W = _planted()
    W[:, OUTLIER_CHANNELS] *= 50
    H = X.T @ X
    for group_size in (16, -1):
        scheme = QuantScheme(bits=3, group_size=group_size, symmetric=False)
        res = gptq_quantize(W, H, scheme, act_order=True, static_groups=True, weak_columns=4)
        assert sorted(res.weak[0].tolist()) == OUTLIER_CHANNELS
        gw = 64 if group_size == -1 else group_size
        for g in range(64 // gw):
            keep = [c for c in range(g * gw, (g + 1) * gw) if c not in OUTLIER_CHANNELS]
            scale, zero = fit_qparams(W[:, keep], scheme)
            assert torch.equal(res.scale[:, g], scale) and torch.equal(res.zero[:, g], zero.to(torch.int32))


@pytest.mark.parametrize("bits,group_size,act_order,static", [(3, 16, True, True), (3, -1, True, True), (4, 16, False, True),
                                                              (3, 16, True, False)])
def test_output_error_is_below_plain_gptq_with_planted_outlier_channels(bits, group_size, act_order, static):
    X, W = _planted(seed=2)
    H = X.T @ X
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=True)
    plain = gptq_quantize(W, H, scheme, act_order=act_order, static_groups=static)
    res = gptq_quantize(W, H, scheme, act_order=act_order, static_groups=static, weak_columns=4)
    m = OutlierQuantLinear.from_outliers(res, None, None, torch.bfloat16)
    assert _out_err(X, W, m.dequantize()) < 0.5 * _out_err(X, W, plain.dequantize())


def test_dequantize_and_forward_equal_a_slow_overwrite_with_outliers_and_weak_columns():
    X, W = _planted(out=20)
    res = gptq_quantize(W, X.T @ X, QuantScheme(bits=3, group_size=16, symmetric=False), act_order=True, static_groups=False,
                        outliers=2, weak_columns=5)
    bias = torch.randn(20)
    m = OutlierQuantLinear.from_outliers(res, bias, torch.float32, torch.bfloat16)
    want = res.dequantize().clone()  # the codes' weight, then every kept weight written over it, one by one
    rows, ovals = res.outliers
    for j in range(64):
        for i in range(2):
            want[int(rows[j, i]), j] = float(ovals[j, i])
    cols, wvals = res.weak
    for i, c in enumerate(cols.tolist()):
        for r in range(20):
            want[r, c] = float(wvals[r, i])
    assert torch.equal(m.dequantize(), want)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, x @ want.T + bias, rtol=0, atol=1e-4)
        # the split product (codes of the weak columns are the zero point) computes the same
        packed = super(OutlierQuantLinear, m).dequantize()
        rest = packed.clone()
        rest[rows.long(), torch.arange(64)[:, None].expand(-1, 2)] = ovals
        rest[:, cols] = 0
        torch.testing.assert_close(y, x @ rest.T + x[..., cols] @ wvals.T + bias, rtol=0, atol=1e-4)
    # bits per weight: the packed part's, plus 16 + 16 per outlier, 16 per weak weight and 16 per index
    base = (m.weight_packed.numel() * 32 + m.weight_scale.numel() * 16 + m.weight_zero_point.numel() * 32 + m.weight_g_idx.numel() * 32)
    assert m.bits_per_weight == pytest.approx((base + 64 * 2 * 32 + 5 * 20 * 16 + 5 * 16) / (20 * 64))


def test_weak_column_counts_and_values():
    from compress.quant.passes import GPTQConfig

    assert GPTQConfig(weak_columns=0.01).weak_count(576) == 6 and GPTQConfig(weak_columns=0.01).weak_count(1536) == 16
    assert GPTQConfig(weak_columns=8).weak_count(64) == 8 and GPTQConfig(weak_columns="8").weak_columns == 8
    assert GPTQConfig(weak_columns="0.5").weak_columns == 0.5 and GPTQConfig(weak_columns=0.999).weak_count(64) == 63


def _recipe(model, out, passes, **export):
    from compress.recipe import load_recipe

    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out), **export}})


@pytest.mark.parametrize("opts", [{"weak_columns": 4}, {"weak_columns": 0.05, "outliers": 0.05, "static_groups": False}])
def test_weak_columns_export_and_reload_with_the_in_memory_logits(tmp_path, opts):
    from transformers import AutoModelForCausalLM

    from compress.api import run
    from compress.checkpoint.load import load

    path = save_tiny(tmp_path / "m", "llama")
    rec = _recipe(path, tmp_path / "out", [{"gptq": {"bits": 3, "group_size": 16, **opts}}])
    report = run(rec)
    meta = json.loads((tmp_path / "out" / "compress.json").read_text())
    layers = meta["outliers"]["layers"]
    want = {64: 4, 128: 4} if opts["weak_columns"] == 4 else {64: 4, 128: 7}  # a fraction: ceil(0.05 · in_features)
    assert len(layers) == 14 and all(v["weak_columns"] == want[v["in_features"]] for v in layers.values())
    assert all((v["per_column"] > 0) == ("outliers" in opts) for v in layers.values())
    assert meta["runtimes"]["loads"] == ["compress"] and "weak columns" in meta["runtimes"]["refuses"]["vLLM"]["why"]
    reloaded = load(tmp_path / "out", dtype=torch.float32)
    mods = [m for m in reloaded.modules() if isinstance(m, OutlierQuantLinear)]
    assert len(mods) == 14 and all(m.weak_columns == want[m.in_features] for m in mods)
    mem = compressed_in_memory(path, rec, tmp_path / "mem")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)
    info = {r["name"]: r["info"] for r in report["layers"]}
    assert all(i["bits_per_weight"] > 3 + 16 / 16 + 16 * 4 / 128 for i in info.values())
    with pytest.raises(Exception, match="mismatched_sizes|compression_ratio"):  # transformers refuses to load it
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("extra,says", [
    (["--weak-columns", "1.5"], "passes.0.gptq.weak_columns: Value error, 1.5: a fraction of in_features lies in (0, 1)"),
    (["--weak-columns", "-3"], "passes.0.gptq.weak_columns: Value error, -3: a number of columns is 0 (none) or more"),
    (["--weak-columns", "many"], "passes.0.gptq.weak_columns: Value error, 'many'"),
    (["--weak-columns", "64"], "gptq: weak_columns 64 must be below in_features 64"),
    (["--weak-columns", "4", "--target", "vllm"], "passes.0.gptq.weak_columns: export.target is vllm"),
    (["--weak-columns", "4", "--outliers", "0.01", "--target", "transformers"],
     "passes.0.gptq.outliers and weak_columns: export.target is transformers"),
    (["--weak-columns", "4", "--method", "w8a8"], "weak_columns apply to weight-only"),
    (["--weak-columns", "4", "--method", "rtn"], "--weak-columns: for the GPTQ methods only"),
])
def test_the_cli_exits_2_on_bad_weak_columns(tmp_path, extra, says):
    from typer.testing import CliRunner

    from compress.cli import app

    path = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["quantize", str(path), "-o", str(out), "--samples", "4", "--seq-len", "32", "--no-eval", *extra])
    assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_a_gguf_export_refuses_weak_columns(tmp_path):
    from compress.api import run

    path = save_tiny(tmp_path / "m", "llama")
    with pytest.raises(UsageError, match=r"passes\.0\.gptq\.weak_columns: a GGUF export"):
        run(_recipe(path, tmp_path / "out", [{"gptq": {"weak_columns": 2}}], format="gguf", type="q4_0"))
    assert not (tmp_path / "out").exists()
