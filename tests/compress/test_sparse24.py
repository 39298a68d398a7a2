"""2:4 semi-structured runtime: the checks that run anywhere, and GPU tests that skip without one."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.errors import UsageError
from compress.kernels.sparse24 import (
    is_n_m,
    semi_structured_support,
    shape_ok,
    to_semi_structured,
)

ROOT = Path(__file__).resolve().parents[2]


def _bench_sparse():
    """benchmarks/bench_sparse.py, imported by path (the benchmark scripts are not installed)."""
    spec = importlib.util.spec_from_file_location("bench_sparse", ROOT / "benchmarks" / "bench_sparse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prune_2_4 = _bench_sparse().prune_2_4


def _capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


gpu = pytest.mark.skipif(not _capable(), reason="needs a CUDA GPU of compute capability >= 8.0 (2:4 sparse tensor cores)")


def test_is_n_m():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 5, 6, 7, 0, 0]])
    assert is_n_m(w)
    w[0, 1] = 9  # three nonzeros in the first group
    assert not is_n_m(w)
    assert not is_n_m(torch.zeros(2, 6))  # 6 inputs: not a multiple of 4
    assert not is_n_m(torch.zeros(8))  # not a 2-D weight
    assert is_n_m(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 2]]), 1, 4)


def test_prune_2_4_keeps_the_two_largest():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 1.0, -1.5, 0.2]])
    assert torch.equal(prune_2_4(w), torch.tensor([[0.0, -3.0, 2.0, 0.0, 4.0, 0.0, -1.5, 0.0]]))
    assert is_n_m(prune_2_4(torch.randn(24, 40)))


def test_shape_ok():
    assert shape_ok(64, 128, torch.bfloat16) is None  # a multiple of both backends' minimum
    assert shape_ok(4096, 14336, torch.float16) is None
    assert "multiple" in shape_ok(24, 128, torch.bfloat16)
    assert "multiple" in shape_ok(64, 100, torch.bfloat16)
    assert "multiple" in shape_ok(0, 128, torch.bfloat16)  # below the minimum
    assert "float16/bfloat16" in shape_ok(64, 128, torch.float32)


def test_support_reasons_off_cuda():
    assert "CUDA" in semi_structured_support("cpu", torch.bfloat16)
    assert "CUDA" in semi_structured_support(torch.device("cpu"), torch.float32)


def test_cpu_model_stays_dense():
    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(prune_2_4(lin.weight))
    with pytest.raises(UsageError, match="CUDA"):
        to_semi_structured(torch.nn.Sequential(lin))
    assert lin.weight.layout == torch.strided and type(lin.weight) is torch.nn.Parameter


def test_unknown_names_are_reported_not_converted():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert to_semi_structured(model, names=["7"]) == {"converted": [], "skipped": {"7": "not a plain nn.Linear of the model"}}


def test_bench_script_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sparse.py"), "--cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"dense_ms"' in r.stdout and '"decode_tokens_per_s"' in r.stdout


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_semi_structured_linear_matches_dense(m):
    lin = torch.nn.Linear(256, 128, bias=True).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(prune_2_4(lin.weight))
    w = lin.weight.detach().clone()
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    res = to_semi_structured(torch.nn.Sequential(lin))
    assert res == {"converted": ["0"], "skipped": {}}
    assert isinstance(lin.weight.data, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_tiny_llama_logits_match_after_conversion():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to("cuda").eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.startswith("model.layers.") and type(m) is torch.nn.Linear:
                m.weight.copy_(prune_2_4(m.weight))
        x = torch.randint(0, cfg.vocab_size, (2, 48), device="cuda")
        dense = model(input_ids=x).logits.float()
        decoder = [n for n, m in model.named_modules() if n.startswith("model.layers.") and type(m) is torch.nn.Linear]
        res = to_semi_structured(model, names=decoder)
        assert len(res["converted"]) == 2 * 7 and not res["skipped"]  # q k v o gate up down per layer
        sparse = model(input_ids=x).logits.float()
    assert (sparse - dense).norm() / dense.norm() < 2e-2  # bf16 rounding, not a different model


@gpu
@pytest.mark.gpu
def test_load_swaps_in_semi_structured_weights(tmp_path):
    """A 2:4 export loaded on the GPU in bf16 gets semi-structured weights and the same logits."""
    from conftest import save_tiny

    from compress.api import run
    from compress.checkpoint.load import load
    from compress.recipe import load_recipe

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
