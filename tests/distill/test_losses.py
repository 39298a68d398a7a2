"""Distillation losses against slow, obvious references written with Python loops."""

import math

import pytest
import torch
from compress.distill import losses


def _probs(z, T):
    e = [math.exp(v / T) for v in z]
    s = sum(e)
    return [x / s for x in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _ref(name, zs, zt, T=1.0, beta=0.5, alpha=0.1):
    """Mean over positions of the loss, from per-position probability lists, times T²."""
    vals = []
    for s_row, t_row in zip(zs.reshape(-1, zs.shape[-1]).tolist(), zt.reshape(-1, zt.shape[-1]).tolist()):
        p, q = _probs(t_row, T), _probs(s_row, T)
        if name == "forward_kl":
            v = _kl(p, q)
        elif name == "reverse_kl":
            v = _kl(q, p)
        elif name == "jsd":
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
            v = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        else:
            m = [alpha * a + (1 - alpha) * b for a, b in zip(p, q)]
            v = _kl(p, m)
        vals.append(v)
    return sum(vals) / len(vals) * T * T


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 7, generator=g) * 2, torch.randn(2, 3, 7, generator=g) * 2


@pytest.mark.parametrize("name", losses.LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_each_loss_matches_the_reference(logits, name, T):
    zs, zt = logits
    got = float(losses.logit_loss(name, zs, zt, T, beta=0.3, alpha=0.2))
    assert got == pytest.approx(_ref(name, zs, zt, T, beta=0.3, alpha=0.2), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_zero_when_the_student_is_the_teacher_and_positive_otherwise(logits, name):
    zs, zt = logits
    assert float(losses.logit_loss(name, zt, zt)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.logit_loss(name, zs, zt)) > 1e-3


def test_jsd_at_one_half_is_symmetric(logits):
    zs, zt = logits
    assert float(losses.jsd(zs, zt, beta=0.5)) == pytest.approx(float(losses.jsd(zt, zs, beta=0.5)), rel=1e-5)


def test_topk_with_the_whole_vocabulary_is_forward_kl(logits):
    zs, zt = logits
    v, i = losses.teacher_topk(zt, k=7, T=1.5)
    assert i.dtype == torch.int32
    for alpha, full in ((0.0, losses.forward_kl(zs, zt, 1.5)), (0.3, losses.skew_kl(zs, zt, 1.5, alpha=0.3))):
        assert float(losses.topk_forward_kl(zs, v, i, 1.5, alpha=alpha)) == pytest.approx(float(full), rel=1e-4)


def test_topk_is_the_kl_over_the_top_tokens_and_the_rest(logits):
    zs, zt = logits
    v, i = losses.teacher_topk(zt, k=3)
    assert torch.equal(i.long(), zt.topk(3, dim=-1).indices)
    ref = []
    for s_row, t_row, idx in zip(zs.reshape(-1, 7).tolist(), zt.reshape(-1, 7).tolist(), i.reshape(-1, 3).tolist()):
        p, q = _probs(t_row, 1.0), _probs(s_row, 1.0)
        pk, qk = [p[j] for j in idx], [q[j] for j in idx]
        ref.append(_kl(pk + [1 - sum(pk)], qk + [1 - sum(qk)]))
    assert float(losses.topk_forward_kl(zs, v, i)) == pytest.approx(sum(ref) / len(ref), rel=1e-4)
    assert float(losses.topk_forward_kl(zt, v, i)) == pytest.approx(0.0, abs=1e-6)  # minimised by the teacher itself


def test_mask_averages_over_kept_positions_only(logits):
    zs, zt = logits
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    per = torch.stack([losses.forward_kl(zs[b, t], zt[b, t]) for b, t in ((0, 0), (1, 2))]).mean()
    assert float(losses.forward_kl(zs, zt, mask=mask)) == pytest.approx(float(per), rel=1e-5)


def test_hidden_mse_is_relative_per_block():
    t = [torch.ones(2, 3, 4), 10 * torch.ones(2, 3, 4)]
    s = [1.1 * t[0], 1.1 * t[1]]  # 10% off in both: the same relative error whatever the scale
    assert float(losses.hidden_mse(s, t)) == pytest.approx(0.01, rel=1e-4)
