"""compress's own AVX-512 CPU kernels (compress.kernels.native) against slow, obvious references:
the code layout round-trips; the dequantized weight is the exact float32 (q - 8)·s + zero rounded
once to bf16; the int4 GEMV/GEMM equals the float64 product of the same weight on odd shapes
(groups of 32, 96, 160 and per-channel, asymmetric, 1-17 token rows); the activation quantizer is
the reference's bit for bit, K not a multiple of 16."""

import pytest
import torch

from compress.errors import UsageError
from compress.kernels import native, reference

pytestmark = pytest.mark.skipif(native.missing() is not None, reason=f"compress's CPU kernels unavailable: {native.missing()}")

SHAPES = [  # N, K, group size
    (40, 96, 32),
    (17, 576, 64),
    (33, 160, 160),  # 2 chunks + a half chunk per group
    (24, 192, 96),  # 1 chunk + a half chunk
    (7, 384, 128),
    (5, 1056, 1056),  # per-channel, K = 33 * 32
]


def _layer(N, K, gs, asym, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    s = (torch.rand(N, K // gs, generator=g) * 0.01 + 1e-3).to(torch.bfloat16).float()
    zero = (torch.randint(-8, 8, (N, K // gs), generator=g).float() * s) if asym else None
    w = (q.double() - 8).reshape(N, -1, gs) * s.double()[:, :, None]
    if asym:
        w = w + zero.double()[:, :, None]
    return q, s, zero, w.reshape(N, K)


@pytest.mark.parametrize("N,K,gs", SHAPES)
def test_layout_round_trips(N, K, gs):
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N))
    p = native.pack(q, gs)
    assert p.shape == (N, K // 2) and p.dtype == torch.uint8
    assert torch.equal(native.unpack(p, gs).long(), q)


def test_layout_of_one_chunk_is_as_documented():
    q = torch.arange(64).remainder(16).reshape(1, 64)
    p = native.pack(q, 64)[0]
    assert all(int(p[j]) == (j % 16) | (((j + 32) % 16) << 4) for j in range(32))
    h = native.pack(q[:, :32], 32)[0]
    assert all(int(h[j]) == (j % 16) | (((j + 16) % 16) << 4) for j in range(16))


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("N,K,gs", SHAPES)
def test_dequantize_is_the_exact_weight_rounded_once(N, K, gs, asym):
    q, s, zero, w = _layer(N, K, gs, asym, seed=K)
    got = native.int4_dequant(native.pack(q, gs), s, zero, gs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, w.float().to(torch.bfloat16))


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("N,K,gs", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])  # blocks of up to 4 rows share each decoded chunk
def test_linear_equals_the_float64_product(N, K, gs, asym, M):
    q, s, zero, w = _layer(N, K, gs, asym, seed=N + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(1))
    y = native.int4_linear(x, native.pack(q, gs), s, zero, bias, gs)
    want = x.double() @ w.t() + bias.double()
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # float32 sums of exact products, then one bf16 rounding (2^-9 relative per element)
    assert ((y.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-4 * want.abs().max()).all()


def test_linear_reads_strided_rows():
    q, s, _, w = _layer(16, 128, 64, False, seed=3)
    x = torch.randn(6, 256).to(torch.bfloat16)[:, 64:192]  # row stride 256
    y = native.int4_linear(x, native.pack(q, 64), s, None, None, 64)
    assert torch.allclose(y.double(), x.double() @ w.t(), rtol=2.0**-7, atol=1e-3)


@pytest.mark.parametrize("K", [200, 16, 7])
def test_quantize_rows_is_the_reference_bit_for_bit(K):
    x = torch.randn(37, K) * torch.logspace(-3, 2, 37)[:, None]
    x[3] = 0  # an all-zero token
    x = x.to(torch.bfloat16)
    q, s = native.quantize_rows(x)
    qr, sr = reference.quantize_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr.reshape(s.shape))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.ENV in native.missing()
    with pytest.raises(UsageError, match=native.ENV):
        native.quantize_rows(torch.zeros(2, 32, dtype=torch.bfloat16))


def test_huge_page_copies_hold_the_same_codes():
    big = torch.randint(0, 256, (1536, 2048), dtype=torch.uint8)  # 3 MiB
    h = native.huge_pages(big)
    assert h.is_contiguous() and h.data_ptr() != big.data_ptr() and torch.equal(h, big)
    small = torch.randint(0, 256, (16, 64), dtype=torch.uint8)
    assert torch.equal(native.huge_pages(small), small)
    # the packed layer of a real-sized layout lands there too, and still decodes exactly
    q = torch.randint(0, 16, (1024, 4096), dtype=torch.uint8)
    assert torch.equal(native.unpack(native.pack(q, 128), 128), q)


@pytest.mark.parametrize("N", [40, 16, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_scales_rows_with_one_rounding(N, bias):
    g = torch.Generator().manual_seed(N)
    y = torch.randn(9, N, generator=g).to(torch.bfloat16)
    rs = torch.rand(9, 1, generator=g) * 0.01
    b = torch.randn(N, generator=g) if bias else None
    want = torch.addcmul(b, y.float(), rs) if bias else y.float() * rs  # float32, one rounding to bf16 after
    got = native.scale_rows_(y.clone(), rs, b)
    assert torch.equal(got, want.to(torch.bfloat16))


def test_a_load_without_our_kernel_says_which_int4_kernel_runs_and_why(monkeypatch):
    from test_kernels import random_qlinear
    from torch import nn

    from compress.checkpoint.cpu_modules import to_cpu_kernels

    monkeypatch.setattr(native, "missing", lambda: "no C compiler to build compress's CPU kernels (set $CC or install gcc)")
    model = nn.Sequential(random_qlinear(32, 64, 4, 32, True, seed=1))
    said: list[str] = []
    out = to_cpu_kernels(model, torch.bfloat16, log=said.append)
    assert out["converted"] == ["0"] and model[0].cpu.layout == "torch"
    assert "1 4-bit layers on torch's int4 kernel, not compress's (no C compiler" in said[0]


def test_a_failing_compiler_is_named_with_its_exit_code(tmp_path):
    from compress.kernels.build import compile_library

    with pytest.raises(UsageError, match="could not build .*exit code 1, no output"):
        compile_library("false", [], native.SOURCE, "broken", out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache


@pytest.mark.parametrize("T,I", [(1, 1001), (3, 16), (17, 7), (5, 5632)])
def test_silu_mul_quant_equals_the_float64_rule(T, I):
    """SiLU(g·rs)·(u·rs) quantized per token: the scale to float32 precision and every code the
    float64 rule's (the float32 pass differs from float64 only far below a code's half step)."""
    g = torch.Generator().manual_seed(T * I)
    gate = (torch.randn(T, I, generator=g) * 4).to(torch.bfloat16)
    up = torch.randn(T, I, generator=g).to(torch.bfloat16)
    rs = torch.rand(T, 1, generator=g) + 0.25
    if T > 1:
        gate[1] = 0  # an all-zero row: scale 0, codes 0, no NaN
    q, s = native.silu_mul_quant(gate, up, rs)
    gd, ud = gate.double() * rs.double(), up.double() * rs.double()
    h = gd * torch.sigmoid(gd) * ud
    sref = h.abs().amax(1, keepdim=True) / 127
    qref = (h / torch.where(sref > 0, sref, torch.ones_like(sref))).round().clamp(-127, 127)
    torch.testing.assert_close(s.double(), sref, rtol=1e-6, atol=0)
    near_half = ((h / sref.clamp_min(1e-30)).abs().frac() - 0.5).abs() < 1e-4  # ties the float32 pass may round the other way
    assert torch.equal(q.double()[~near_half], qref[~near_half]) and (q.double() - qref).abs().max() <= 1
    with pytest.raises(ValueError, match="bf16"):
        native.silu_mul_quant(gate.float(), up, rs)


@pytest.mark.parametrize("K", [2048, 576, 37, 16])
def test_rms_norm_is_transformers_within_one_rounding(K):
    """native.rms_norm against transformers' LlamaRMSNorm on the same bf16 input: at most one bf16
    step apart (the float32 sum of squares in another order), almost always equal."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(K)
    norm = LlamaRMSNorm(K, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(K, generator=g) * 0.3 + 1)
        x = (torch.randn(301, K, generator=g) * 3).to(torch.bfloat16)
        x[7] = 0  # eps keeps a zero row finite
        want = norm(x).float()
    got = native.rms_norm(x, norm.weight, norm.variance_epsilon).float()
    assert (got - want).abs().le(want.abs() * 2.0**-7).all() and (got != want).float().mean() < 1e-3
    strided = torch.zeros(301, K + 5, dtype=torch.bfloat16)
    strided[:, :K] = x
    assert torch.equal(native.rms_norm(strided[:, :K], norm.weight, norm.variance_epsilon).float(), got)
