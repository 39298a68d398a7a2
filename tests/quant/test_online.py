"""Online rotations (R4, compress.quant.online) and WnA8 layers (packed weights, int8 inputs)."""

import json

import pytest
import torch
from compress.quant import online
from compress.quant.rtn import QuantScheme, rtn_quantize
from conftest import save_tiny, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress import api
from compress.checkpoint.formats import (
    QuantLinear,
    quantization_config,
    read_quantization_config,
)
from compress.checkpoint.load import load
from compress.cli import app
from compress.errors import InputError, UsageError
from compress.recipe import load_recipe


@pytest.mark.parametrize("n", [128, 1536, 576, 5632, 12 * 20, 64 * 7])
def test_the_factored_rotation_is_orthogonal_with_small_factors(n):
    fs = online.hadamard_factors(n, seed=3)
    assert int(torch.tensor([f.shape[0] for f in fs]).prod()) == n
    for f in fs:
        assert torch.allclose(f @ f.T, torch.eye(f.shape[0], dtype=f.dtype), atol=1e-12)
    r = online.dense(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=r.dtype), atol=1e-10)
    if n in (128, 1536, 576, 240):  # a true Hadamard matrix: every entry ±1/√n
        assert torch.allclose(r.abs(), torch.full_like(r, n**-0.5), atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1536), (3, 5, 128), (7, 5632)])
def test_the_factored_product_equals_the_dense_matrix(shape):
    n = shape[-1]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = online.apply_factored(x, online.signs(n, 1), online.hadamard_factors(n, 1))
    assert torch.allclose(got, x @ online.dense(n, 1), atol=1e-10)
    # and a different seed is a different matrix
    assert not torch.allclose(online.dense(n, 1), online.dense(n, 2))


def test_r4_leaves_the_float_model_unchanged():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    x = torch.randint(0, m.config.vocab_size, (2, 19))
    with torch.no_grad():
        ref = m(input_ids=x).logits
        r = online.dense(128, 5).float()
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight @ r)
        unhooked = m(input_ids=x).logits
        assert online.install(m, online.section(128, 5)) == 2
        got = m(input_ids=x).logits
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (unhooked - ref).abs().max() > 1e-2 * ref.abs().max()  # the hook is what restores the function


def test_a_checksum_this_version_does_not_build_is_refused():
    m = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    with pytest.raises(InputError, match="checksum"):
        online.install(m, {**online.section(128, 5), "checksum": "0" * 16})


def test_a_replaced_linear_keeps_its_online_rotation():
    from compress.utils import replace_linear

    m = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    online.install(m, online.section(128, 0))
    name = "model.layers.1.mlp.down_proj"
    replace_linear(m, name, torch.nn.Linear(128, 64, bias=False))
    assert len(online.rotations_of(m.get_submodule(name))) == 1


def _quant_linear(act_bits):
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    m = QuantLinear.from_result(rtn_quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype=torch.float32)))
    m.act_bits = act_bits
    return m


def test_a_wna8_layer_computes_the_dequantized_weight_on_per_token_int8_inputs():
    m = _quant_linear(8)
    x = torch.randn(5, 96, dtype=torch.float64) * torch.tensor([1.0, 30.0, 0.01, 5.0, 0.0], dtype=torch.float64)[:, None]
    # slow reference: each row's absmax / 127, round half to even, clamp
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)), 0).clamp(-127, 127) * s
    want = xq @ m.dequantize().double().T
    got = m(x.float()).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = _quant_linear(None)(x.float()).double()
    assert (plain - want).abs().max() > 1e-3  # the rounding of the input is there to see
    assert m.spec()["activations"] == {"bits": 8, "dynamic": True} and m.quantizes_activations


def test_wna8_groups_are_stored_pack_quantized_with_input_activations_and_read_back():
    cfg = quantization_config([{"targets": ["Linear"], "bits": 4, "group_size": 64, "symmetric": True, "act_order": False,
                                "activations": {"bits": 8, "dynamic": True}},
                               {"targets": ["re:.*lm_head"], "bits": 8, "group_size": -1, "symmetric": True, "act_order": False,
                                "activations": {"bits": 8, "dynamic": True}}], ignore=[])
    g0, g1 = cfg["config_groups"]["group_0"], cfg["config_groups"]["group_1"]
    assert g0["format"] == "pack-quantized" and g0["input_activations"]["strategy"] == "token"
    assert g1["format"] == "int-quantized"  # W8A8 per channel stays int-quantized
    back = read_quantization_config(cfg)
    assert back["group_0"]["activations"] and back["group_1"]["activations"]
    plain = quantization_config([{"targets": ["Linear"], "bits": 4, "group_size": 64, "symmetric": True, "act_order": False}], ignore=[])
    assert not read_quantization_config(plain)["group_0"]["activations"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("online") / "llama", "llama")


def _recipe(model, out, passes, **export):
    return load_recipe({"model": str(model), "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out), **export}})


W4A8 = {"gptq": {"bits": 4, "group_size": 32, "activations": {"bits": 8}}}


@pytest.fixture(scope="module")
def r4_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("r4") / "w4a8"
    api.run(_recipe(tiny, out, [{"rotate": {"r4": True, "seed": 2}}, W4A8]))
    return out


def test_the_w4a8_r4_export_records_its_rotation_and_only_compress_loads_it(r4_export):
    meta = json.loads((r4_export / "compress.json").read_text())
    assert meta["rotation"]["r4"] == online.section(128, 2)
    assert meta["runtimes"]["loads"] == ["compress"]
    assert {"transformers", "vLLM", "vLLM-CPU"} <= set(meta["runtimes"]["refuses"])
    qc = json.loads((r4_export / "config.json").read_text())["quantization_config"]
    assert all(g["input_activations"]["strategy"] == "token" for g in qc["config_groups"].values())
    with pytest.raises(Exception, match="transformers cannot load this"):
        AutoModelForCausalLM.from_pretrained(r4_export)


def test_the_w4a8_r4_export_reloads_with_its_rotation_and_quantized_inputs(r4_export, tiny):
    m = load(r4_export, dtype=torch.float32, log=lambda *_: None)
    downs = [mod for n, mod in m.named_modules() if n.endswith("mlp.down_proj")]
    assert len(downs) == 2 and all(len(online.rotations_of(d)) == 1 for d in downs)
    assert all(mod.act_bits == 8 for _, mod in m.named_modules() if isinstance(mod, QuantLinear))
    x = torch.randint(0, 320, (2, 29))
    orig = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        got, ref = m(input_ids=x).logits, orig(input_ids=x).logits
        for d in downs:
            d._forward_pre_hooks.clear()
        unrotated = m(input_ids=x).logits
    # near the original function with the rotation, far from it without
    assert (got - ref).norm() < 0.5 * (unrotated - ref).norm()
    fast = load(r4_export, log=lambda *_: None)  # bf16 on the CPU kernels: the same function, to bf16 rounding
    with torch.no_grad():
        assert (fast(input_ids=x).logits.float() - got).norm() < 0.05 * got.norm()


def test_calibration_sees_the_quantized_inputs(tiny, tmp_path):
    """With activations, GPTQ's later layers are solved on what the WnA8 layers before them output."""
    a = api.run(_recipe(tiny, tmp_path / "a", [W4A8]))
    b = api.run(_recipe(tiny, tmp_path / "b", [{"gptq": {"bits": 4, "group_size": 32}}]))
    la = {r["name"]: r for r in a["layers"]} if isinstance(a.get("layers"), list) else a["layers"]
    lb = {r["name"]: r for r in b["layers"]} if isinstance(b.get("layers"), list) else b["layers"]
    assert la.keys() == lb.keys() and la != lb


@pytest.mark.parametrize("passes, export, msg", [
    ([{"rotate": {"r4": True}}], {}, "needs a quantizer after it"),
    ([{"rotate": {"r4": True}}, W4A8], {"target": "vllm"}, "only compress.load"),
    ([{"gptq": {"bits": 4, "group_size": 32, "activations": {"bits": 8}, "budget": 3.5}}], {}, "one weight width"),
])
def test_bad_online_or_wna8_settings_exit_2_before_any_work(tiny, tmp_path, passes, export, msg):
    with pytest.raises((UsageError, ValueError), match=msg):
        api.run(_recipe(tiny, tmp_path / "o", passes, **export))
    assert not (tmp_path / "o").exists()


def test_cli_r4_needs_rotate(tiny, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny), "--r4", "--activations", "8", "-o", str(tmp_path / "o"), "--samples", "4",
                                 "--seq-len", "32"])
    assert r.exit_code == 2 and "--rotate" in r.output
    assert not (tmp_path / "o").exists()



# ---------------------------------------------------------------- the KV cache (compress.quant.kv_cache)


def test_cache_vectors_are_rounded_per_token_and_head():
    from compress.quant.kv_cache import quantize_vectors

    t = torch.randn(2, 3, 5, 16, dtype=torch.float64) * torch.rand(2, 3, 5, 1, dtype=torch.float64) * 10
    t[0, 0, 0] = 0
    for bits, qmax in ((8, 127), (4, 7)):
        got = quantize_vectors(t, bits)
        for idx in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
            v = t[idx]
            s = float(v.abs().max()) / qmax
            want = torch.zeros_like(v) if s == 0 else torch.round(v / s).clamp(-qmax, qmax) * s
            assert torch.allclose(got[idx], want, atol=1e-12)
        assert (got - t).abs().max() > 0


def test_r3_leaves_attention_unchanged_before_rounding():
    import torch.nn.functional as F

    from compress.quant.kv_cache import HeadRotation

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 64, generator=g, dtype=torch.float64) for _ in range(3))
    r3 = HeadRotation(64, 3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = F.scaled_dot_product_attention(r3.rotate(q), r3.rotate(k), v, is_causal=True)
    assert torch.allclose(got, want, atol=1e-10)


def _keys_with_outliers(m):
    """Plant outlier channels in the keys (what makes 4-bit keys hard and R3 useful)."""
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight[::16] *= 40


def test_a_rounded_cache_changes_the_logits_by_its_error_and_r3_reduces_it():
    from compress.quant import kv_cache

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    x = torch.randint(0, cfg.vocab_size, (2, 40))

    def logits(section, r3=None):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
        _keys_with_outliers(m)
        assert kv_cache.install(m, section, r3) == (2 if section else 0)
        with torch.no_grad():
            return m(input_ids=x).logits

    ref = logits(None)
    e8 = (logits({"bits": 8}) - ref).norm()
    e4 = (logits({"bits": 4}) - ref).norm()
    e4r3 = (logits({"bits": 4}, kv_cache.r3_section(cfg, 0)) - ref).norm()
    assert 0 < e8 < e4 and e4r3 < e4


@pytest.fixture(scope="module")
def kv_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "kv4"
    api.run(_recipe(tiny, out, [{"rotate": {"r3": True}}, {"rtn": {"bits": 4, "group_size": 32, "kv_cache": {"bits": 4}}}]))
    return out


def test_the_kv_export_records_the_cache_setting_and_reloads_with_it(kv_export):
    meta = json.loads((kv_export / "compress.json").read_text())
    assert meta["kv_cache"]["bits"] == 4 and meta["rotation"]["r3"]["size"] == 16
    assert "transformers" in meta["runtimes"]["loads"]  # the weights are ordinary: R3 and the cache change none
    m = load(kv_export, dtype=torch.float32, log=lambda *_: None)
    attn = [mod for mod in m.modules() if hasattr(mod, "compress_kv")]
    assert len(attn) == 2 and all(a.compress_kv["bits"] == 4 and a.compress_kv["r3"] is not None for a in attn)
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        full = m(input_ids=x).logits
        plain = load(kv_export, dtype=torch.float32, log=lambda *_: None)
        plain.config._attn_implementation = "sdpa"
        assert not torch.allclose(plain(input_ids=x).logits, full)  # the rounding is applied
        # decoding with the cache: each step's logits equal the full forward's at that position
        out = m(input_ids=x[:, :5], use_cache=True)
        step = m(input_ids=x[:, 5:6], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[:, -1], full[:, 5], atol=1e-4)


@pytest.mark.parametrize("passes, export, msg", [
    ([{"rotate": {"r3": True}}, {"rtn": {"bits": 4, "group_size": 32}}], {}, "set kv_cache"),
    ([{"rtn": {"bits": 4, "group_size": 32, "kv_cache": {"bits": 4}}}], {"format": "gguf", "type": "q4_0"}, "llama.cpp quantizes its"),
])
def test_bad_kv_settings_exit_2_before_any_work(tiny, tmp_path, passes, export, msg):
    with pytest.raises((UsageError, ValueError), match=msg):
        api.run(_recipe(tiny, tmp_path / "o", passes, **export))
    assert not (tmp_path / "o").exists()
