"""Architectures beyond the llama table: GPT-2's Conv1D, mixture-of-experts (mixtral, qwen2/3-moe),
phi-2, gpt_neox, falcon, bloom. Each on a tiny random model built in memory: the engine runs, the
export reloads in our loader with the logits of the in-memory compressed model, and plain
transformers reads it with the same logits."""

import json

import pytest
import torch
from conftest import compressed_in_memory, save_tiny, tiny_config

from compress.api import run
from compress.arch.adapt import Conv1DLinear, UnfusedExperts, adapt, calibrating
from compress.arch.families import find_blocks, linear_groups
from compress.checkpoint.load import load
from compress.checkpoint.source import ModelSource
from compress.errors import UsageError
from compress.recipe import load_recipe

FAMILIES = ["gpt2", "phi", "gpt_neox", "falcon", "bloom", "mixtral", "qwen2_moe", "qwen3_moe"]
# Plain transformers cannot read a packed export of these: compressed-tensors quantizes nn.Linear
# modules only (gpt2's are Conv1D), and Falcon's weight init reads `.weight` of the packed
# modules. Their dense (pruned) exports are checked in transformers instead.
HF_DENSE_ONLY = {"gpt2", "falcon"}
# transformers loads these packed exports with some tensors in the checkpoint's bfloat16 whatever
# dtype is asked for (renamed keys, merged experts), so they are compared in bfloat16
HF_BF16 = {"gpt_neox", "mixtral"}


def _recipe(model, out, method="gptq"):
    opts = {"gptq": {"bits": 4, "group_size": 16, "symmetric": True}, "wanda": {"pattern": "2:4"}}[method]
    return load_recipe(
        {
            "model": str(model),
            "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
            "passes": [{method: opts}],
            "eval": {"perplexity": None},
            "export": {"path": str(out)},
        }
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _targets(path) -> list[str]:
    """Every Linear of the decoder blocks that a default pass targets (routers excluded)."""
    src = ModelSource(path)
    model = src.skeleton()
    bp, blocks = find_blocks(model, src.config.model_type, src.config.num_hidden_layers)
    return sorted(f"{bp}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules()
                  if isinstance(m, torch.nn.Linear) and not getattr(m, "_compress_router", False))


def test_family_compresses_exports_and_reloads(family, tmp_path):
    fam, path = family
    rec = _recipe(path, tmp_path / "out")
    report = run(rec)
    assert sorted(l["name"] for l in report["layers"]) == _targets(path)
    assert all(0 <= l["rel_output_error"] < 0.05 for l in report["layers"])
    # the family's groups were recognised (true sequential), not the generic one-group fallback
    src = ModelSource(path)
    model = src.skeleton()
    _, blocks = find_blocks(model, src.config.model_type, src.config.num_hidden_layers)
    assert len(linear_groups(blocks[0], src.config.model_type)) > 1
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a = load(tmp_path / "out", dtype=torch.float32)(input_ids=x).logits
        b = compressed_in_memory(path, rec, tmp_path / "mem")(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_plain_transformers_reads_the_export(family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam, path = family
    method = "wanda" if fam in HF_DENSE_ONLY else "gptq"
    run(_recipe(path, tmp_path / "out", method))
    dtype = torch.bfloat16 if fam in HF_BF16 and method == "gptq" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    ours = load(tmp_path / "out", dtype=dtype)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        a, b = hf(input_ids=x).logits.float(), ours(input_ids=x).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:  # two bfloat16 computations of the same weights: within bfloat16's resolution of the logits
        assert (a - b).abs().max() <= 0.1 * b.abs().max()
        if fam == "mixtral":  # and the experts transformers merged are exactly ours
            ex = hf.model.layers[0].mlp.experts
            mine = ours.model.layers[0].block_sparse_moe.experts
            for e, m in enumerate(mine):
                gate_up = torch.cat([m.w1.dense_weight(), m.w3.dense_weight()]).to(torch.bfloat16)
                torch.testing.assert_close(ex.gate_up_proj[e], gate_up, rtol=0, atol=0)
                torch.testing.assert_close(ex.down_proj[e], m.w2.dense_weight().to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe"])
def test_unfused_experts_compute_the_fused_model(fam):
    """The adapted model (one Linear per expert) gives transformers' logits; while calibrating,
    every expert sees every token and the block's output does not change."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(fam), dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        adapt(hf, fam)
        assert any(isinstance(m, UnfusedExperts) for m in hf.modules())
        torch.testing.assert_close(hf(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
        experts = next(m for m in hf.modules() if isinstance(m, UnfusedExperts))
        seen = {}
        hooks = [ex.get_submodule(ex.names[0]).register_forward_pre_hook(lambda m, a, e=e: seen.__setitem__(e, a[0].shape[0]))
                 for e, ex in enumerate(experts)]
        hf(input_ids=x)
        routed = dict(seen)
        seen.clear()
        with calibrating(hf):
            out = hf(input_ids=x).logits
        for h in hooks:
            h.remove()
    assert sum(routed.values()) == x.numel() * hf.config.num_experts_per_tok  # routed: top-k experts per token
    assert seen == {e: x.numel() for e in range(len(experts))}  # calibrating: every expert, every token
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_router_stays_full_precision_unless_named(tmp_path):
    path = save_tiny(tmp_path / "m", "qwen2_moe")
    report = run(_recipe(path, tmp_path / "out"))
    assert not any("shared_expert_gate" in l["name"] for l in report["layers"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.shared_expert_gate" in cfg["ignore"]
    rec = _recipe(path, tmp_path / "out2").model_dump()
    rec["passes"] = [{"rtn": {"bits": 8, "group_size": -1, "targets": ["Linear", "shared_expert_gate"]}}]
    report = run(load_recipe(rec))
    assert any(l["name"].endswith("mlp.shared_expert_gate") for l in report["layers"])


def test_conv1d_is_a_linear_in_memory_and_conv1d_on_disk(tmp_path):
    """GPT-2: the engine sees Linears; a dense export keeps transformers' (in, out) layout."""
    from safetensors import safe_open

    path = save_tiny(tmp_path / "m", "gpt2")
    src = ModelSource(path)
    model = src.skeleton()
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Conv1DLinear) and (layer.in_features, layer.out_features) == (64, 192)
    run(_recipe(path, tmp_path / "out", "wanda"))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as h:
        w = h.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert w.shape == (64, 192)
    assert ((w.T.reshape(192, -1, 4) == 0).sum(-1) >= 2).all()  # 2:4 along the input dimension


def test_unsupported_architecture_names_type_classes_and_families():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Conv2d(2, 2, 1))

    with pytest.raises(UsageError, match=r"'oddformer'.*module classes in the model: Conv2d, Odd, Sequential.*Supported families: .*gpt2.*mixtral"):
        find_blocks(Odd(), "oddformer", 3)
    block = nn.Sequential(nn.Conv2d(2, 2, 1))
    with pytest.raises(UsageError, match=r"no nn.Linear layers.*Conv2d.*Supported families"):
        linear_groups(block, "oddformer")
