"""GPTQ on llama.cpp's storage grids (``gptq_quantize_grid``): what it stores is what llama.cpp
computes, and its layer output error is below round-to-nearest's on the same grid."""

from __future__ import annotations

import gguf
import pytest
import torch
from compress.quant import ggml
from compress.quant.gptq import gptq_quantize_grid


def _layer(out_f=48, in_f=512, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[:, :4] *= 8  # a few outlier columns, as real layers have
    # correlated inputs with uneven channel energy: what makes error feedback pay
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = (torch.randn(tokens, in_f, generator=g) * torch.linspace(0.2, 3, in_f)) @ mix
    return W, X


def _output_error(W, Wq, X) -> float:
    return float(((X @ (W - Wq).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "iq4_nl"])
def test_gptq_beats_rtn_on_the_same_grid(name):
    W, X = _layer()
    H = X.T @ X
    g = ggml.grid(name)
    codes, params, _ = gptq_quantize_grid(W, H, g, act_order=True)
    gptq = ggml.dequantize(codes, params)
    # what the file holds is exactly what the solver compensated
    stored = gguf.quants.dequantize(ggml.encode(codes, params), g.qtype)
    assert torch.equal(torch.from_numpy(stored.copy()).reshape(W.shape), gptq)
    q_rtn, p_rtn = ggml.rtn(W, g)
    rtn = ggml.dequantize(q_rtn, p_rtn)
    e_gptq, e_rtn = _output_error(W, gptq, X), _output_error(W, rtn, X)
    assert e_gptq < 0.8 * e_rtn, (name, e_gptq, e_rtn)


def test_natural_order_also_beats_rtn():
    W, X = _layer(seed=1)
    H = X.T @ X
    g = ggml.grid("q4_k")
    codes, params, _ = gptq_quantize_grid(W, H, g, act_order=False)
    q_rtn, p_rtn = ggml.rtn(W, g)
    assert _output_error(W, ggml.dequantize(codes, params), X) < _output_error(W, ggml.dequantize(q_rtn, p_rtn), X)
