"""compress.kernels: every backend against the torch oracle, on random inputs of odd shapes.

Triton runs here on the CPU under TRITON_INTERPRET=1 (small shapes); on a machine with a CUDA GPU
the same tests run it compiled, and the `gpu` tests add the CUDA kernel and larger shapes. The
CUDA source is compiled with nvcc wherever nvcc exists, even without a GPU to run it.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton decides to interpret when a function is decorated: triton.language's helpers when
    # triton is first imported, our kernels when compress.kernels.triton_kernels is. tests/conftest.py
    # sets this before any test module imports triton; here for running this file on its own.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import compress.kernels as kernels  # noqa: E402
from compress.checkpoint.formats import QuantLinear, pack_int32  # noqa: E402
from compress.errors import UsageError  # noqa: E402
from compress.kernels import reference  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interpreted_already():
    """True when Triton cannot interpret here: on the CPU, triton (its language helpers) or our
    kernels were imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)."""
    if DEV.type != "cpu" or "triton" not in sys.modules:
        return False
    import triton.language as tl

    mod = sys.modules.get("compress.kernels.triton_kernels")
    kernels_ = [tl.zeros] + ([mod._wna16_kernel] if mod is not None else [])
    return any(type(f).__name__ != "InterpretedFunction" for f in kernels_)


HAS_TRITON = importlib.util.find_spec("triton") is not None and (DEV.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not HAS_TRITON or _interpreted_already(),
                                  reason="triton is not installed, or no CUDA GPU and it cannot interpret (TRITON_INTERPRET=1 not set before triton was imported)")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
# bf16 keeps 8 significant bits: one rounding of the output is a relative error <= 2^-9 per element
TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def random_qlinear(N, K, bits=4, group_size=32, symmetric=True, g_idx=False, bias=False, scale_dtype=torch.bfloat16, seed=0):
    """A QuantLinear with random codes, scales, zero points and (act-order) g_idx."""
    g = torch.Generator().manual_seed(seed)
    m = QuantLinear(K, N, bits, group_size, symmetric, has_g_idx=g_idx, bias=bias, scale_dtype=scale_dtype)
    half, G = 1 << (bits - 1), m.weight_scale.shape[1]
    m.weight_packed.copy_(pack_int32(torch.randint(-half, half, (N, K), generator=g), bits, dim=1))
    m.weight_scale.copy_((torch.rand(N, G, generator=g) * 0.02 + 0.002).to(scale_dtype))
    if not symmetric:
        m.weight_zero_point.copy_(pack_int32(torch.randint(-half, half, (N, G), generator=g), bits, dim=0))
    if g_idx:  # every group used, columns of a group scattered (as act-order produces)
        m.weight_g_idx.copy_((torch.randperm(K, generator=g) % G).to(torch.int32))
    if bias:
        m.bias.data.copy_(torch.randn(N, generator=g))
    return m.to(DEV)


def oracle32(x, m):
    """float32 x @ Ŵᵀ with Ŵ rounded to x's dtype (what every backend must approximate)."""
    w = m.dequantize().to(x.dtype).float()
    b = None if m.bias is None else m.bias.to(x.dtype).float()
    return F.linear(x.float(), w, b)


# ------------------------------------------------------------------ torch reference (the oracle)


def test_quantize_per_token_reference_properties():
    x = torch.randn(4, 3, 37) * torch.tensor([1e-3, 1.0, 50.0]).reshape(1, 3, 1)
    x[1, 2] = 0  # an all-zero token
    xq, xs = reference.quantize_per_token(x)
    assert xq.dtype == torch.int8 and xq.shape == (12, 37) and xs.dtype == torch.float32 and xs.shape == (12, 1)
    flat = x.reshape(12, 37)
    assert torch.equal(xs, flat.abs().amax(1, keepdim=True) / 127)
    assert int(xq.abs().max()) == 127 and torch.equal(xq[5], torch.zeros(37, dtype=torch.int8)) and xs[5].item() == 0
    # round to nearest: the error of each element is at most half a step
    assert bool(((xq.float() * xs - flat).abs() <= xs / 2 * (1 + 1e-6)).all())
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])  # scale 1: halves go to the even neighbour
    assert reference.quantize_per_token(ties)[0].tolist() == [[0, 2, 2, 0, -2, 127]]


@pytest.mark.parametrize("M,K,N", [(1, 8, 8), (5, 37, 24), (17, 64, 40), (33, 100, 8)])
def test_int8_matmul_is_exact(M, K, N):
    g = torch.Generator().manual_seed(M)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    want = a.long() @ b.long().t()
    got = reference.int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    # the float64 fallback (used where torch._int_mm refuses the shape) is exact too
    assert torch.equal((a.double() @ b.double().t()).to(torch.int32).long(), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_linear_reference_approximates_float(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g)
    ws = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / ws).to(torch.int8)
    bias = torch.randn(40, generator=g)
    y = kernels.int8_linear(x, wq, ws, bias, backend="torch")
    assert y.dtype == dtype and y.shape == (2, 5, 40) and kernels.last_kernel() == "torch"
    want = F.linear(x.float(), wq.float() * ws, bias)
    assert rel_err(y, want) < 0.02  # 8-bit activations and weights: about 1% relative error
    # the formula exactly: (acc · xs) · ws + bias
    xq, xs = reference.quantize_per_token(x)
    acc = xq.long() @ wq.long().t()
    assert torch.equal(y.reshape(10, 40), ((acc.float() * xs) * ws.reshape(1, -1) + bias).to(dtype))


def test_wna16_torch_path_is_the_dequantized_linear():
    m = random_qlinear(24, 64, group_size=16, symmetric=False, bias=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=DEV)
    y = m(x)
    assert m.kernel == ("torch" if DEV.type == "cpu" else m.kernel)
    want = F.linear(x, m.dequantize().to(x.dtype), m.bias.to(x.dtype))
    if DEV.type == "cpu":
        assert torch.equal(y, want)  # the CPU path is unchanged bit for bit


# ------------------------------------------------------------------ dispatcher


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.choose(None, cpu, op="wna16", bits=4) == "torch"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.choose(None, cpu, op="w8a8") == "torch"
    monkeypatch.setenv(kernels.ENV, "marlin")
    with pytest.raises(UsageError, match=r"unknown kernel backend 'marlin' \(from the \$COMPRESS_KERNEL\)"):
        kernels.choose(None, cpu, op="wna16", bits=4)
    monkeypatch.delenv(kernels.ENV)
    with pytest.raises(UsageError, match="CUDA device"):
        kernels.choose("cuda", cpu, op="wna16", bits=4)
    with pytest.raises(UsageError, match="no CUDA C\\+\\+ kernel for W8A8"):
        kernels.choose("cuda", cpu, op="w8a8")
    with pytest.raises(UsageError, match="2, 4 or 8-bit"):
        kernels.choose("triton", cpu, op="wna16", bits=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in kernels.missing("triton", cpu, op="wna16", bits=4)


def test_forced_unavailable_backend_raises_from_forward():
    m = random_qlinear(16, 32, group_size=16).cpu()
    m.backend = "cuda"
    with pytest.raises(UsageError, match="kernel backend 'cuda' is unavailable"):
        m(torch.randn(2, 32, dtype=torch.bfloat16))


@needs_triton
def test_backend_precedence_argument_module_env(monkeypatch):
    m = random_qlinear(16, 32, group_size=16)
    x = torch.randn(2, 32, dtype=torch.bfloat16, device=DEV)
    monkeypatch.setenv(kernels.ENV, "triton")
    m(x)
    assert m.kernel == "triton" and kernels.last_kernel() == "triton"
    m.backend = "torch"  # the module's own choice beats the environment
    m(x)
    assert m.kernel == "torch"
    kernels.wna16_linear(x, m, backend="triton")  # an explicit argument beats both
    assert m.kernel == "triton"


@needs_triton
def test_kernel_weights_follow_in_place_loads():
    a, b = random_qlinear(24, 64, seed=1), random_qlinear(24, 64, seed=2)
    x = torch.randn(3, 64, dtype=torch.float16, device=DEV)
    kernels.wna16_linear(x, a, backend="triton")
    a.load_state_dict(b.state_dict())  # copies into the same storage: the cache must notice
    assert rel_err(kernels.wna16_linear(x, a, backend="triton"), oracle32(x, b)) < TOL[torch.float16]


# ------------------------------------------------------------------ Triton vs the oracle

# K = 192 is a multiple of every group size below; 24 has no power-of-two factor >= 16, so it
# takes the per-column gather path; N = 40 and 56 are odd multiples of 8; M = 3 is a decode call
# (split-K over the K tiles), M = 19 a prefill call, neither a multiple of the block.
GROUPS = [-1, 32, 24, "g_idx"]


@needs_triton
@pytest.mark.parametrize("dtype,bits,symmetric,group", list(itertools.product([torch.bfloat16, torch.float16], [4, 8], [True, False], GROUPS)))
def test_triton_wna16_matches_oracle(dtype, bits, symmetric, group):
    act = group == "g_idx"
    m = random_qlinear(40 if bits == 4 else 56, 192, bits, 32 if act else group, symmetric, g_idx=act, bias=not symmetric,
                       scale_dtype=torch.float16 if dtype == torch.float16 and bits == 8 else torch.bfloat16, seed=bits)
    for M in (3, 19):
        x = torch.randn(M, 192, dtype=dtype, device=DEV)
        y = kernels.wna16_linear(x, m, backend="triton")
        assert y.dtype == dtype and y.shape == (M, m.out_features) and m.kernel == "triton"
        assert rel_err(y, oracle32(x, m)) < TOL[dtype], (M, rel_err(y, oracle32(x, m)))
        m.backend = "torch"
        assert rel_err(y, m(x)) < 2 * TOL[dtype]
        m.backend = None


@needs_triton
def test_triton_wna16_split_k_and_shapes():
    """Explicit split-K counts, a K tile past the end, 3-D inputs, int2, fp32 activations."""
    from compress.kernels import triton_kernels as T

    m = random_qlinear(24, 160, 4, 32, False, bias=True, seed=3)
    kw = kernels.kernel_weights(m)
    x = torch.randn(5, 160, dtype=torch.bfloat16, device=DEV)
    want = oracle32(x, m)
    for split in (1, 2, 5, 64):  # 64 is clamped to the number of K tiles
        assert rel_err(T.wna16_gemm(x, kw, m.bias, split_k=split), want) < TOL[torch.bfloat16], split
    x3 = torch.randn(2, 3, 160, dtype=torch.float16, device=DEV)  # 6 tokens: 3 slices of 64 columns, the last one short
    y3 = kernels.wna16_linear(x3, m, backend="triton")
    assert y3.shape == (2, 3, 24) and rel_err(y3, oracle32(x3, m)) < TOL[torch.float16]
    m2 = random_qlinear(8, 64, 2, 16, False, seed=4)
    x32 = torch.randn(4, 64, dtype=torch.float32, device=DEV)
    assert rel_err(kernels.wna16_linear(x32, m2, backend="triton"), oracle32(x32, m2)) < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_quantize_per_token_is_exact(dtype):
    x = (torch.randn(7, 4100) * 3).to(dtype).to(DEV)  # K > 4096: two chunks per row
    x[2] = 0
    x[4, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 127.0])  # ties at scale 1
    x[4, 6:] = 0
    xq, xs = kernels.quantize_per_token(x, backend="triton")
    rq, rs = reference.quantize_per_token(x)
    assert kernels.last_kernel() == "triton"
    assert torch.equal(xs, rs) and torch.equal(xq, rq)


@needs_triton
@pytest.mark.parametrize("M,N,K,dtype,bias", [(1, 24, 48, torch.bfloat16, False), (5, 40, 100, torch.float16, True), (19, 56, 72, torch.bfloat16, True), (70, 8, 64, torch.float32, False)])
def test_triton_int8_linear_matches_reference(M, N, K, dtype, bias):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)
    ws = (torch.rand(N, 1, generator=g) / 100).to(torch.bfloat16).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    y = kernels.int8_linear(x, w, ws, b, backend="triton")
    assert kernels.last_kernel() == "triton" and y.dtype == dtype and y.shape == (M, N)
    want = kernels.int8_linear(x, w, ws, b, backend="torch")
    if DEV.type == "cpu":
        assert torch.equal(y, want)  # exact int32 sums, then the same float32 epilogue
    else:  # the GPU may fuse the epilogue's multiply-add
        assert rel_err(y, want) < 1e-6 if dtype == torch.float32 else rel_err(y, want) < TOL[dtype]


# Run in a fresh process with TRITON_INTERPRET=0: in this one the kernels are interpreted.
SM90_COMPILE = r"""
import warnings
import triton
from triton.backends.compiler import GPUTarget
from compress.kernels import triton_kernels as T

def compile_(fn, sig, consts, cfg):
    blocks = {k: v for k, v in cfg.items() if k.startswith("B")}
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in {**consts, **blocks}}}, constexprs={**consts, **blocks})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)})
    assert ".entry" in k.asm["ptx"]
    print("compiled", fn.__name__)

ptrs = dict(X="*bf16", W="*i32", S="*bf16", Z="*i8", GI="*i32", B="*bf16", Y="*fp32")
ints = {k: "i32" for k in ("M", "N", "K", "KW", "G", "gs", "stride_xm", "stride_ym", "k_per_split")}
flags = dict(HAS_Z=False, HAS_GIDX=False, HAS_BIAS=False, DOT_F32=False, EMULATE_BF16=False)
# decode: int4 symmetric, bf16, split-K partials
compile_(T._wna16_kernel, {**ptrs, **ints}, {**flags, "BITS": 4, "PARTIAL": True}, T.DECODE)
# prefill: int8 with zero points and g_idx, fp16, bias, direct store
fp16 = dict(ptrs, X="*fp16", S="*fp16", B="*fp16", Y="*fp16")
compile_(T._wna16_kernel, {**fp16, **ints}, {**flags, "BITS": 8, "HAS_Z": True, "HAS_GIDX": True, "HAS_BIAS": True, "PARTIAL": False}, T.PREFILL)
compile_(T._quant_kernel, dict(X="*bf16", XQ="*i8", XS="*fp32", K="i32", stride_xm="i32"), {"BLOCK": 4096}, {"num_warps": 8})
compile_(T._int8_gemm_kernel, dict(A="*i8", B="*i8", XS="*fp32", WS="*bf16", BIAS="*fp32", Y="*bf16", M="i32", N="i32", K="i32", stride_ym="i32"),
         {"HAS_BIAS": True, "EMULATE_BF16": False}, T.INT8_DECODE)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_sm90():
    """Compile (no GPU needed) the main variants for an H100: catches what the interpreter
    accepts but the compiler does not (tl.dot tile and dtype rules, reshapes, int8 dots)."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 4


# ------------------------------------------------------------------ CUDA


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="nvcc is not installed")
def test_cuda_source_compiles(tmp_path):
    from compress.kernels import cuda_kernel

    lib = cuda_kernel.compile_source("sm_80", out_dir=tmp_path)
    assert lib.is_file() and lib.stat().st_size > 0 and b"compress_wna16_decode" in lib.read_bytes()
    assert cuda_kernel.compile_source("sm_80", out_dir=tmp_path) == lib  # cached: no second build


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,bits,symmetric,group", list(itertools.product([torch.bfloat16, torch.float16], [4, 8], [True, False], GROUPS)))
def test_cuda_wna16_matches_oracle(dtype, bits, symmetric, group):
    act = group == "g_idx"
    m = random_qlinear(40, 192, bits, 32 if act else group, symmetric, g_idx=act, bias=True, seed=bits)
    for M in (1, 3, 16, 19):
        x = torch.randn(M, 192, dtype=dtype, device=DEV)
        y = kernels.wna16_linear(x, m, backend="cuda")
        assert m.kernel == "cuda" and rel_err(y, oracle32(x, m)) < TOL[dtype]


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_wna16_large_shapes(backend, M):
    m = random_qlinear(4104, 4096, 4, 128, False, bias=False)
    x = torch.randn(M, 4096, dtype=torch.bfloat16, device=DEV)
    assert rel_err(kernels.wna16_linear(x, m, backend=backend), oracle32(x, m)) < TOL[torch.bfloat16]


@gpu
@needs_gpu
def test_gpu_auto_picks_fast_backends():
    m = random_qlinear(64, 128, 4, 32)
    m(torch.randn(1, 128, dtype=torch.bfloat16, device=DEV))
    assert m.kernel in ("cuda", "triton")
    m(torch.randn(64, 128, dtype=torch.bfloat16, device=DEV))
    assert m.kernel == "triton"


# ------------------------------------------------------------------ a compressed model through generate()


def _tiny_compressed(tmp_path):
    from compress.quant.rtn import QuantScheme, rtn_quantize
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from compress.utils import replace_linear

    path = save_tiny(tmp_path / "llama", "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, (name, lin) in enumerate([(n, mod) for n, mod in model.named_modules() if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)]):
        # mix the options across layers: int4/int8, symmetric or not, grouped or per channel
        scheme = QuantScheme(bits=(4, 8)[i % 2], group_size=(16, -1, 32)[i % 3], symmetric=bool(i % 4 < 2), observer="minmax")
        replace_linear(model, name, QuantLinear.from_result(rtn_quantize(lin.weight.data, scheme), lin.bias))
    return model.to(DEV)


@needs_triton
def test_generate_same_tokens_through_dispatcher(tmp_path):
    model = _tiny_compressed(tmp_path)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14
    ids = torch.tensor([[5, 17, 99, 3, 250]], device=DEV)

    def run(backend):
        for m in qls:
            m.backend = backend
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert {m.kernel for m in qls} == {backend}
        return out

    fast = "triton" if DEV.type == "cpu" else None
    ref = run("torch")
    got = run(fast) if fast else run("triton")
    assert torch.equal(got, ref)
    with torch.no_grad():  # and the logits agree closely, not only their argmax
        for m in qls:
            m.backend = "torch"
        a = model(ids).logits
        for m in qls:
            m.backend = "triton"
        b = model(ids).logits
    assert rel_err(b, a) < 1e-5


def test_cli_generate_on_compressed_checkpoint(tmp_path):
    """`compress generate --kernel`: a compressed checkpoint on disk, decoded greedily, same text per backend."""
    from conftest import save_tiny
    from typer.testing import CliRunner

    from compress.api import run
    from compress.cli import app
    from compress.recipe import load_recipe

    src = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "w4"
    run(load_recipe({"model": str(src), "calibration": {"samples": 0}, "passes": [{"rtn": {"bits": 4, "group_size": 16}}],
                     "eval": {"perplexity": None, "baseline": False}, "export": {"path": str(out)}}))
    r = CliRunner()
    res = {}
    for k in (["torch"] + (["triton"] if HAS_TRITON and not _interpreted_already() else [])):
        got = r.invoke(app, ["generate", str(out), "-p", "def f(x): return", "-n", "3", "--kernel", k, "--device", DEV.type, "--json"])
        assert got.exit_code == 0, got.output
        res[k] = json.loads(got.stdout.strip().splitlines()[-1])
        assert res[k]["new_tokens"] == 3 and res[k]["kernels"] == {k: 14}
    assert len({v["text"] for v in res.values()}) == 1
    bad = r.invoke(app, ["generate", str(out), "-p", "x", "--kernel", "cuda" if DEV.type == "cpu" else "marlin"])
    assert bad.exit_code == 2 and "kernel backend" in bad.output


# ------------------------------------------------------------------ codebook (SqueezeLLM) layers


@needs_triton
@pytest.mark.parametrize("bits,N,K", [(3, 37, 100), (2, 24, 64), (4, 17, 200), (8, 16, 40)])
@pytest.mark.parametrize("M", [1, 17, 70])
def test_codebook_triton_gemm_equals_the_lookup_reference(bits, N, K, M):
    """The Triton lookup-dequantize GEMM reads the export's bit streams (3-bit codes crossing byte
    boundaries, K not a multiple of 8) and each row's table as the torch reference does."""
    from compress.quant.codebook_module import CodebookLinear

    g = torch.Generator().manual_seed(bits * K + M)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    tables = torch.sort(torch.randn(N, 1 << bits, generator=g) * 0.05, dim=1).values
    m = CodebookLinear.from_codes(codes, tables, bits, bias=torch.randn(N, generator=g)).to(DEV)
    for dtype, tol in ((torch.bfloat16, 8e-3), (torch.float32, 1e-5)):
        x = torch.randn(M, K, generator=g).to(DEV, dtype)
        m.backend = "torch"
        want = m(x)
        m.backend = "triton"
        got = m(x)
        assert m.kernel == "triton" and got.dtype == dtype and got.shape == (M, N)
        assert rel_err(got, want) < tol
    m.backend = None
    m(x)
    from compress.kernels import codebook_cpu

    cpu_kernel = "cpu" if codebook_cpu.unsupported(bits, x.dtype) is None else "torch"  # the AVX-512 lookup kernel where it runs
    assert m.kernel == ("triton" if DEV.type == "cuda" else cpu_kernel)  # automatic: Triton on CUDA
