"""Structured pruning (compress.prune.structured / importance / shapes) against the obvious oracle:
a model with the removed heads, channels, hidden dimensions and blocks zeroed computes what the
pruned model computes (before any repair); the repair lowers the output error; shapes and GQA
groups stay consistent; the pruned config loads in plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.prune.importance import collect
from compress.prune.shapes import Shape, build, count_params, select, shape_problem
from compress.prune.structured import Keep, UnknownCoupling, head_dim, lstsq_repair, mlp_groups, prune_state
from tests.conftest import VOCAB, tiny_config

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"]


def _model(family, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.rms_norm_eps = 1e-12  # a norm over fewer dimensions differs from the zeroed one only through eps
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init: norms at 1 and a residual stream of std 0.02, where the norms' eps shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p) * 0.5)
        m.get_input_embeddings().weight.mul_(50)
    return m


def _zero_removed(model, keep: Keep) -> None:
    """The oracle: the removed structures' contributions zeroed in place in the original model."""
    cfg, sd = model.config, dict(model.named_parameters())
    d, nq = head_dim(cfg), cfg.num_attention_heads
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            o = sd[p + "self_attn.o_proj.weight"]
            if i not in keep.layers:  # the block adds nothing to the residual stream
                o.zero_()
                for n, t in sd.items():
                    if n.startswith(p + "mlp.") and "down_proj" in n:
                        t.zero_()
                continue
            if i in keep.heads:
                gone = sorted(set(range(nq)) - set(keep.heads[i].tolist()))
                for h in gone:
                    o[:, h * d:(h + 1) * d] = 0
            for prefix in mlp_groups(dict(model.state_dict()), i):
                idx = keep.mlp.get((i, prefix))
                if idx is None:
                    continue
                down = sd[p + prefix + "down_proj"] if prefix == "mlp.experts." else sd[p + prefix + "down_proj.weight"]
                if prefix == "mlp.experts.":
                    for e in range(down.shape[0]):
                        mask = torch.ones(down.shape[-1], dtype=torch.bool)
                        mask[idx[e]] = False
                        down[e][:, mask] = 0
                else:
                    mask = torch.ones(down.shape[-1], dtype=torch.bool)
                    mask[idx] = False
                    down[:, mask] = 0
        if keep.hidden is not None:
            gone = torch.ones(cfg.hidden_size, dtype=torch.bool)
            gone[keep.hidden] = False
            sd["model.embed_tokens.weight"][:, gone] = 0
            for n, t in sd.items():
                if n.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")):
                    t[gone] = 0
                elif n.endswith("experts.down_proj"):
                    t[:, gone] = 0


def _keep(cfg, state, seed=1) -> Keep:
    """A random Keep that removes some of everything: a block, a key/value group (and a query head
    of each remaining group where groups have several), MLP channels, hidden dimensions."""
    g = torch.Generator().manual_seed(seed)
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    rep = nq // nkv
    keep = Keep(layers=[1])
    keep.hidden = torch.randperm(cfg.hidden_size, generator=g)[:48].sort().values
    groups = torch.tensor([1])
    keep.kv_heads[1] = groups
    keep.heads[1] = torch.cat([gr * rep + torch.randperm(rep, generator=g)[: max(1, rep - 1)].sort().values for gr in groups.tolist()])
    for prefix in mlp_groups(state, 1):
        key = f"model.layers.1.{prefix}down_proj" + ("" if prefix == "mlp.experts." else ".weight")
        t = state[key]
        n = t.shape[-1]
        if prefix == "mlp.experts.":
            keep.mlp[(1, prefix)] = torch.stack([torch.randperm(n, generator=g)[: n // 2].sort().values for _ in range(t.shape[0])])
        else:
            keep.mlp[(1, prefix)] = torch.randperm(n, generator=g)[: n // 2].sort().values
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_zeroed(family):
    model = _model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keep = _keep(model.config, state)
    _zero_removed(model, keep)
    x = torch.randint(0, VOCAB, (2, 12))
    stats = collect(model, x)  # on the zeroed model: the removed hidden dims are zero at every norm
    pruned = build({k: v.clone() for k, v in model.state_dict().items()}, model.config, keep, stats, repair=False)
    assert pruned.config.num_hidden_layers == 1 and pruned.config.hidden_size == 48
    assert pruned.config.num_attention_heads % pruned.config.num_key_value_heads == 0
    with torch.no_grad():
        want, got = model(input_ids=x).logits, pruned(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert count_params(pruned.config) == sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())


def test_pruned_config_reloads_in_transformers(tmp_path):
    model = _model("qwen2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 16))
    stats = collect(model, x)
    pruned = build(state, model.config, select(state, model.config, stats, Shape(48, 2, 1, 96, 1)), stats)
    pruned.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, pruned(input_ids=x).logits)
    assert again.config.head_dim == 16 and again.config.intermediate_size == 96


def test_depth_pruning_keeps_cache_and_rotary():
    """A pruned model generates the same with the KV cache as recomputing every position (the
    renumbered blocks own their cache slots), on a family with sliding and full layers."""
    model = _model("gemma3_text")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (1, 20))
    stats = collect(model, x)
    pruned = build(state, model.config, select(state, model.config, stats, Shape(64, 4, 2, 128, 1)), stats)
    assert pruned.config.num_hidden_layers == 1 and len(pruned.config.layer_types) == 1
    with torch.no_grad():
        cached = pruned.generate(x[:, :8], max_new_tokens=10, do_sample=False, use_cache=True)
        plain = pruned.generate(x[:, :8], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_gqa_groups_stay_consistent():
    """Removing a query head per group: each kept query head still reads its own key/value head."""
    model = _model("llama")
    cfg = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect(model, torch.randint(0, VOCAB, (2, 16)))
    keep = select(state, cfg, stats, Shape(64, 2, 2, 128, 2))
    for i in keep.layers:  # 4 heads in 2 groups of 2 -> one head of each group
        assert (keep.heads[i] // 2).tolist() == keep.kv_heads[i].tolist() == [0, 1]
    keep = select(state, cfg, stats, Shape(64, 2, 1, 128, 2))  # a whole group: both its heads
    for i in keep.layers:
        g = keep.kv_heads[i].item()
        assert keep.heads[i].tolist() == [2 * g, 2 * g + 1]


def test_repair_lowers_output_error():
    torch.manual_seed(0)
    W, X = torch.randn(16, 32), torch.randn(200, 32) @ torch.randn(32, 32)
    H, kept = X.T @ X, torch.arange(0, 32, 2)
    plain = W.clone()
    plain[:, 1::2] = 0
    fixed = lstsq_repair(W, H, kept)
    assert (fixed[:, 1::2] == 0).all()
    err = lambda w: float(((X @ (W - w).T) ** 2).sum())
    assert err(fixed) < 0.5 * err(plain)
    # the oracle: ordinary least squares on the kept columns
    ref = torch.linalg.lstsq(X[:, kept].double(), (X @ W.T).double()).solution.T
    assert err(fixed) <= err(torch.zeros_like(W).index_copy(1, kept, ref.float())) * 1.05


def test_repair_lowers_model_error():
    model = _model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (4, 32))
    stats = collect(model, x)
    keep = select(state, model.config, stats, Shape(48, 2, 1, 64, 2))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        errs = [float(((build(state, model.config, keep, stats, repair=r)(input_ids=x).logits - ref) ** 2).mean()) for r in (False, True)]
    assert errs[1] < errs[0]


def test_shape_problems_and_unknown_family():
    cfg = tiny_config("llama")
    assert shape_problem(cfg, Shape(64, 4, 2, 128, 2)) is None
    assert "at least 1 block" in shape_problem(cfg, Shape(64, 4, 2, 128, 0))
    assert "multiple of 2" in shape_problem(cfg, Shape(60, 3, 2, 128, 2))
    assert "more than the model's 2" in shape_problem(cfg, Shape(64, 4, 1, 128, 2))
    assert "multiple of the head count (e.g. 63 or 66)" in shape_problem(cfg, Shape(64, 3, 1, 128, 2))
    with pytest.raises(UnknownCoupling, match="gpt2"):
        prune_state({}, tiny_config("gpt2"), Keep(layers=[0]))


def test_taylor_importance():
    """LLM-Pruner's first-order importance |Σ w·∂L/∂w|: a head whose o_proj columns are zero scores
    exactly 0, and a shape selected by it builds."""
    from compress.prune.importance import collect_grads, head_scores

    model = _model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 of layer 0 (head_dim 16)
    x = torch.randint(0, VOCAB, (2, 16))
    stats = collect(model, x)
    stats.grads = collect_grads(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = head_scores(state, model.config, stats, 0)
    assert scores[1] == 0 and (scores[[0, 2, 3]] > 0).all()
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # left as it was found
    pruned = build(state, model.config, select(state, model.config, stats, Shape(48, 2, 2, 64, 1)), stats)
    assert pruned(input_ids=x).logits.shape == (2, 16, VOCAB)
