"""SqueezeLLM codebooks: the fast functions against slow per-row references, the error against
uniform grids at comparable bits, the packed module, and the pass end to end (export, reload)."""

import json

import pytest
import torch
from compress.quant.codebook import (
    codebook_quantize,
    dequantize_codebook,
    fit_codebooks,
    nearest_codes,
    quantile_init,
)
from compress.quant.codebook_module import CodebookLinear, pack_codes, packed_width, unpack_codes
from compress.quant.gptq import activation_order, gptq_quantize
from compress.quant.rtn import QuantScheme, rtn_quantize
from conftest import compressed_in_memory, save_tiny

from compress.errors import UsageError
from compress.obs import inverse_cholesky, prepare_hessian


def _calib(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel scales, like real activations
    A = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ A) * (torch.rand(d, generator=g) * 3 + 0.1)


def _outlier_weight(out_f, in_f, seed=2):
    """Gaussian rows (σ 0.02) with 1% of the weights ten times larger, as in trained LLM Linears."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    return torch.where(torch.rand(W.shape, generator=g) < 0.01, W * 10, W)


def _err(W, Wq, H):
    """tr(ΔW H ΔWᵀ): the output error on the calibration inputs."""
    D = Wq - W
    return float(torch.sum((D @ H) * D))


# ---------------------------------------------------------------- slow references


def _slow_quantile_init(W, h, k):
    """Per row: sort, accumulate the weights, take the first value whose cumulative weight reaches
    (i + ½)/k of the row's total."""
    out = torch.zeros(W.shape[0], k)
    for r in range(W.shape[0]):
        hr = h if h.sum() > 0 else torch.ones_like(h)
        order = sorted(range(W.shape[1]), key=lambda j: float(W[r, j]))
        total = float(hr.sum())
        for i in range(k):
            target, acc = (i + 0.5) / k * total, 0.0
            for j in order:
                acc += float(hr[j])
                if acc >= target:
                    break
            out[r, i] = W[r, j]
    return out


def _slow_kmeans(W, h, init, iters):
    """Weighted Lloyd's iterations row by row: assign each weight to its nearest entry (the first
    on a tie), move every entry to the weighted mean of its weights (an empty one stays), sort."""
    W, h = W.double(), h.double()
    tables = init.double().clone()
    for r in range(W.shape[0]):
        t, prev = tables[r].clone(), None
        for _ in range(iters):
            a = torch.tensor([int(torch.argmin((W[r, j] - t).abs())) for j in range(W.shape[1])])
            if prev is not None and torch.equal(a, prev):
                break
            prev = a
            for i in range(len(t)):
                sel = a == i
                if h[sel].sum() > 0:
                    t[i] = (h[sel] * W[r, sel]).sum() / h[sel].sum()
            t = t.sort().values
        tables[r] = t
    return tables.float()


def _slow_column_solver(W, H, tables, damp, act_order):
    """GPTQ's loop without blocks: round column j to each row's nearest table entry (argmin), then
    W[:, j:] -= (w_j − ŵ_j)/U_jj ⊗ U[j, j:] at once."""
    W, H = prepare_hessian(W, H)
    W, H, perm = activation_order(W, H, act_order)
    U, _ = inverse_cholesky(H, damp)
    codes = torch.zeros(W.shape, dtype=torch.long)
    for j in range(W.shape[1]):
        for r in range(W.shape[0]):
            codes[r, j] = int(torch.argmin((W[r, j] - tables[r]).abs()))
        q = tables.gather(1, codes[:, j : j + 1])[:, 0]
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes[:, torch.argsort(perm)].to(torch.uint8)


# ---------------------------------------------------------------- the algorithm equals its references


@pytest.mark.parametrize("shape,k", [((5, 37), 4), ((3, 61), 8), ((4, 9), 16)])
def test_quantile_init_equals_slow_reference(shape, k):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g)
    h = torch.rand(shape[1], generator=g)
    h[::5] = 0  # dead inputs weigh nothing
    torch.testing.assert_close(quantile_init(W, h, k), _slow_quantile_init(W, h, k), rtol=0, atol=0)
    assert torch.equal(quantile_init(W, torch.zeros(shape[1]), k), _slow_quantile_init(W, torch.zeros(shape[1]), k))


@pytest.mark.parametrize("shape,bits", [((5, 37), 2), ((4, 61), 3), ((3, 45), 4)])
def test_fit_codebooks_equals_slow_kmeans_from_the_same_init(shape, bits):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g)
    h = torch.rand(shape[1], generator=g) * 4
    h[::7] = 0
    init = quantile_init(W, h, 1 << bits)
    fast = fit_codebooks(W, h, bits, iters=25)
    torch.testing.assert_close(fast, _slow_kmeans(W, h, init, 25), rtol=1e-5, atol=1e-6)
    assert torch.all(fast[:, 1:] >= fast[:, :-1])  # rows ascending


def test_kmeans_lowers_the_weighted_error_of_its_init():
    W = _outlier_weight(16, 200)
    h = torch.diag(_calib(512, 200).T @ _calib(512, 200))

    def werr(T):
        return float((h * (dequantize_codebook(nearest_codes(W, T), T) - W) ** 2).sum())

    assert werr(fit_codebooks(W, h, 3)) < 0.9 * werr(quantile_init(W, h, 8))


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("shape,bits", [((7, 45), 3), ((6, 33), 2), ((5, 70), 4)])
def test_codebook_quantize_equals_the_slow_column_solver(shape, bits, act_order):
    X = _calib(256, shape[1], seed=3)
    X[:, 4] = 0  # a dead input
    H = X.T @ X
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    codes, tables, info = codebook_quantize(W, H, bits, blocksize=16, act_order=act_order)  # 16: blocks cross odd widths
    torch.testing.assert_close(tables, fit_codebooks(W, torch.diag(H), bits))
    assert codes.dtype == torch.uint8 and codes.shape == shape and int(codes.max()) < (1 << bits)
    assert torch.equal(codes, _slow_column_solver(W, H, tables, 0.01, act_order))
    assert info["damp"] == 0.01 and info["loss"] > 0


def test_tables_are_rounded_to_the_storage_dtype_before_the_solver():
    X = _calib(256, 40)
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    codes, tables, _ = codebook_quantize(W, X.T @ X, 3, table_dtype=torch.bfloat16)
    assert torch.equal(tables, tables.to(torch.bfloat16).float())
    assert torch.equal(codes, _slow_column_solver(W, X.T @ X, tables, 0.01, True))


# ---------------------------------------------------------------- against uniform grids


def test_codebooks_beat_uniform_rtn_and_gptq_at_3_bits_on_weights_with_outliers():
    """576 columns (the demo's hidden size), 3 bits. The codebook stores 3 + 8·16/576 = 3.22 bits
    per weight (CodebookLinear.bits_per_weight); uniform 3-bit with group size 64 stores more
    (QuantLinear.bits_per_weight: 3.25 symmetric, 3.30 asymmetric), per channel less (3.03), and
    both lose to it, with and without GPTQ's error feedback."""
    in_f = 576
    X = _calib(4096, in_f, seed=1)
    H = X.T @ X
    W = _outlier_weight(64, in_f)
    codes, tables, _ = codebook_quantize(W, H, 3, table_dtype=torch.bfloat16)
    cb = _err(W, dequantize_codebook(codes, tables), H)
    for group_size in (64, -1):
        for symmetric in (False, True):
            scheme = QuantScheme(bits=3, group_size=group_size, symmetric=symmetric)
            assert cb < _err(W, rtn_quantize(W, scheme).dequantize(), H)
            assert cb < _err(W, gptq_quantize(W, H, scheme, act_order=True, static_groups=True).dequantize(), H)
    # the error feedback helps the codebook too
    T = fit_codebooks(W, torch.diag(H), 3).to(torch.bfloat16).float()
    assert cb < 0.8 * _err(W, dequantize_codebook(nearest_codes(W, T), T), H)


# ---------------------------------------------------------------- the module type


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("in_f", [1, 13, 40, 77])
def test_packing_round_trips(bits, in_f):
    codes = torch.randint(0, 1 << bits, (3, in_f), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_width(in_f, bits))
    assert torch.equal(unpack_codes(packed, bits, in_f), codes)


def test_three_bit_codes_pack_eight_in_three_bytes_lsb_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))  # code j at bits [3j, 3j+3)
    assert pack_codes(codes, 3).tolist() == [[stream & 255, (stream >> 8) & 255, stream >> 16]]


def test_codebook_linear_computes_with_its_looked_up_weight():
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 8, (24, 576), generator=g).to(torch.uint8)
    tables = torch.randn(24, 8, generator=g).sort(dim=1).values
    bias = torch.randn(24, generator=g)
    m = CodebookLinear.from_codes(codes, tables, 3, bias=bias)
    W = tables.to(torch.bfloat16).float().gather(1, codes.long())
    torch.testing.assert_close(m.dense_weight(), W, rtol=0, atol=0)
    x = torch.randn(2, 5, 576, generator=g)
    m.backend = "torch"  # the reference path, to sgemm's rounding (the CPU kernel: tests/quant/test_codebook_cpu_kernel.py)
    torch.testing.assert_close(m(x), x @ W.T + bias.to(torch.bfloat16).float())
    assert m.keep_dense(True) and torch.equal(m(x), m(x))
    assert m.bits_per_weight == pytest.approx(3 + 8 * 16 / 576)  # 216 bytes of codes + 8 bf16 entries per row
    assert CodebookLinear.runtimes({}) == ["compress"]
    assert "transformers has no reader for non-uniform codebook layers" in CodebookLinear.refusal({}, "transformers")


# ---------------------------------------------------------------- the pass, end to end


def _recipe(model, out, passes, **export):
    from compress.recipe import load_recipe

    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out), **export}})


def test_squeezellm_exports_and_reloads_with_the_in_memory_logits(tmp_path):
    from compress.api import run
    from compress.api.inspection import inspect_checkpoint
    from compress.checkpoint.load import load
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama")
    rec = _recipe(path, tmp_path / "out", [{"squeezellm": {"bits": 3}}])
    report = run(rec)
    assert len(report["layers"]) == 14 and all(l["passes"] == ["squeezellm"] for l in report["layers"])
    assert all(0 < l["rel_output_error"] < 0.2 for l in report["layers"])
    meta = json.loads((tmp_path / "out" / "compress.json").read_text())["codebook"]
    assert len(meta["layers"]) == 14 and {v["bits"] for v in meta["layers"].values()} == {3}
    reloaded = load(tmp_path / "out", dtype=torch.float32)
    kinds = [type(m).__name__ for m in reloaded.modules()]
    assert kinds.count("CodebookLinear") == 14 and "QuantLinear" not in kinds
    mem = compressed_in_memory(path, rec, tmp_path / "mem")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)
    info = inspect_checkpoint(tmp_path / "out")
    assert info["quantized_layers"] == 14
    dense = AutoModelForCausalLM.from_pretrained(path).num_parameters()  # lm_head tied: counted once
    assert info["parameters"] == dense and info["bits_per_parameter"] < 16


def test_squeezellm_after_lowrank_quantizes_the_factors_and_reloads(tmp_path):
    from compress.api import run
    from compress.checkpoint.load import load

    path = save_tiny(tmp_path / "m", "llama")
    rec = _recipe(path, tmp_path / "out", [{"lowrank": {"reduction": 0.2}}, {"squeezellm": {"bits": 4}}])
    run(rec)
    layers = json.loads((tmp_path / "out" / "compress.json").read_text())["codebook"]["layers"]
    assert any(n.endswith(".A") for n in layers) and any(n.endswith(".B") for n in layers)
    reloaded = load(tmp_path / "out", dtype=torch.float32)
    factored = [m for m in reloaded.modules() if type(m).__name__ == "LowRankLinear"]
    assert factored and all(isinstance(m.A, CodebookLinear) and isinstance(m.B, CodebookLinear) for m in factored)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        mem = compressed_in_memory(path, rec, tmp_path / "mem")
        torch.testing.assert_close(reloaded(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("passes,match", [
    ([{"squeezellm": {"bits": 9}}], r"passes\.0\.squeezellm\.bits.*2\^8 = 256 entries at most"),
    ([{"squeezellm": {"bits": 1}}], r"passes\.0\.squeezellm\.bits"),
    ([{"squeezellm": {"bits": 3, "block_sz": 64}}], r"passes\.0\.squeezellm\.block_sz"),
])
def test_bad_options_are_usage_errors_naming_the_field(tmp_path, passes, match):
    with pytest.raises(UsageError, match=match):
        _recipe(tmp_path, tmp_path / "out", passes)


@pytest.mark.parametrize("passes,export,match", [
    ([{"squeezellm": {}}], {"target": "vllm"}, r"passes\.0\.squeezellm: export.target is vllm, and vLLM has no reader"),
    ([{"squeezellm": {}}], {"format": "gguf", "type": "q4_0"}, r"passes\.0\.squeezellm: a GGUF export"),
    ([{"squeezellm": {}}, {"gptq": {}}], {}, "two quantization passes"),
    ([{"wanda": {}}, {"squeezellm": {}}], {}, "squeezellm cannot follow wanda"),
    ([{"squeezellm": {}}, {"wanda": {}}], {}, "pruning pass comes after a quantization pass"),
])
def test_impossible_recipes_are_refused_before_any_work(tmp_path, passes, export, match):
    from compress.api import run

    path = save_tiny(tmp_path / "m", "llama")
    with pytest.raises(UsageError, match=match):
        run(_recipe(path, tmp_path / "out", passes, **export))
    assert not (tmp_path / "out").exists()


def test_the_cli_exits_2_on_a_codebook_over_2_to_the_8(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    r = CliRunner().invoke(app, ["run", "--set", "passes=[{squeezellm: {bits: 9}}]", "--dry-run"])
    assert r.exit_code == 2 and "passes.0.squeezellm.bits" in r.output


def test_the_export_records_that_only_compress_loads_it_and_transformers_refuses(tmp_path):
    from compress.api import run
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama")
    run(_recipe(path, tmp_path / "out", [{"squeezellm": {"bits": 3}}]))
    rt = json.loads((tmp_path / "out" / "compress.json").read_text())["runtimes"]
    assert rt["loads"] == ["compress"] and set(rt["refuses"]) == {"vLLM", "vLLM-CPU", "transformers"}
    assert "non-uniform codebook" in rt["refuses"]["transformers"]["why"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
