"""Trainable views of compressed layers: they compute what the compressed module computes, train
what they should, and commit back without touching what must stay fixed (integer codes, masks)."""

import pytest
import torch
from compress.distill.trainable import commit, prepare
from compress.lowrank.module import LowRankLinear
from compress.quant.rtn import QuantScheme, rtn_quantize
from torch import nn

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.tuning import Int8ScaleTuned, QatLinear, ScaleTuned


def _quant(symmetric=True, bits=4, out=24, inp=64, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    res = rtn_quantize(W, QuantScheme(bits=bits, group_size=16, symmetric=symmetric, observer="minmax"))
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    return QuantLinear.from_result(res, bias=b), W


class _Net(nn.Module):
    """A stand-in decoder: blocks.0 holds a quantized, a pruned, a dense and a low-rank Linear."""

    def __init__(self):
        super().__init__()
        q, _ = _quant(symmetric=False)
        blk = nn.Module()
        blk.q = q
        blk.p = nn.Linear(24, 64, bias=False)
        with torch.no_grad():
            blk.p.weight[:, ::2] = 0  # half the columns pruned
        blk.d = nn.Linear(64, 64)
        blk.lr = LowRankLinear.from_factors(torch.randn(64, 8) * 0.1, torch.randn(8, 64) * 0.1)
        blk.norm = nn.LayerNorm(64)
        self.blocks = nn.ModuleList([blk])
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        b = self.blocks[0]
        h = b.norm(b.d(x) + b.lr(x))
        return self.head(h + b.p(b.q(h)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_tuned_computes_what_the_quantized_layer_computes(symmetric):
    q, _ = _quant(symmetric=symmetric, bias=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = q(x)
        assert torch.allclose(ScaleTuned(q)(x), ref, atol=1e-6)
        assert torch.allclose(QatLinear(q)(x), ref, atol=1e-6)  # re-rounding the dequantized weight finds the same codes


def test_training_scales_keeps_the_codes_and_stores_the_scales_in_their_dtype():
    q, W = _quant(symmetric=False)
    packed, zeros = q.weight_packed.clone(), q.weight_zero_point.clone()
    t = ScaleTuned(q)
    opt = torch.optim.Adam([t.log_scale], lr=1e-2)
    x = torch.randn(64, 64)
    for _ in range(20):
        opt.zero_grad()
        loss = (t(x) - x @ W.T).pow(2).mean()
        loss.backward()
        opt.step()
    back = t.commit()
    assert back is q and torch.equal(q.weight_packed, packed) and torch.equal(q.weight_zero_point, zeros)
    assert q.weight_scale.dtype == torch.bfloat16
    with torch.no_grad():  # the committed module computes what the trained view computed (its forward rounds to bf16 already)
        assert torch.allclose(q(x), t(x), atol=1e-6)


def test_scale_training_lowers_the_layer_error():
    q, W = _quant(symmetric=True, bits=3)
    t = ScaleTuned(q)
    x = torch.randn(256, 64)
    with torch.no_grad():
        before = float((t(x) - x @ W.T).pow(2).mean())
    opt = torch.optim.Adam([t.log_scale], lr=5e-3)
    for _ in range(50):
        opt.zero_grad()
        (t(x) - x @ W.T).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        after = float((t.commit()(x) - x @ W.T).pow(2).mean())
    assert after < 0.95 * before


def test_qat_requantizes_to_valid_codes():
    q, W = _quant(symmetric=False, bits=4)
    t = QatLinear(q)
    with torch.no_grad():
        t.weight.copy_(W)  # move the latent weight to the original: rounding it anew changes codes
    back = t.commit()
    deq = back.dequantize()
    assert torch.allclose(deq, t.fake_weight().detach(), atol=1e-6)  # commit stores what the fake-quant forward computed
    assert (deq - W).abs().max() <= back.weight_scale.float().max() * 8  # codes stayed within the grid's range


def test_int8_scale_tuned_matches_the_w8a8_layer():
    W = torch.randn(16, 32) * 0.05
    res = rtn_quantize(W, QuantScheme(bits=8, group_size=-1, symmetric=True, observer="minmax"))
    m = Int8Linear.from_result(res)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(Int8ScaleTuned(m)(x), m(x), atol=1e-4, rtol=1e-3)


def test_prepare_auto_trains_by_layer_kind_and_keeps_the_mask():
    net = _Net()
    mask = net.blocks[0].p.weight != 0
    dense_before = net.blocks[0].d.weight.detach().clone()
    packed = net.blocks[0].q.weight_packed.clone()
    prep = prepare(net, "auto", pruned={"blocks.0.p"}, blocks_path="blocks")
    assert prep.counts == {"quantized": 1, "qat": 0, "pruned": 1, "lowrank": 2, "dense": 0, "norms": 1}
    assert not net.blocks[0].d.weight.requires_grad and not net.head.weight.requires_grad
    opt = torch.optim.AdamW(prep.parameters(), lr=1e-2)
    x = torch.randn(32, 64)
    for _ in range(5):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        prep.apply_masks()
    commit(net)
    assert isinstance(net.blocks[0].q, QuantLinear) and torch.equal(net.blocks[0].q.weight_packed, packed)
    assert torch.equal(net.blocks[0].p.weight != 0, mask)  # exactly the same sparsity pattern
    assert torch.equal(net.blocks[0].d.weight, dense_before)
    assert not any(p.requires_grad for p in net.parameters())


def test_prepare_modes():
    assert prepare(_Net(), "scales", blocks_path="blocks").counts == {"quantized": 1, "qat": 0, "pruned": 0, "lowrank": 0, "dense": 0, "norms": 1}
    c = prepare(_Net(), "weights", pruned={"blocks.0.p"}, blocks_path="blocks").counts
    assert c["dense"] == 1 and c["pruned"] == 1 and c["lowrank"] == 2  # the head (outside the blocks) stays frozen
    net = _Net()
    prep = prepare(net, "qat", blocks_path="blocks")
    assert prep.counts["qat"] == 1 and isinstance(net.blocks[0].q, QatLinear)
    with pytest.raises(ValueError, match="train"):
        prepare(_Net(), "everything")
