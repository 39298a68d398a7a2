"""The CPU integer kernels (compress.kernels.cpu) against the torch reference, on odd shapes: K not
a multiple of 128, groups of 32/64/128/per-channel, symmetric and asymmetric, act-order, 1, 17
and prefill-sized token counts; the converted modules give the export's tensors back exactly;
compress.load keeps the demo's W4 export at its packed size in memory."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_kernels import oracle32, random_qlinear, rel_err

import compress.kernels as kernels
from compress.checkpoint.cpu_modules import (
    CpuInt8Linear,
    CpuQuantLinear,
    resident_bytes,
    to_cpu_kernels,
)
from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.errors import UsageError
from compress.kernels import cpu, native, reference

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"CPU integer kernels unavailable: {cpu.available()}")
# oneDNN's int8 GEMM, exact only with VNNI (without it: W8A8 stays on the reference, cpu.int8_unsupported)
needs_int8 = pytest.mark.skipif(cpu.int8_unsupported() is not None, reason=f"{cpu.int8_unsupported()}")

BF16_TOL = 8e-3  # one bf16 rounding of the output (2^-9 relative), summed over K


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delenv(native.ENV, raising=False)


@pytest.fixture(params=["native", "torch"])
def layout(request, monkeypatch):
    """Both 4-bit layouts: compress's AVX-512 kernel (``native``) and torch's int4 kernel."""
    if request.param == "torch":
        monkeypatch.setenv(native.ENV, "0")
    elif native.missing():
        pytest.skip(f"compress's CPU kernels unavailable: {native.missing()}")
    return request.param


@pytest.mark.parametrize("N,K", [(16, 64), (48, 96), (64, 32), (80, 64), (112, 128), (176, 576)])
def test_int4_layout_inverse_is_exact(N, K):
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(N))
    assert torch.equal(cpu.unpack_int4(cpu._to_int4pack(q), N, K).to(torch.int32), q)


CASES = [
    # bits, N, K, group_size, symmetric, act_order
    (4, 40, 96, 32, True, False),
    (4, 24, 160, 32, False, False),
    (4, 48, 192, 64, True, False),
    (4, 17, 576, 64, False, False),  # N not a multiple of 16: padded rows
    (4, 64, 384, 128, True, True),
    (4, 33, 160, -1, False, False),  # per-channel: scales repeated over kernel groups of 32
    (4, 32, 256, 256, True, False),
    (8, 40, 96, -1, True, False),  # int8pack, one scale per row
    (8, 24, 160, 32, True, True),  # grouped: one int8pack call per group
    (8, 17, 192, 64, False, False),
]


def _converted(m, dtype=torch.bfloat16):
    return CpuQuantLinear(m, cpu.build(m, dtype))


@pytest.mark.parametrize("bits,N,K,gs,sym,act", CASES)
@pytest.mark.parametrize("tokens", [1, 3, 17, max(cpu.PREFILL_TOKENS.values()) + 7])
def test_wna16_cpu_equals_reference(bits, N, K, gs, sym, act, tokens, layout):
    m = random_qlinear(N, K, bits, gs, sym, g_idx=act, bias=True, seed=N + K)
    c = _converted(m)
    x = torch.randn(2, tokens, K, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(tokens))
    y = c(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, tokens, N) and c.kernel == "cpu" and kernels.last_kernel() == "cpu"
    assert rel_err(y, oracle32(x, m)) < BF16_TOL
    # against the torch reference module itself, same activations
    assert rel_err(y, m(x)) < BF16_TOL


@pytest.mark.parametrize("bits,N,K,gs,sym,act", CASES)
def test_converted_module_gives_the_export_back(bits, N, K, gs, sym, act, layout):
    m = random_qlinear(N, K, bits, gs, sym, g_idx=act, bias=True, seed=3)
    c = _converted(m)
    assert torch.equal(c.dequantize(), m.dequantize())
    want, got = m.state_dict(), c.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert isinstance(c, QuantLinear) and "weight_packed" not in c._buffers  # the codes are held once, in c.cpu


def test_asymmetric_zeros_fold_or_correct_exactly(monkeypatch):
    """(8 - z) · s folds into the kernel's zero where bf16 holds it; otherwise the exact float32
    term goes beside the kernel. Both give the reference's weight exactly."""
    monkeypatch.setenv(native.ENV, "0")  # torch's int4 layout
    m = random_qlinear(32, 128, 4, 32, symmetric=False, seed=5)
    cw = cpu.build(m, torch.bfloat16)
    assert cw.corr is not None  # random bf16 scales times 3-bit integers: not exact in bf16
    assert torch.equal(cpu.dequantize(cw), m.dequantize())
    # scales that are powers of two: every (8 - z) · s is exact in bf16, so it folds
    m.weight_scale.copy_(torch.full_like(m.weight_scale, 2.0**-7))
    cw2 = cpu.build(m, torch.bfloat16)
    assert cw2.corr is None and bool(cw2.scale_zero[..., 1].any())
    assert torch.equal(cpu.dequantize(cw2), m.dequantize())
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert rel_err(CpuQuantLinear(m, cw2)(x), oracle32(x, m)) < BF16_TOL


def test_fp32_activations_compute_in_bf16():
    m = random_qlinear(32, 64, 4, 32, seed=2)
    x = torch.randn(5, 64)
    y = _converted(m)(x)
    assert y.dtype == torch.float32 and rel_err(y, oracle32(x.to(torch.bfloat16), m)) < BF16_TOL


@pytest.mark.parametrize("bits,gs,why", [(3, 32, "4 or 8-bit"), (2, 32, "4 or 8-bit"), (4, 16, "multiple of 32")])
def test_unsupported_layers_keep_the_reference_and_say_why(bits, gs, why):
    model = torch.nn.Sequential(random_qlinear(32, 64, bits, gs, seed=1), random_qlinear(32, 32, 4, 32, seed=2))
    logs = []
    res = to_cpu_kernels(model, torch.bfloat16, log=logs.append)
    assert res["converted"] == ["1"] and why in res["reference"]["0"]
    assert type(model[0]) is QuantLinear and type(model[1]) is CpuQuantLinear
    assert len(logs) == 1 and "1 packed layers" in logs[0] and "1 on the torch reference" in logs[0] and why in logs[0]


def test_fp16_scales_with_bf16_compute_stay_on_the_reference():
    m = random_qlinear(32, 64, 4, 32, scale_dtype=torch.float16, seed=4)
    with pytest.raises(ValueError, match="not exact in torch.bfloat16"):
        cpu.build(m, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 activations"):  # fp16 runs the int4 kernel ~40x slower
        cpu.build(m, torch.float16)


def test_dispatcher_cpu_backend_on_a_plain_module():
    m = random_qlinear(24, 96, 4, 32, symmetric=False, seed=6)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y = kernels.wna16_linear(x, m, backend="cpu")
    assert m.kernel == "cpu" and kernels.last_kernel() == "cpu"
    assert rel_err(y, oracle32(x, m)) < BF16_TOL
    with pytest.raises(UsageError, match="4 or 8-bit"):
        kernels.wna16_linear(x.float(), random_qlinear(24, 96, 3, 32), backend="cpu")


def _int8_linear(N, K, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    m = Int8Linear(K, N, bias=bias)
    m.weight.copy_(torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8))
    m.weight_scale.copy_((torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(m.weight_scale.dtype))
    if bias:
        m.bias.data.copy_(torch.randn(N, generator=g))
    return m


@needs_int8
@pytest.mark.parametrize("N,K,tokens", [(40, 96, 1), (17, 200, 17), (64, 576, 130)])
def test_w8a8_onednn_equals_reference(N, K, tokens):
    m = _int8_linear(N, K, seed=N)
    c = CpuInt8Linear(m)
    assert torch.equal(c.weight, m.weight) and torch.equal(c.state_dict()["weight"], m.state_dict()["weight"])
    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(K))
    # the same int32 accumulators and scales; only the order of two float32 products differs
    torch.testing.assert_close(c(x), reference.int8_linear(x, m.weight, m.weight_scale, m.bias), rtol=1e-5, atol=1e-4)
    assert c.kernel == "cpu"
    xb = x.to(torch.bfloat16)
    assert rel_err(c(xb), reference.int8_linear(xb, m.weight, m.weight_scale, m.bias)) < BF16_TOL


def test_resident_bytes_counts_the_kernel_layout_once():
    m = random_qlinear(64, 256, 4, 64, seed=1)
    model = torch.nn.Sequential(m)
    packed = resident_bytes(model)
    to_cpu_kernels(model, torch.bfloat16, log=lambda *_: None)
    after = resident_bytes(model)
    # int4 codes: 64 x 256 / 2 bytes either way; the (scale, zero) pairs add 4 bytes per group
    assert abs(after - packed) <= 64 * (256 // 64) * 4 + 64 and after < 64 * 256 * 2 * 0.4


@pytest.mark.slow
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no native bf16 arithmetic: compress.load's 'auto' computes in float32 here (the reference)")
def test_load_of_the_demo_w4_export_holds_its_packed_size(tmp_path):
    """compress.load on the CPU keeps the demo's W4 g64 export packed: at most 0.45x the bytes of
    the bf16 model, counted from the loaded modules' tensors. (RTN gives the default job's layout
    and size in seconds; GPTQ differs only in the codes' values.)"""
    from typer.testing import CliRunner

    import compress
    from compress.checkpoint.source import ModelSource, resolve_model
    from compress.cli import app

    out = tmp_path / "w4"
    r = CliRunner().invoke(app, ["quantize", "demo", "-o", str(out), "--method", "rtn", "--bits", "4", "--group-size", "64", "--no-eval"])
    assert r.exit_code == 0, r.output
    logs = []
    model = compress.load(out, log=logs.append)
    assert next(model.parameters()).dtype == torch.bfloat16  # 'auto': the export's dtype
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and all(type(m) is CpuQuantLinear for m in quant), logs
    src = ModelSource(resolve_model("demo"))
    params = sum(p.numel() for p in src.skeleton().parameters())  # tied embeddings counted once
    ratio = resident_bytes(model) / (params * 2)
    assert ratio <= 0.45, f"{ratio:.3f}"
    ids = torch.tensor([[1, 200, 3000, 45, 7]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        exact = compress.load(out, dtype=torch.float32, log=lambda *_: None)(input_ids=ids).logits
        bf16_ref = compress.load(out, dtype=torch.bfloat16, kernel="torch", log=lambda *_: None)(input_ids=ids).logits
    # bf16 through 30 layers moves the logits by ~3% either way: the kernels (exact weights, float32
    # inside) stay at least as close to the float32 reference as the bf16 torch reference does
    assert rel_err(got, exact) <= 1.1 * rel_err(bf16_ref, exact), (rel_err(got, exact), rel_err(bf16_ref, exact))
    assert F.cosine_similarity(got.float().flatten(), exact.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("bits,N,K,gs,sym,act", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_dequantize_of_the_prefill_path_is_the_same_weight(bits, N, K, gs, sym, act, dtype, layout):
    cw = cpu.build(random_qlinear(N, K, bits, gs, sym, g_idx=act, seed=7), torch.bfloat16)
    assert torch.equal(cpu.dequantize_t(cw, dtype), cpu.dequantize(cw, dtype).t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_per_token_quantizer_is_the_reference_bit_for_bit(dtype, layout):
    x = torch.randn(3, 33, 200) * torch.tensor([1e-3, 1.0, 40.0]).reshape(3, 1, 1)
    x[1, 5] = 0  # an all-zero token
    x = x.to(dtype)
    before = x.clone()
    got, want = cpu.quantize_per_token(x), reference.quantize_per_token(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(x, before)  # the input is not modified in place


@needs_int8
def test_w8a8_reuses_the_quantized_input_only_for_the_same_unmodified_tensor():
    a, b = CpuInt8Linear(_int8_linear(24, 64, seed=1)), CpuInt8Linear(_int8_linear(24, 64, seed=2))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ya, yb = a(x), b(x)  # b reuses a's quantized x
    assert torch.equal(yb, b(x.clone()))
    x.mul_(3)  # modified in place: quantized again
    assert rel_err(a(x), reference.int8_linear(x, a.weight, a.weight_scale, a.bias)) < BF16_TOL
    assert not torch.equal(a(x), ya)


@needs_int8
def test_w8a8_in_inference_mode():
    a = CpuInt8Linear(_int8_linear(24, 64, seed=1))
    with torch.inference_mode():
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        y = a(x)
        x.mul_(3)
        assert not torch.equal(a(x), y)


def _w8a8_tiny_llama(tmp_path):
    """The tiny llama with every block Linear W8A8 (RTN int8 per channel), in bf16."""
    from compress.quant.rtn import QuantScheme, rtn_quantize
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from compress.utils import replace_linear

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "llama", "llama"), dtype=torch.bfloat16).eval()
    scheme = QuantScheme(bits=8, group_size=-1, symmetric=True, observer="minmax")
    for name, lin in [(n, m) for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]:
        replace_linear(model, name, Int8Linear.from_result(rtn_quantize(lin.weight.data.float(), scheme), lin.bias))
    return model


@needs_int8
@pytest.mark.skipif(native.missing() is not None, reason=f"compress's CPU kernels unavailable: {native.missing()}")
def test_w8a8_gated_mlps_are_fused_with_the_same_state_and_logits(tmp_path, monkeypatch):
    from compress.checkpoint.cpu_modules import CpuGatedMLP, CpuRMSNorm

    model = _w8a8_tiny_llama(tmp_path)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()  # not SiLU: its MLP computes something else and stays unfused
    keys = {k: v.shape for k, v in model.state_dict().items()}
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = copy.deepcopy(model).float()(ids).logits  # the float32 reference modules
    logs = []
    res = to_cpu_kernels(model, torch.bfloat16, log=logs.append)
    layers = model.model.layers
    assert res["fused_mlps"] == len(layers) - 1 and "gated MLPs fused" in logs[0]
    assert res["norms"] == 2 * len(layers) + 1 and type(model.model.norm) is CpuRMSNorm and "RMSNorms in one pass" in logs[0]
    assert type(layers[1].mlp) is not CpuGatedMLP and all(type(b.mlp) is CpuGatedMLP for i, b in enumerate(layers) if i != 1)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        fused = model(ids).logits.float()
        assert all(m.kernel == "cpu" for m in layers[0].mlp.children() if isinstance(m, CpuInt8Linear))
        monkeypatch.setattr(CpuGatedMLP, "_fused", lambda self: False)  # the children one by one
        unfused = model(ids).logits.float()
    # the fused pass skips the module path's bf16 roundings: no farther from float32 than it
    assert rel_err(fused, unfused) < 2e-2 and rel_err(fused, exact) <= 1.05 * rel_err(unfused, exact)


@pytest.mark.skipif(native.missing() is not None, reason=f"compress's CPU kernels unavailable: {native.missing()}")
def test_an_rmsnorm_with_another_formula_keeps_its_own():
    from compress.checkpoint.cpu_modules import CpuRMSNorm, fuse_norms

    class OnePlusRMSNorm(torch.nn.Module):  # Gemma's: x · (1 + w)
        def __init__(self, K):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(K, dtype=torch.bfloat16))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).to(x.dtype)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = torch.nn.Sequential(OnePlusRMSNorm(64), LlamaRMSNorm(64).to(torch.bfloat16))
    assert fuse_norms(model) == 1 and type(model[0]) is OnePlusRMSNorm and type(model[1]) is CpuRMSNorm
    x = torch.randn(3, 64)
    assert torch.equal(model[1](x), LlamaRMSNorm(64).to(torch.bfloat16)(x))  # float32 input: transformers' formula, exactly


@needs_int8
@pytest.mark.skipif(native.missing() is not None, reason=f"compress's CPU kernels unavailable: {native.missing()}")
@pytest.mark.parametrize("T", [1, 17])
def test_fused_gated_mlp_equals_the_reference_composition(T):
    """cpu.int8_gated_mlp against down(SiLU(gate(x))·up(x)) of the reference int8 linears in
    float32, on odd widths (K = 200, I = 333)."""
    K, I = 200, 333
    gate, up, down = _int8_linear(I, K, seed=1, bias=False), _int8_linear(I, K, seed=2, bias=False), _int8_linear(K, I, seed=3)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)

    def ref(m, v):
        return reference.int8_linear(v, m.weight, m.weight_scale, m.bias)

    want = ref(down, F.silu(ref(gate, x.float())) * ref(up, x.float()))
    got = cpu.int8_gated_mlp(x, *(cpu.build_int8(m.weight, m.weight_scale) for m in (gate, up, down)), down.bias)
    assert got.dtype == torch.bfloat16 and got.shape == (T, K) and rel_err(got, want) < BF16_TOL


@pytest.mark.skipif(native.missing() is not None, reason=f"compress's CPU kernels unavailable: {native.missing()}")
def test_a_replaced_norm_still_differentiates_where_training_needs_it():
    """Distillation trains through a loaded model: a forward autograd must see takes transformers'
    formula (the native kernel records no graph), with transformers' gradients."""
    from compress.checkpoint.cpu_modules import CpuRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64).to(torch.bfloat16)
    ours = CpuRMSNorm(hf)
    x = torch.randn(3, 64).to(torch.bfloat16).requires_grad_()
    y = ours(x)
    assert y.grad_fn is not None
    (g_ours,) = torch.autograd.grad(y.float().sum(), x)
    (g_hf,) = torch.autograd.grad(hf(x).float().sum(), x)
    assert torch.equal(g_ours, g_hf)
    with torch.no_grad():
        assert ours(x).grad_fn is None  # inference: the one-pass kernel
