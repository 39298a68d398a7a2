"""group_size: auto (the recipe's and the CLI's default): a size per layer that divides it, each
distinct size its own compressed-tensors config group, loadable by us and by transformers."""

import json

import pytest
import torch
from compress.quant.passes import QuantConfig, auto_group_size
from conftest import save_tiny

from compress.api import inspect_checkpoint, run
from compress.checkpoint.load import load
from compress.recipe import load_recipe


@pytest.mark.parametrize("in_features, want", [(4096, 128), (576, 64), (1536, 128), (64, 64), (48, 16), (1000, -1), (100, -1)])
def test_auto_picks_the_largest_power_of_two_up_to_128_that_divides(in_features, want):
    assert auto_group_size(in_features) == want
    assert QuantConfig().group_for(in_features) == want  # auto is the default
    assert QuantConfig(group_size=32).group_for(in_features) == 32


def test_w8a8_auto_is_per_channel_and_numbers_stay_strict():
    assert QuantConfig(bits=8, activations={"bits": 8}).group_size == -1
    assert QuantConfig(group_size="64").group_size == 64
    with pytest.raises(ValueError, match="auto, -1"):
        QuantConfig(group_size=0)


def test_mixed_group_sizes_export_as_separate_groups_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama")  # in_features 64 (attention, gate/up) and 128 (down_proj)
    cfg = load_recipe({"model": str(path), "calibration": {"samples": 4, "seq_len": 32},
                       "passes": [{"gptq": {"bits": 4}}], "eval": {"perplexity": None}, "export": {"path": str(tmp_path / "o")}})
    assert cfg.resolved()["passes"][0]["gptq"]["group_size"] == "auto"
    run(cfg)
    out = tmp_path / "o"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    sizes = {g["weights"]["group_size"]: g["targets"] for g in qc["config_groups"].values()}
    assert set(sizes) == {64, 128}
    assert all(t.endswith("down_proj") for t in sizes[128]) and not any(t.endswith("down_proj") for t in sizes[64])
    ours = load(out, log=lambda *_: None, dtype=torch.float32)
    assert {m.group_size for n, m in ours.named_modules() if n.endswith("down_proj")} == {128}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-3, atol=1e-3)
    assert {s["group_size"] for s in inspect_checkpoint(out)["schemes"]} == {64, 128}
