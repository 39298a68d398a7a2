"""2:4 semi-structured runtime: the checks that run anywhere, and GPU tests that skip without one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import UsageError
from compress.kernels.sparse24 import is_n_m, semi_structured_support, shape_ok, to_semi_structured

ROOT = Path(__file__).resolve().parents[2]


def _capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


gpu = pytest.mark.skipif(not _capable(), reason="needs a CUDA GPU of compute capability >= 8.0 (2:4 sparse tensor cores)")


def _prune_2_4(w):
    g = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    return (g * keep).reshape_as(w)


def test_is_n_m():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 5, 6, 7, 0, 0]])
    assert is_n_m(w)
    w[0, 1] = 9  # three nonzeros in the first group
    assert not is_n_m(w)
    assert not is_n_m(torch.zeros(2, 6))  # 6 inputs: not a multiple of 4
    assert is_n_m(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 2]]), 1, 4)


def test_shape_and_support_reasons_on_cpu():
    assert shape_ok(64, 128, torch.bfloat16) is None
    assert "multiple" in shape_ok(24, 128, torch.bfloat16)
    assert "float16/bfloat16" in shape_ok(64, 128, torch.float32)
    if not torch.cuda.is_available():
        assert "CUDA" in semi_structured_support("cpu", torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cpu_model_stays_dense():
    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    with pytest.raises(UsageError, match="CUDA"):
        to_semi_structured(torch.nn.Sequential(lin))
    assert lin.weight.layout == torch.strided


def test_bench_script_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_sparse.py"), "--cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"dense_ms"' in r.stdout and '"decode_tokens_per_s"' in r.stdout


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_semi_structured_linear_matches_dense(m):
    lin = torch.nn.Linear(256, 128, bias=True).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(_prune_2_4(lin.weight))
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    ref = lin(x)
    res = to_semi_structured(torch.nn.Sequential(lin))
    assert res["converted"] == ["0"]
    torch.testing.assert_close(lin(x), ref, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_load_swaps_in_semi_structured_weights(tmp_path):
    """A 2:4 export loaded on the GPU in bf16 gets semi-structured weights and the same logits."""
    from compress.api import run
    from compress.loading import load
    from compress.recipe import load_recipe
    from conftest import save_tiny

    path = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    run(load_recipe({"model": str(path), "calibration": {"samples": 4, "seq_len": 64}, "passes": [{"magnitude": {"pattern": "2:4"}}],
                     "eval": {"perplexity": None}, "export": {"path": str(out)}}))
    dense = load(out, dtype=torch.bfloat16, device="cuda", kernel="torch")
    sparse = load(out, dtype=torch.bfloat16, device="cuda", kernel="sparse24")
    assert sparse.compress_sparse24["converted"]
    x = torch.randint(0, 300, (2, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=x).logits.float(), dense(input_ids=x).logits.float(), rtol=5e-2, atol=5e-2)
