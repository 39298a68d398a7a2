"""The pruning algorithms against slow, obvious references, on small matrices with correlated inputs."""

import pytest
import torch
from compress.prune.magnitude import magnitude_prune
from compress.prune.owl import outlier_ratio, owl_sparsities
from compress.prune.pattern import Pattern, keep_n_of_m, parse_pattern, prune_count
from compress.prune.sparsegpt import sparsegpt_prune
from compress.prune.wanda import wanda_prune
from compress.quant.gptq import gptq_quantize
from compress.quant.rtn import QuantScheme, rtn_quantize


def _data(out_f=24, in_f=64, tokens=512, seed=0):
    """W (out, in) and correlated inputs X (tokens, in) with a few loud channels, H = XᵀX."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = torch.randn(tokens, in_f, generator=g) @ mix
    X *= torch.exp(torch.randn(in_f, generator=g))  # channel scales spread over orders of magnitude
    X[:, ::7] *= 6  # and outlier channels, as LLM activations have
    W = torch.randn(out_f, in_f, generator=g)
    return W, X, X.T @ X


def _out_err(W, Wh, X):
    return float(((X @ (W - Wh).T) ** 2).sum())


def _assert_pattern(mask, sparsity, pattern):
    out_f, in_f = mask.shape
    if pattern.structured:
        zeros = (~mask).reshape(out_f, in_f // pattern.m, pattern.m).sum(-1)
        assert bool((zeros >= pattern.m - pattern.n).all())
    else:
        per_row = (~mask).sum(1).float()
        assert bool(((per_row - sparsity * in_f).abs() <= 1).all()), per_row


# ---------------------------------------------------------------- patterns


def test_parse_pattern():
    assert parse_pattern("2:4") == Pattern(2, 4) and str(parse_pattern(" 4 : 8 ")) == "4:8"
    assert not parse_pattern("unstructured").structured
    for bad in ("4:2", "0:4", "2:2", "2-4", "half"):
        with pytest.raises(ValueError, match="not a sparsity pattern"):
            parse_pattern(bad)


def test_prune_counts_add_up_per_row():
    for s in (0.3, 0.5, 0.7, 0.9):
        edges = [0, 128, 256, 384, 512, 576]
        assert sum(prune_count(s, a, b) for a, b in zip(edges, edges[1:])) == round(s * 576)


def test_keep_n_of_m_against_loop():
    score = torch.randn(5, 16)
    mask = keep_n_of_m(score, 2, 4)
    for r in range(5):
        for g in range(4):
            grp = score[r, 4 * g : 4 * g + 4]
            want = set(torch.argsort(grp, descending=True)[:2].tolist())
            assert set(torch.nonzero(mask[r, 4 * g : 4 * g + 4]).flatten().tolist()) == want


# ---------------------------------------------------------------- magnitude and wanda


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "1:4"])
def test_magnitude_against_sorting_each_row(pattern):
    p = parse_pattern(pattern)
    W, _, _ = _data()
    s = 0.6 if not p.structured else p.sparsity
    Wp, mask = magnitude_prune(W, s, p)
    _assert_pattern(mask, s, p)
    assert torch.equal(Wp, W * mask)
    if not p.structured:  # the reference: sort each row, drop its round(s·in) smallest |w|
        for r in range(W.shape[0]):
            dropped = torch.argsort(W[r].abs())[: round(s * W.shape[1])]
            assert set(torch.nonzero(~mask[r]).flatten().tolist()) == set(dropped.tolist())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_against_elementwise_score(pattern):
    p = parse_pattern(pattern)
    W, X, H = _data()
    sq = (X * X).sum(0)
    Wp, mask = wanda_prune(W, sq, 0.5, p)
    _assert_pattern(mask, 0.5, p)
    score = torch.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            score[i, j] = abs(W[i, j]) * X[:, j].norm()
    for r in range(W.shape[0]):
        if p.structured:
            for g in range(0, W.shape[1], 4):
                keep = set((g + torch.argsort(score[r, g : g + 4], descending=True)[:2]).tolist())
                assert set(torch.nonzero(mask[r, g : g + 4]).flatten().add(g).tolist()) == keep
        else:
            dropped = set(torch.argsort(score[r])[:32].tolist())
            assert set(torch.nonzero(~mask[r]).flatten().tolist()) == dropped


# ---------------------------------------------------------------- SparseGPT


def _sparsegpt_reference(W, H, sparsity, pattern, blocksize, damp=0.01):
    """Naive float64 OBS: the exact inverse Hessian of the not-yet-fixed columns at every step
    (no Cholesky, no lazy updates); masks chosen at each block's first column by w² / [H_F⁻¹]_cc
    with F = columns c.. (the quantity SparseGPT's Cholesky row gives)."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    mask = torch.ones_like(W, dtype=torch.bool)
    step = pattern.m if pattern.structured else blocksize
    for j in range(n):
        if j % step == 0:
            b = min(j + step, n)
            d = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, b)])
            score = W[:, j:b] ** 2 / d  # the OBS saliency w² / [H_F⁻¹]_cc
            if pattern.structured:
                mask[:, j:b] = keep_n_of_m(score, pattern.n, pattern.m)
            else:
                k = prune_count(sparsity, j, b)
                for r in range(W.shape[0]):
                    mask[r, j + torch.argsort(score[r])[:k]] = False
        Hinv = torch.linalg.inv(H[j:, j:])  # (n - j, n - j): the remaining columns
        q = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j]))
        err = (W[:, j] - q) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0][None, :]
        W[:, j] = q
    return W.float(), mask


@pytest.mark.parametrize("pattern, blocksize", [("unstructured", 16), ("unstructured", 24), ("2:4", 16)])
def test_sparsegpt_against_naive_obs(pattern, blocksize):
    p = parse_pattern(pattern)
    W, X, H = _data(out_f=12, in_f=48)
    s = 0.5
    res = sparsegpt_prune(W, H, s, p, blocksize=blocksize)
    ref_W, ref_mask = _sparsegpt_reference(W, H, s, p, blocksize - (blocksize % 4 if p.structured else 0))
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight, ref_W, atol=2e-3, rtol=2e-3)
    assert torch.equal(res.weight == 0, ~res.mask)
    _assert_pattern(res.mask, s, p)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)])
def test_output_error_sparsegpt_below_wanda_below_magnitude(pattern, sparsity):
    p = parse_pattern(pattern)
    W, X, H = _data(out_f=64, in_f=128, tokens=2048)
    e_mag = _out_err(W, magnitude_prune(W, sparsity, p)[0], X)
    e_wanda = _out_err(W, wanda_prune(W, (X * X).sum(0), sparsity, p)[0], X)
    res = sparsegpt_prune(W, H, sparsity, p)
    e_sgpt = _out_err(W, res.weight, X)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    _assert_pattern(res.mask, sparsity, p)


@pytest.mark.parametrize("act_order, static", [(False, True), (False, False)])
def test_sparsegpt_without_pruning_is_gptq(act_order, static):
    """Sparsity 0 with a quantization scheme: every mask step keeps everything, and the loop is
    GPTQ's, bit for bit (one solver, two steps). (Unstructured SparseGPT visits columns in
    natural order, so the comparison is with GPTQ in natural order.)"""
    W, X, H = _data(out_f=16, in_f=64)
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False, scale_dtype=torch.float32)
    res = sparsegpt_prune(W, H, 0.0, Pattern(), blocksize=32, act_order=act_order, scheme=scheme, static_groups=static)
    ref = gptq_quantize(W, H, scheme, blocksize=32, act_order=act_order, static_groups=static)
    assert bool(res.mask.all())
    assert torch.equal(res.quant.q, ref.q) and torch.equal(res.quant.scale, ref.scale) and torch.equal(res.quant.g_idx, ref.g_idx)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_sparse_quant_beats_prune_then_round(pattern):
    p = parse_pattern(pattern)
    W, X, H = _data(out_f=64, in_f=128, tokens=2048)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype=torch.float32)
    joint = sparsegpt_prune(W, H, 0.5, p, scheme=scheme, act_order=True)
    pruned = sparsegpt_prune(W, H, 0.5, p)
    rounded = rtn_quantize(pruned.weight, scheme).dequantize()
    assert torch.equal(rounded == 0, rounded == 0) and bool((rounded[~pruned.mask] == 0).all())  # RTN keeps zeros
    assert _out_err(W, joint.weight, X) < _out_err(W, rounded, X)
    # the codes of the pruned weights are their zero points: dequantized, exactly 0
    assert bool((joint.quant.dequantize()[~joint.mask] == 0).all())
    _assert_pattern(joint.mask, 0.5, p)


def test_gptq_keeps_a_given_mask():
    W, X, H = _data(out_f=16, in_f=64)
    _, mask = wanda_prune(W, (X * X).sum(0), 0.5, Pattern(2, 4))
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False, scale_dtype=torch.float32)
    q = gptq_quantize(W * mask, H, scheme, act_order=True, static_groups=True, mask=mask).dequantize()
    assert bool((q[~mask] == 0).all())
    free = gptq_quantize(W * mask, H, scheme, act_order=True, static_groups=True).dequantize()
    assert bool((free[~mask] != 0).any())  # without the mask, error feedback fills the holes


def test_sparsegpt_act_order_keeps_n_m_groups():
    W, X, H = _data(out_f=16, in_f=64)
    res = sparsegpt_prune(W, H, 0.5, Pattern(2, 4), act_order=True)
    _assert_pattern(res.mask, 0.5, Pattern(2, 4))


# ---------------------------------------------------------------- OWL


def test_owl_sparsities_keep_the_mean_and_favour_outliers():
    ratios = [0.01, 0.05, 0.02, 0.10]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7, abs=1e-9)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-9)  # spans 2λ
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers, less pruning
    assert owl_sparsities([0.03, 0.03], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_against_counting():
    a, b = torch.rand(4, 8), torch.rand(3, 5) * 10
    flat = torch.cat([a.flatten(), b.flatten()])
    want = sum(1 for v in flat if v > 2 * flat.mean()) / flat.numel()
    assert outlier_ratio([a, b], 2.0) == pytest.approx(want)
