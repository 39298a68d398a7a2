"""Pruning passes end to end on tiny models: patterns in the export, reload in our loader and in
plain transformers with the same logits, joint sparse + quantized export, OWL, bad input."""

import json

import pytest
import torch
from conftest import save_tiny

from compress.api import inspect_checkpoint, run
from compress.checkpoint.load import load
from compress.errors import UsageError
from compress.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("prune") / "llama", "llama")


def _recipe(model, out, passes, samples=8):
    return load_recipe({
        "model": str(model),
        "calibration": {"samples": samples, "seq_len": 64, "batch_size": 4},
        "passes": passes,
        "eval": {"perplexity": None},
        "export": {"path": str(out)},
    })


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


def _assert_pattern(W, pattern, sparsity):
    out_f, in_f = W.shape
    if pattern == "unstructured":
        zeros = (W == 0).sum(1).float()  # every row within one weight of the target
        assert bool(((zeros - sparsity * in_f).abs() <= 1).all()), zeros
    else:
        n, m = map(int, pattern.split(":"))
        assert bool(((W == 0).reshape(out_f, in_f // m, m).sum(-1) >= m - n).all())


def _hf_logits(path, x):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=x).logits


@pytest.mark.parametrize("method, pattern", [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"),
                                             ("wanda", "4:8"), ("magnitude", "2:4")])
def test_prune_export_reload(tiny, tmp_path, method, pattern):
    out = tmp_path / "out"
    opts = {"pattern": pattern} if pattern != "unstructured" else {"sparsity": 0.6}
    report = run(_recipe(tiny, out, [{method: opts}]))
    s = 0.6 if pattern == "unstructured" else 1 - int(pattern[0]) / int(pattern[2])
    layers = report["layers"]
    assert len(layers) == 14 and all(l["info"]["pattern"] == pattern for l in layers)
    assert all(abs(l["info"]["sparsity"] - s) < 0.02 for l in layers)  # achieved, measured on the final weight
    meta = json.loads((out / "compress.json").read_text())["sparsity"]
    assert meta["structure"] == pattern and len(meta["targets"]) == 14 and abs(meta["global_sparsity"] - s) < 0.02
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # pruned alone: a plain checkpoint every tool loads
    assert inspect_checkpoint(out)["sparsity"]["structure"] == pattern

    ours = load(out, dtype=torch.float32)
    for name, lin in _linears(ours).items():
        _assert_pattern(lin.weight, pattern, s)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        a = ours(input_ids=x).logits
    torch.testing.assert_close(_hf_logits(out, x), a, rtol=0, atol=0)


def test_sparsegpt_then_gptq_is_joint_and_keeps_zeros(tiny, tmp_path):
    out = tmp_path / "out"
    report = run(_recipe(tiny, out, [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 16}}]))
    assert all(l["passes"] == ["sparsegpt"] and l["info"]["joint"] == "sparsegpt+gptq" for l in report["layers"])
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["sparsity_config"] == {}  # vLLM-loadable: no declared 2:4
    ours = load(out, dtype=torch.float32)
    packed = {n: m for n, m in ours.named_modules() if type(m).__name__ == "QuantLinear"}
    assert len(packed) == 14
    for m in packed.values():
        _assert_pattern(m.dequantize(), "2:4", 0.5)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        a = ours(input_ids=x).logits
    torch.testing.assert_close(_hf_logits(out, x), a, rtol=1e-3, atol=1e-3)


def test_joint_beats_prune_then_round_on_layer_error(tiny, tmp_path):
    """Unstructured 50% + W4 on the tiny model. (At 2:4 on this random-weight model the joint
    solve is 1% behind prune-then-round; on correlated inputs it is ahead at both patterns,
    tests/prune/test_algorithms.py, and the demo model's figures are in BENCHMARKS.md.)"""
    joint = run(_recipe(tiny, tmp_path / "j", [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 16}}]))
    seq = run(_recipe(tiny, tmp_path / "s", [{"sparsegpt": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 16}}]))
    two = run(_recipe(tiny, tmp_path / "t", [{"sparsegpt": {"sparsity": 0.5, "joint": False}}, {"gptq": {"bits": 4, "group_size": 16}}]))
    assert all(l["passes"] == ["sparsegpt", "gptq"] for l in two["layers"])  # joint: false runs two passes
    err = lambda r: sum(l["rel_output_error"] for l in r["layers"])  # noqa: E731
    assert err(joint) < err(seq)


def test_wanda_then_gptq_keeps_the_mask(tiny, tmp_path):
    out = tmp_path / "out"
    report = run(_recipe(tiny, out, [{"wanda": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 16}}]))
    assert all(l["passes"] == ["wanda", "gptq"] and l["info"]["sparsity"] >= 0.5 for l in report["layers"])
    for m in load(out, dtype=torch.float32).modules():
        if type(m).__name__ == "QuantLinear":
            _assert_pattern(m.dequantize(), "2:4", 0.5)


def test_owl_spreads_sparsity_over_blocks(tiny, tmp_path):
    report = run(_recipe(tiny, tmp_path / "out", [{"wanda": {"sparsity": 0.6, "allocation": "owl", "owl_lambda": 0.1, "owl_m": 3}}]))
    by_block = {}
    for l in report["layers"]:
        by_block.setdefault(l["name"].split(".")[2], set()).add(l["info"]["target_sparsity"])
    assert all(len(v) == 1 for v in by_block.values())  # one sparsity per block
    s = sorted(v.pop() for v in by_block.values())
    assert s[0] != s[1] and sum(s) / 2 == pytest.approx(0.6, abs=1e-6) and s[1] - s[0] == pytest.approx(0.2, abs=1e-6)
    ratios = {l["name"].split(".")[2]: l["info"]["owl_outlier_ratio"] for l in report["layers"]}
    hi = max(ratios, key=ratios.get)  # the block with more outliers keeps more weights
    assert next(l for l in report["layers"] if l["name"].split(".")[2] == hi)["info"]["target_sparsity"] == s[0]


@pytest.mark.parametrize("passes, needle", [
    ([{"wanda": {"sparsity": 1.0}}], "passes.0.wanda.sparsity"),
    ([{"wanda": {"pattern": "4:2"}}], "not a sparsity pattern"),
    ([{"sparsegpt": {"pattern": "2:4", "allocation": "owl"}}], "allocation owl"),
    ([{"magnitude": {"pattern": "2:4", "sparsity": 0.7}}], "contradicts"),
])
def test_bad_prune_config_is_a_usage_error(tiny, tmp_path, passes, needle):
    with pytest.raises(UsageError, match=needle):
        run(_recipe(tiny, tmp_path / "out", passes))
    assert not (tmp_path / "out").exists()


def test_pattern_that_does_not_divide_names_layers(tiny, tmp_path):
    with pytest.raises(UsageError) as e:
        run(_recipe(tiny, tmp_path / "out", [{"magnitude": {"pattern": "3:6"}}]))
    msg = str(e.value)
    assert "pattern 3:6: M 6 does not divide in_features 64 of self_attn.q_proj" in msg and "2:4" in msg and "`ignore`" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_prune_after_quantize_is_refused(tiny, tmp_path):
    with pytest.raises(UsageError, match="pruning pass comes after a quantization pass.*put the pruning pass first"):
        run(_recipe(tiny, tmp_path / "out", [{"gptq": {"bits": 4, "group_size": 16}}, {"wanda": {"sparsity": 0.5}}]))
    assert not (tmp_path / "out").exists()


def test_2_4_checkpoint_on_the_cpu_stays_dense(tiny, tmp_path):
    out = tmp_path / "out"
    run(_recipe(tiny, out, [{"magnitude": {"pattern": "2:4"}}], samples=0))
    model = load(out, dtype=torch.float32)  # automatic: the CPU computes with the dense weights
    assert all(lin.weight.layout == torch.strided for lin in _linears(model).values())
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sparse24.*CUDA"):
            load(out, dtype=torch.bfloat16, kernel="sparse24")
