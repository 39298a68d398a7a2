"""No export loads in plain transformers as a silently different model.

Every kind of export we write, on tiny models built in memory, is loaded with
``AutoModelForCausalLM.from_pretrained(..., output_loading_info=True)``. Either transformers loads
it whole (no missing, unexpected or mismatched key) and computes what ``compress.load`` computes,
or it refuses to load it (raises). Never a load with missing or randomly initialized weights.

Exports transformers cannot read and would otherwise load with random weights (quantized GPT-2
Conv1D layers, low-rank factors) are made to refuse there (``Exporter._refuse_transformers``), say so
in compress.json and the report, and still load in compress.load.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_tokenizer, save_tiny

from compress.api import Hooks, run
from compress.checkpoint.export import REFUSAL
from compress.checkpoint.load import load
from compress.modules import CompressedLinear
from compress.recipe import load_recipe

LOADS, REFUSES, EITHER = "loads", "refuses", "either"

W4 = {"bits": 4, "symmetric": True}
# name: (model, passes, export options, what transformers must do, compare in dtype)
KINDS = {
    "w4-g32": ("llama", [{"gptq": {**W4, "group_size": 32}}], {}, LOADS),
    "w4-g64": ("llama", [{"gptq": {**W4, "group_size": 64}}], {}, LOADS),
    "w4-g128": ("llama", [{"gptq": {**W4, "group_size": 128}}], {}, LOADS),
    "w4-channel": ("llama", [{"gptq": {**W4, "group_size": -1}}], {}, LOADS),
    "w4-asym": ("llama", [{"gptq": {"bits": 4, "group_size": 32, "symmetric": False}}], {}, LOADS),
    "w4-awq-asym": ("llama", [{"awq": {"bits": 4, "group_size": 32, "symmetric": False}}], {}, LOADS),
    # compressed-tensors >= 0.19 refuses actorder "group" (g_idx); older ones read it
    "w4-act-order-g_idx": ("llama", [{"gptq": {**W4, "group_size": 32, "static_groups": False}}], {}, EITHER),
    "w4-act-order-static": ("llama", [{"gptq": {**W4, "group_size": 32, "act_order": True}}], {}, LOADS),
    "w3": ("llama", [{"gptq": {"bits": 3, "group_size": 32}}], {}, LOADS),
    "w2": ("llama", [{"rtn": {"bits": 2, "group_size": 32}}], {}, LOADS),
    "w8a16": ("llama", [{"gptq": {"bits": 8, "group_size": -1}}], {}, LOADS),
    "w8a8": ("llama", [{"rtn": {"bits": 8, "group_size": -1, "activations": {}}}], {}, LOADS),
    "w4a8": ("llama", [{"gptq": {**W4, "group_size": 32, "activations": {"bits": 8}}}], {}, LOADS),
    "w8a8-smoothquant": ("llama", [{"smoothquant": {}}, {"gptq": {"bits": 8, "group_size": -1, "activations": {}}}], {}, LOADS),
    "2:4": ("llama", [{"wanda": {"pattern": "2:4"}}], {}, LOADS),
    "unstructured": ("llama", [{"sparsegpt": {"sparsity": 0.5}}], {}, LOADS),
    "2:4+w4": ("llama", [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {**W4, "group_size": 32}}], {}, LOADS),
    "lowrank-merged": ("llama", [{"lowrank": {"rank": 16}}], {"lowrank": "merged"}, LOADS),
    "lowrank-factored": ("llama", [{"lowrank": {"rank": 16}}], {}, REFUSES),
    "lowrank-factored+w4": ("llama", [{"lowrank": {"rank": 32}}, {"gptq": {**W4, "group_size": 32}}], {}, REFUSES),
    "moe-w4": ("mixtral", [{"gptq": {**W4, "group_size": 16}}], {}, LOADS),
    "moe-qwen2-w4": ("qwen2_moe", [{"gptq": {**W4, "group_size": 16}}], {}, LOADS),
    "gpt2-w4": ("gpt2", [{"gptq": {**W4, "group_size": 32}}], {}, REFUSES),
    "gpt2-w4-asym": ("gpt2", [{"gptq": {"bits": 4, "group_size": 32, "symmetric": False}}], {}, REFUSES),
    "gpt2-w8a8": ("gpt2", [{"rtn": {"bits": 8, "group_size": -1, "activations": {}}}], {}, REFUSES),
    "gpt2-lowrank-factored": ("gpt2", [{"lowrank": {"rank": 16}}], {}, REFUSES),
    "gpt2-2:4": ("gpt2", [{"wanda": {"pattern": "2:4"}}], {}, LOADS),
    # Falcon's weight init reads `.weight` of the packed modules: transformers raises by itself
    "falcon-w4": ("falcon", [{"gptq": {**W4, "group_size": 16}}], {}, REFUSES),
}
# transformers keeps some tensors of these in the checkpoint's bfloat16 (merged experts): compared in bfloat16
BF16 = {"moe-w4"}


def _wide_llama(path):
    """A llama wide enough for group size 128 (hidden 128, intermediate 256)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tload")
    made = {}

    def get(family):
        if family not in made:
            made[family] = _wide_llama(root / family) if family == "llama" else save_tiny(root / family, family)
        return made[family]

    return get


def _export(models, kind, out):
    family, passes, export, _ = KINDS[kind]
    logs = []
    recipe = load_recipe({"model": str(models(family)), "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2},
                          "passes": passes, "eval": {"perplexity": None}, "export": {"path": str(out), **export}})

    class Logged(Hooks):
        def log(self, msg):
            logs.append(msg)

    report = run(recipe, hooks=Logged())
    return report, logs


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers_loads_the_export_whole_or_refuses_it(models, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report, logs = _export(models, kind, out)
    expect = KINDS[kind][3]
    dtype = torch.bfloat16 if kind in BF16 else torch.float32
    ours = load(out, dtype=dtype, log=lambda *_: None)  # compress.load reads every kind
    x = torch.randint(0, VOCAB, (2, 12))
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    except Exception as e:  # (b): refused
        assert expect in (REFUSES, EITHER), f"{kind}: transformers refused it: {type(e).__name__}: {e}"
        meta = json.loads((out / "compress.json").read_text())
        ours_refusal = meta["runtimes"]["refuses"].get("transformers", {})
        if "how" in ours_refusal:  # our refusal: said in compress.json, the report and the log, with the reason
            assert REFUSAL in str(e) or "size mismatch" in str(e).lower() or "mismatched" in str(e)
            why = ours_refusal["why"]
            assert report["runtimes"] == meta["runtimes"] and "transformers" not in meta["runtimes"]["loads"]
            assert any("transformers does not serve this export" in m and why in m for m in logs), logs
        return
    # (a): loaded whole, and the same model
    assert expect in (LOADS, EITHER), f"{kind}: transformers loaded an export it should refuse ({info})"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], f"{kind}: {info}"
    assert not info.get("error_msgs"), info
    with torch.no_grad():
        a, b = hf.eval()(input_ids=x).logits.float(), ours(input_ids=x).logits.float()
    if dtype == torch.bfloat16:  # two bfloat16 computations of the same weights
        assert (a - b).abs().max() <= 0.05 * b.abs().max(), kind
    elif "a8" in kind:  # both quantize the activations per token at run time; roundings may differ by one step
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    else:  # the same float32 weights; the sums run in another order (merged experts)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert "transformers" in json.loads((out / "compress.json").read_text())["runtimes"]["loads"]


def test_gpt2_export_refused_by_transformers_names_the_reason_and_loads_in_compress(models, tmp_path):
    """The GPT-2 case of issue 22: packed Conv1D layers. transformers raises with our text; the
    config still validates as compressed-tensors everywhere else (vLLM reads it: it ignores
    global_compression_ratio), and compress.load computes what the run measured."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _export(models, "gpt2-w4", out)
    with pytest.raises(Exception, match="global_compression_ratio") as e:
        AutoModelForCausalLM.from_pretrained(out)
    assert REFUSAL in str(e.value)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    meta = json.loads((out / "compress.json").read_text())["runtimes"]
    assert {"vLLM", "compress"} <= set(meta["loads"]) and "transformers" not in meta["loads"] and "Conv1D" in meta["refuses"]["transformers"]["why"]
    m = load(out, log=lambda *_: None)
    assert isinstance(m.transformer.h[0].attn.c_attn, CompressedLinear)  # packed, as stored
