"""Scale folding (AWQ, SmoothQuant) on tiny models of every family, and W8A8 end to end."""

import json

import pytest
import torch
from conftest import save_tiny

from compress.api import run
from compress.arch.families import find_blocks, smooth_points
from compress.arch.smoothing import fold_scales
from compress.checkpoint.load import load
from compress.checkpoint.source import ModelSource, materialize
from compress.data import calibration_windows, load_texts, tokenize
from compress.engine import SweepOptions, compress_blocks
from compress.errors import UsageError
from compress.passes import Context, get_pass
from compress.recipe import load_recipe
from compress.utils import get_module

FAMILIES = ["llama", "qwen2", "mistral", "gemma3_text", "opt"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _full_model(path):
    src = ModelSource(path)
    model = src.skeleton()
    skip = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")} if src.config.tie_word_embeddings else set()
    materialize(model, "", src, skip=skip)
    if skip:
        model.tie_weights()
    return src, model.eval()


def test_folding_alone_keeps_logits(family_model):
    """Random scales at every folding point, norms rounded to bf16 as the export stores them:
    the logits change by float32 noise only."""
    fam, path = family_model
    src, model = _full_model(path)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(input_ids=x).logits
    _, blocks = find_blocks(model, src.config.model_type, src.config.num_hidden_layers)
    g = torch.Generator().manual_seed(0)
    folded = 0
    for block in blocks:
        points, plus_one = smooth_points(block, src.config.model_type)
        for p in points:
            width = get_module(block, p.linears[0]).in_features
            s = torch.exp(torch.empty(width).uniform_(-1, 1, generator=g))  # factors in [1/e, e]
            fold_scales(block, p, s, plus_one, torch.bfloat16)
            folded += 1
            prev = get_module(block, p.prev)
            if not isinstance(prev, torch.nn.Linear):  # the norm holds bf16-exact values
                assert torch.equal(prev.weight, prev.weight.to(torch.bfloat16).float())
    # norm→qkv, norm→mlp and up→down (or fc1→fc2) everywhere; v→o only where KV heads = heads (opt)
    assert folded == len(blocks) * (4 if fam == "opt" else 3)
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _in_memory(path, passes_spec, samples=16):
    """Compress a tiny model in memory with ``passes_spec`` (recipe items); returns the model."""
    rec = load_recipe({"model": str(path), "calibration": {"samples": samples, "seq_len": 64, "batch_size": 4}, "passes": passes_spec})
    src = ModelSource(path)
    model = src.skeleton()
    cal = rec.calibration
    calib = calibration_windows(tokenize(load_texts(cal.data), src.tokenizer), cal.samples, cal.seq_len)
    passes = [get_pass(n)(c, Context(dtype=torch.bfloat16)) for n, c in rec.pass_configs()]
    compress_blocks(src, model, passes, calib, lambda res, inputs: None, SweepOptions(batch_size=cal.batch_size, keep=True))
    skip = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")} if src.config.tie_word_embeddings else set()
    materialize(model, "", src, skip=skip)
    if skip:
        model.tie_weights()
    return model.eval(), calib


def test_smoothquant_folding_leaves_unquantized_logits_unchanged(family_model):
    fam, path = family_model
    _, orig = _full_model(path)
    smoothed, calib = _in_memory(path, [{"smoothquant": {"alpha": 0.8, "fold_into": "all"}}])
    x = calib[:2, :32]
    with torch.no_grad():
        torch.testing.assert_close(smoothed(input_ids=x).logits, orig(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    # and it did fold something: a norm weight changed
    _, blocks = find_blocks(smoothed, fam, 2)
    norm = "self_attn_layer_norm" if fam == "opt" else "input_layernorm"
    _, oblocks = find_blocks(orig, fam, 2)
    assert not torch.equal(get_module(blocks[0], norm).weight, get_module(oblocks[0], norm).weight)


def _outlier_model(tmp_path):
    """A tiny llama whose normed activations carry a few huge channels (as real LLMs do)."""
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "outliers", "llama", seed=1)
    f = path / "model.safetensors"
    sd = load_file(f)
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = sd[f"model.layers.{i}.{norm}.weight"].float()
            w[[3, 17, 42]] *= 40  # three outlier channels feed q/k/v and gate/up
            sd[f"model.layers.{i}.{norm}.weight"] = w.to(torch.bfloat16)
    save_file(sd, f, metadata={"format": "pt"})
    return path


def _block0_error(model, orig, x):
    """‖block0(x) - block0_orig(x)‖² / ‖block0_orig(x)‖² on the same input hidden states."""
    outs = []
    for m in (model, orig):
        got = []
        h = m.model.layers[0].register_forward_hook(lambda mod, a, out: got.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            m(input_ids=x)
        h.remove()
        outs.append(got[0])
    return float(((outs[0] - outs[1]) ** 2).sum() / (outs[1] ** 2).sum())


@pytest.mark.parametrize("objective", ["output", "layer"])
def test_awq_lowers_block_output_error_with_outlier_channels(tmp_path, objective):
    path = _outlier_model(tmp_path)
    _, orig = _full_model(path)
    scheme = {"bits": 3, "group_size": 32, "symmetric": False}
    rtn, calib = _in_memory(path, [{"rtn": {**scheme, "observer": "minmax"}}])
    awq, _ = _in_memory(path, [{"awq": {**scheme, "objective": objective, "clip": False}}])
    x = calib[:4]
    e_rtn, e_awq = _block0_error(rtn, orig, x), _block0_error(awq, orig, x)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_then_gptq_beats_rtn_and_exports_and_reloads(tmp_path):
    path = _outlier_model(tmp_path)
    base = {"model": str(path), "calibration": {"samples": 16, "seq_len": 64, "batch_size": 4},
            "eval": {"perplexity": {"seq_len": 64, "max_windows": 4}},
            "report": {"layer_error": "output"}}  # rtn alone would report weight errors (it needs no data)
    scheme = {"bits": 3, "group_size": 32, "symmetric": False}
    reports = {}
    for name, passes in (
        ("rtn", [{"rtn": {**scheme, "observer": "minmax"}}]),
        ("awq", [{"awq": scheme}]),
        ("awq_gptq", [{"awq": scheme}, {"gptq": scheme}]),
    ):
        out = tmp_path / name
        reports[name] = run(load_recipe({**base, "passes": passes, "export": {"path": str(out)}}))
        rel = [l["rel_output_error"] for l in reports[name]["layers"]]
        reports[name]["mean_err"] = sum(rel) / len(rel)
    assert reports["awq"]["mean_err"] < reports["rtn"]["mean_err"]
    assert reports["awq_gptq"]["mean_err"] < reports["awq"]["mean_err"]
    # AWQ's notes reach the report; the exported scheme is the requested one
    info = reports["awq"]["layers"][0]["info"]
    assert info["awq_ratio"] is not None
    cfg = json.loads((tmp_path / "awq_gptq" / "config.json").read_text())["quantization_config"]
    (grp,) = cfg["config_groups"].values()
    assert grp["weights"]["num_bits"] == 3 and grp["weights"]["group_size"] == 32 and not grp["weights"]["symmetric"]
    # reload == in memory (folded norms are stored exactly as calibrated)
    mem, _ = _in_memory(path, [{"awq": scheme}, {"gptq": scheme}])
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "awq_gptq", dtype=torch.float32)(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)


def test_awq_alone_quantizes_and_with_gptq_defers(tmp_path):
    path = save_tiny(tmp_path / "m", "llama")
    alone, _ = _in_memory(path, [{"awq": {"bits": 4, "group_size": 16}}], samples=8)
    both, _ = _in_memory(path, [{"awq": {"bits": 4, "group_size": 16}}, {"gptq": {"bits": 4, "group_size": 16}}], samples=8)
    from compress.checkpoint.formats import QuantLinear

    for m in (alone, both):
        q = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
        assert len(q) == 14  # 7 Linears × 2 blocks, each quantized exactly once


def test_smoothing_unknown_family_is_a_clear_error(tmp_path, monkeypatch):
    from compress.arch import families

    path = save_tiny(tmp_path / "m", "llama")
    monkeypatch.setitem(families.FAMILIES, "llama", families.replace(families.FAMILIES["llama"], smooth=()))
    with pytest.raises(UsageError, match="no scale-folding points"):
        _in_memory(path, [{"awq": {"bits": 4, "group_size": 16}}], samples=4)


def test_w8a8_recipe_validation():
    with pytest.raises(UsageError, match=r"passes.0.rtn.activations.bits"):
        load_recipe({"passes": [{"rtn": {"bits": 8, "group_size": 64, "activations": {"bits": 6}}}]})
    with pytest.raises(UsageError, match=r"passes.0.smoothquant.alpha"):
        load_recipe({"passes": [{"smoothquant": {"alpha": 1.5}}]})


def test_smoothquant_w8a8_exports_int_quantized_and_reloads(tmp_path):
    from compress.checkpoint.formats import Int8Linear

    path = save_tiny(tmp_path / "m", "qwen2")  # qwen2: Linears with bias
    out = tmp_path / "w8a8"
    w8a8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}
    rec = load_recipe({"model": str(path), "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
                       "passes": [{"smoothquant": {"alpha": 0.5}}, {"gptq": w8a8}],
                       "eval": {"perplexity": {"seq_len": 64, "max_windows": 4}}, "export": {"path": str(out)}})
    report = run(rec)
    assert abs(report["eval"]["model"]["perplexity"] / report["eval"]["baseline"]["perplexity"] - 1) < 0.02
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    (grp,) = cfg["config_groups"].values()
    assert grp["input_activations"]["strategy"] == "token" and grp["input_activations"]["dynamic"] is True
    assert grp["weights"]["strategy"] == "channel" and grp["weights"]["num_bits"] == 8
    from safetensors import safe_open

    shard = out / "model.safetensors"  # the whole export fits one shard
    with safe_open(str(shard), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        assert w.dtype == torch.int8 and f.get_tensor("model.layers.1.mlp.down_proj.weight_scale").shape == (64, 1)
    assert shard.exists()
    model = load(out, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14
    mem, _ = _in_memory(path, [{"smoothquant": {"alpha": 0.5}}, {"gptq": w8a8}], samples=8)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)
    assert report["export"]["bits_per_parameter"] > 8


def test_int8_linear_is_exact_integer_arithmetic():
    """y = (x_q · w_qᵀ in int32) · s_x · s_w: checked against float64 on values where float64
    is exact."""
    from compress.checkpoint.formats import Int8Linear

    torch.manual_seed(0)
    m = Int8Linear(40, 24, bias=True, scale_dtype=torch.bfloat16)
    m.weight.copy_(torch.randint(-128, 128, (24, 40), dtype=torch.int8))
    m.weight_scale.copy_(torch.rand(24, 1).to(torch.bfloat16) / 50)
    m.bias.data.normal_()
    x = torch.randn(3, 5, 40)
    y = m(x)
    xs = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / xs), -128, 127)
    ref = (xq.double() @ m.weight.double().T) * xs.double() * m.weight_scale.double().T + m.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_transformers_loads_awq_and_w8a8_exports(tmp_path):
    """transformers + compressed-tensors read both exports: AWQ (pack-quantized, folded norms)
    gives our logits; W8A8 (int-quantized) gives them up to the activation rounding, which
    transformers' CPU path does its own way."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama")
    w8a8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}
    x = torch.randint(0, 300, (2, 16))
    for passes, atol in (([{"awq": {"bits": 4, "group_size": 16, "symmetric": False}}], 1e-4),
                         ([{"smoothquant": {"alpha": 0.5}}, {"rtn": w8a8}], 3e-2)):
        out = tmp_path / next(iter(passes[0]))
        run(load_recipe({"model": str(path), "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4}, "passes": passes,
                         "eval": {"perplexity": None}, "export": {"path": str(out)}}))
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=x).logits, load(out, dtype=torch.float32)(input_ids=x).logits, rtol=0, atol=atol)
