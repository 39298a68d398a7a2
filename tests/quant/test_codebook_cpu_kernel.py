"""compress's CPU lookup kernel for codebook layers (compress.kernels.codebook_cpu) against the
torch lookup reference (``CodebookLinear.dequantize()`` then a float64 matmul) on odd shapes:
2/3/4-bit codes (3-bit ones crossing bytes), K not a multiple of 8 or of a 128-code chunk, 1-70
token rows, bf16 and float32 x, with and without bias; the looked-up weight exactly; and
``CodebookLinear`` choosing and recording the kernel on the CPU.

The kernel runs natively where the CPU has AVX-512 BW and BF16; elsewhere the same C source is
built on SIMDe's portable intrinsics (``emulate``, Debian's libsimde-dev) so the code paths are
still checked; without either the kernel tests skip, saying why."""

import pytest
import torch
from compress.quant.codebook_module import CodebookLinear

from compress.errors import UsageError
from compress.kernels import codebook_cpu, last_kernel, native


def _why_not(kind: str) -> str | None:
    if kind == "native":
        return codebook_cpu.missing()
    if codebook_cpu.missing() is None:
        return "the native kernel runs here (the emulated build serves CPUs without AVX-512)"
    why = codebook_cpu.missing(emulate=True)
    return why and f"{why} (the emulated build needs SIMDe's headers: apt-get install libsimde-dev)"


@pytest.fixture(params=["native", "emulated"])
def kernel(request, monkeypatch):
    """The kernel every codebook_cpu call (and CodebookLinear's forward) runs in this test."""
    why = _why_not(request.param)
    if why:
        pytest.skip(f"compress's CPU codebook kernel ({request.param}) unavailable: {why}")
    lib = codebook_cpu.library(request.param == "emulated")
    monkeypatch.setattr(codebook_cpu, "library", lambda emulate=False: lib)
    return request.param


def _layer(bits, N, K, seed, bias=True, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    tables = torch.sort(torch.randn(N, 1 << bits, generator=g) * 0.05, dim=1).values
    b = torch.randn(N, generator=g) if bias else None
    return CodebookLinear.from_codes(codes, tables, bits, bias=b, dtype=dtype)


def _reference(m, x, W=None):
    """The torch lookup reference in float64: x @ (Ŵ in x's dtype)ᵀ + bias in x's dtype, and
    Σ|x||w| (+ |bias|), the scale of the float32 summation error."""
    W = (m.dequantize() if W is None else W).to(x.dtype).double()
    want, scale = x.double() @ W.t(), x.double().abs() @ W.abs().t()
    if m.bias is not None:
        want, scale = want + m.bias.to(x.dtype).double(), scale + m.bias.double().abs()
    return want, scale


def _close(y, x, m, W=None) -> bool:
    """Within float32 summation of exact (bf16) or once-rounded (float32, FMA) products: at most
    K + 1 additions, each off by 2^-24 of a partial sum bounded by Σ|x||w| (with bias), doubled
    for slack; then one rounding to x's dtype (2^-8 relative for bf16, 2^-24 for float32)."""
    want, scale = _reference(m, x, W)
    u_out = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-24
    tol = u_out * want.abs() + 2 * (x.shape[1] + 1) * 2.0**-24 * scale
    return y.dtype == x.dtype and y.shape == want.shape and bool(((y.double() - want).abs() <= tol).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [100, 64, 200, 40, 576])
@pytest.mark.parametrize("M", [1, 3, 17, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_lookup_kernel_equals_the_reference(kernel, bits, K, M, dtype, bias):
    m = _layer(bits, 37, K, seed=bits * 1000 + K + M, bias=bias)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    args = (m.weight_codes, m.weight_tables, bits, m.bias)
    assert _close(codebook_cpu.linear(x, *args), x, m)  # the lookup kernel at any M (blocks of 8, 4, 3, 2, 1 rows)
    assert _close(codebook_cpu.prefill(x, *args), x, m)  # looked-up tiles + torch's GEMM
    assert _close(codebook_cpu.codebook_linear(x, *args), x, m)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float32_tables_are_rounded_as_the_reference_rounds_them(kernel, bits, dtype):
    m = _layer(bits, 21, 200, seed=bits, dtype=torch.float32)  # a float32 checkpoint's tables and bias
    for M in (3, 17):
        x = torch.randn(M, 200, generator=torch.Generator().manual_seed(M)).to(dtype)
        assert _close(codebook_cpu.linear(x, m.weight_codes, m.weight_tables, bits, m.bias), x, m)


def test_the_check_fails_on_a_wrong_table_row_or_shifted_codes(kernel):
    """The tolerance above is tight enough to see a decoding mistake: the kernel's result is
    rejected against a reference with one row's table swapped for another's, or the codes one
    column off."""
    m = _layer(3, 16, 200, seed=7)
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = codebook_cpu.linear(x, m.weight_codes, m.weight_tables, 3, m.bias)
    assert _close(y, x, m)
    wrong_row = m.weight_tables.float().clone()
    wrong_row[5] = wrong_row[6]
    assert not _close(y, x, m, W=wrong_row.gather(1, m.codes().long()))
    shifted = m.codes().long().roll(1, dims=1)
    assert not _close(y, x, m, W=m.weight_tables.float().gather(1, shifted))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_dequant_is_the_looked_up_weight_in_the_decode_order(kernel, bits, dtype, table_dtype):
    N, K = 9, 300  # 3 chunks, the last one short
    m = _layer(bits, N, K, seed=bits, dtype=table_dtype)
    order = codebook_cpu.decode_order(bits, dtype)
    assert torch.equal(order.sort().values, torch.arange(128))
    Kp = codebook_cpu.padded(K)
    cols = (torch.arange(0, Kp, 128)[:, None] + order).reshape(-1)  # column of k order at each position
    w = codebook_cpu.dequant(m.weight_codes, m.weight_tables, bits, K, dtype)
    full = torch.empty(N, Kp, dtype=dtype)
    full[:, cols] = w
    assert torch.equal(full[:, :K], m.dequantize().to(dtype))
    assert torch.equal(full[:, K:], m.weight_tables[:, :1].to(dtype).expand(N, Kp - K))  # padding codes meet zero x
    x = torch.randn(2, K).to(dtype)
    back = torch.empty(2, Kp, dtype=dtype)
    back[:, cols] = codebook_cpu.permute(x, bits)  # the activations in the same order, zeros past K
    assert torch.equal(back[:, :K], x) and not back[:, K:].any()


def test_strided_rows_are_read_in_place(kernel):
    m = _layer(4, 19, 100, seed=3)
    wide = torch.randn(5, 256).to(torch.bfloat16)
    x = wide[:, 50:150]  # rows 256 apart
    assert _close(codebook_cpu.linear(x, m.weight_codes, m.weight_tables, 4, m.bias), x, m)


# ---------------------------------------------------------------- CodebookLinear on the CPU


def test_codebook_linear_records_the_cpu_kernel_and_equals_the_reference(kernel):
    m = _layer(3, 24, 200, seed=11)
    for tokens in (5, 40):  # decode (the lookup kernel) and prefill (looked-up tiles + GEMM)
        x = torch.randn(2, tokens, 200, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
        with torch.no_grad():
            y = m(x)
        assert m.kernel == "cpu" and last_kernel() == "cpu" and y.shape == (2, tokens, 24)
        assert _close(y.reshape(-1, 24), x.reshape(-1, 200), m)
        m.backend = "torch"
        want = m(x)
        assert m.kernel == "torch" and _close(want.reshape(-1, 24), x.reshape(-1, 200), m)
        m.backend = None
    x = torch.randn(3, 200).to(torch.float32)
    assert _close(m(x), x, m) and m.kernel == "cpu"


def test_the_reference_runs_where_the_kernel_must_not(kernel):
    m = _layer(4, 16, 64, seed=2)
    x = torch.randn(3, 64)
    m.keep_dense(True)  # evaluation's dequantize-once path
    m(x)
    assert m.kernel == "torch"
    m.keep_dense(False)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()  # the kernel records no graph: a differentiated forward takes the reference
    assert m.kernel == "torch" and torch.allclose(xg.grad, m.dequantize().sum(0).expand(3, 64))
    m(x.half())
    assert m.kernel == "torch"  # fp16 activations: the reference, automatically
    m.backend = "cpu"
    with pytest.raises(UsageError, match="bf16 or float32 activations"):
        m(x.half())
    wide = _layer(8, 16, 64, seed=2)
    wide(x)
    assert wide.kernel == "torch"


def test_without_the_kernel_the_reference_runs_and_a_forced_cpu_kernel_says_why(monkeypatch):
    monkeypatch.setattr(codebook_cpu, "missing", lambda emulate=False: "no C compiler to build compress's CPU kernels")
    m = _layer(2, 8, 40, seed=1)
    x = torch.randn(2, 40)
    y = m(x)
    assert m.kernel == "torch" and _close(y, x, m)
    m.backend = "cpu"
    with pytest.raises(UsageError, match="kernel backend 'cpu' cannot run codebook layers here: no C compiler"):
        m(x)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.ENV in codebook_cpu.missing() and native.ENV in codebook_cpu.unsupported(3, torch.bfloat16)
    m = _layer(3, 8, 40, seed=1)
    m(torch.randn(2, 40))
    assert m.kernel == "torch"
