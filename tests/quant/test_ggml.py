"""compress.quant.ggml: llama.cpp's storage grids. The bytes must read back through gguf's own
dequantizers bit for bit, and the fit must beat the plain choices on the same grids."""

import gguf
import numpy as np
import pytest
import torch
from compress.quant import ggml

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
GGUF_QUANTIZES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # the types gguf-py can quantize itself


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small: intra-op threads only add overhead (a lot of it when another
    job holds the cores), so these tests run on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(rows, n, seed=0):
    """Gaussian rows with a few outliers, plus an outlier row, an all-zero row and constant rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (max(1, w.numel() // 300),), generator=g)
    w.view(-1)[idx] *= 10
    w[0, 3] = 0.9  # an outlier
    w[1] = 0.0
    w[2] = 0.37
    w[3] = -0.011
    return w


def _gguf_dequantize(data: np.ndarray, g) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, g.qtype)))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _distinct_levels(p) -> torch.Tensor:
    """(rows, n) mask of the columns whose sub-block has pairwise distinct level values."""
    vals = p.scale[..., None] * p.grid.levels + p.offset[..., None]  # (rows, G, L)
    ok = (vals.sort(-1).values.diff(dim=-1) != 0).all(-1)
    return ok.repeat_interleave(p.grid.sub, 1)


def _sq_err(w, q, p, importance=None) -> float:
    e = (ggml.dequantize(q, p) - w).double() ** 2
    return float((e if importance is None else e * importance).sum())


# ---------------------------------------------------------------- the grids


def test_grids_match_gguf_block_sizes():
    assert set(ggml.GRIDS) == set(LEGACY + KQUANTS)
    for name, g in ggml.GRIDS.items():
        assert g.qtype == gguf.GGMLQuantizationType[name.upper()]
        assert (g.block, g.type_size) == gguf.GGML_QUANT_SIZES[g.qtype]
        assert g.block % g.sub == 0 and g.levels.dtype == torch.float32
        assert bool((g.levels.diff() > 0).all())
    assert ggml.grid("Q4_K") is ggml.GRIDS["q4_k"]
    assert [ggml.grid(n).bits for n in ("q2_k", "q3_k", "q4_0", "iq4_nl", "q5_k", "q6_k", "q8_0")] == [2, 3, 4, 4, 5, 6, 8]
    with pytest.raises(ValueError, match="q4_0.*q6_k"):
        ggml.grid("q7_x")


# ---------------------------------------------------------------- bytes: gguf reads back what dequantize says


def _shapes(name):
    return [(7, 256), (33, 512)] + ([(5, 32), (9, 96)] if name in LEGACY else [])


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_encode_reads_back_bit_for_bit_through_gguf(name):
    g = ggml.grid(name)
    for rows, n in _shapes(name):
        w = _weights(rows, n, seed=rows)
        q, p = ggml.rtn(w, g)
        data = ggml.encode(q, p)
        assert data.dtype == np.uint8 and data.shape == (rows, n // g.block * g.type_size)
        deq = ggml.dequantize(q, p)
        assert _same_bits(_gguf_dequantize(data, g), deq), (name, rows, n)
        mask = _distinct_levels(p)
        assert mask[4:].all()  # the random rows
        assert torch.equal(ggml.quantize(deq, p)[mask], q[mask])
        assert float(deq[1].abs().max()) == 0.0  # the zero row stays zero


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_any_stored_fields_read_back_bit_for_bit(name):
    """Random fields over their whole ranges (negative fp16 scales, q6_k's -128, q3_k's -32, every
    code): the layout, not just what the fit happens to produce."""
    g = ggml.grid(name)
    gen = torch.Generator().manual_seed(1)
    rows, n = 5, 512
    half = lambda *s: (torch.randn(*s, generator=gen) * 0.05).to(torch.float16).float()
    fields = {"d": half(rows, n // g.block)}
    if g.is_k:
        lo, hi = g.scale_range
        fields["scales"] = torch.randint(lo, hi + 1, (rows, n // g.sub), generator=gen, dtype=torch.int32)
        fields["scales"][0, :2] = torch.tensor([lo, hi])
    if g.has_min:
        fields["dmin" if g.is_k else "m"] = half(rows, n // g.block)
    if g.min_range:
        fields["mins"] = torch.randint(g.min_range[0], g.min_range[1] + 1, (rows, n // g.sub), generator=gen, dtype=torch.int32)
    p = ggml.params_from_fields(g, fields)
    q = torch.randint(0, len(g.levels), (rows, n), generator=gen, dtype=torch.int32)
    q[0, : len(g.levels)] = torch.arange(len(g.levels))
    assert _same_bits(_gguf_dequantize(ggml.encode(q, p), g), ggml.dequantize(q, p))


def _ref_q4_k_block(b: bytes) -> list[float]:
    """q4_K, one block of 144 bytes, the obvious way: d, dmin (fp16), 12 bytes of 6-bit scales and
    mins, 128 bytes of nibbles (64 values per 32 bytes: low nibbles first, then high)."""
    f32 = np.float32
    d, dmin = (f32(np.frombuffer(b[i : i + 2], dtype="<f2")[0]) for i in (0, 2))
    s, qs = b[4:16], b[16:]

    def scale_min(j):
        if j < 4:
            return s[j] & 63, s[j + 4] & 63
        return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)

    out = []
    for c in range(4):
        for half, shift in ((0, 0), (1, 4)):
            sc, m = scale_min(2 * c + half)
            for l in range(32):
                out.append(d * f32(sc) * f32((qs[32 * c + l] >> shift) & 0xF) - dmin * f32(m))
    return out


def _ref_q3_k_block(b: bytes) -> list[float]:
    """q3_K, one block of 110 bytes: hmask[32], qs[64], 12 bytes of 6-bit signed scales, d."""
    f32 = np.float32
    hmask, qs, s = b[:32], b[32:96], b[96:108]
    d = f32(np.frombuffer(b[108:110], dtype="<f2")[0])

    def scale(j):
        low = s[j] & 0xF if j < 8 else s[j - 8] >> 4
        high = (s[8 + j % 4] >> (2 * (j // 4))) & 3
        return (low | (high << 4)) - 32

    out, bit = [], 0
    for n in range(2):
        for j in range(4):
            for l in range(32):
                low = (qs[32 * n + l] >> (2 * j)) & 3
                q = low - (0 if hmask[l] & (1 << bit) else 4)
                out.append(d * f32(scale(8 * n + 2 * j + l // 16)) * f32(q))
            bit += 1
    return out


@pytest.mark.parametrize("name,ref", [("q4_k", _ref_q4_k_block), ("q3_k", _ref_q3_k_block)])
def test_k_quant_bytes_follow_the_layout(name, ref):
    g = ggml.grid(name)
    w = _weights(6, 512, seed=3)
    w[5, 300] = -0.9  # a negative extreme: q3_k's signed scales both ways
    q, p = ggml.rtn(w, g)
    data = ggml.encode(q, p)
    deq = ggml.dequantize(q, p)
    for r, blk in ((0, 0), (1, 1), (2, 0), (4, 1), (5, 1)):
        raw = data[r, blk * g.type_size : (blk + 1) * g.type_size].tobytes()
        slow = torch.tensor(np.array(ref(raw), dtype=np.float32))
        assert _same_bits(slow, deq[r, blk * 256 : (blk + 1) * 256]), (name, r, blk)


# ---------------------------------------------------------------- the fit


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_rtn_error_not_above_gguf_quantize(name):
    g = ggml.grid(name)
    w = _weights(64, 1024, seed=5)
    q, p = ggml.rtn(w, g)
    ref = _gguf_dequantize(gguf.quants.quantize(w.numpy(), g.qtype), g)
    ours, theirs = _sq_err(w, q, p), float(((ref - w).double() ** 2).sum())
    assert ours < theirs * 0.97, (name, ours, theirs)


def _plain_k(w, g):
    """The simple choice on the same grid: each sub-block's range from its extremes (no search),
    the super-scales from the largest sub-scale and min, every integer rounded once."""
    rows = w.shape[0]
    x, J = w.reshape(-1, g.sub), g.block // g.sub
    f16 = lambda t: t.to(torch.float16).float()
    rnd = lambda A, d: torch.where(d[:, None] != 0, A / d[:, None], 0).round()
    if g.has_min:
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values
        A, M = ((hi - lo) / (len(g.levels) - 1)).view(-1, J), (-lo).view(-1, J)
        d, dmin = f16(A.amax(1) / g.scale_range[1]), f16(M.amax(1) / g.min_range[1])
        f = {"d": d, "dmin": dmin, "scales": rnd(A, d).clamp(*g.scale_range), "mins": rnd(M, dmin).clamp(*g.min_range)}
    else:
        ext = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
        A = (ext / (g.levels[0] - g.shift)).view(-1, J)
        d = f16(A.gather(1, A.abs().argmax(1, keepdim=True))[:, 0] / g.scale_range[0])
        f = {"d": d, "scales": rnd(A, d).clamp(*g.scale_range)}
    p = ggml.params_from_fields(g, {k: v.reshape(rows, -1) for k, v in f.items()})
    return ggml.quantize(w, p), p


@pytest.mark.parametrize("name", KQUANTS)
def test_k_quant_fit_beats_the_plain_choice_and_nears_float_sub_scales(name):
    g = ggml.grid(name)
    w = _weights(48, 1024, seed=7)
    q, p = ggml.rtn(w, g)
    ours = _sq_err(w, q, p)
    plain = _sq_err(w, *_plain_k(w, g))
    x = w.reshape(-1, g.sub)
    float_err = float(ggml._fit_sub(x, torch.ones_like(x), g)[2].double().sum())  # sub-scales unquantized
    assert ours < 0.95 * plain, (name, ours, plain)
    assert float_err <= ours <= 1.10 * float_err, (name, ours, float_err)
    # the stored fields are what they claim: fp16 super-scales, integers in range
    assert torch.equal(p.fields["d"], p.fields["d"].half().float())
    lo, hi = g.scale_range
    assert p.fields["scales"].dtype == torch.int32 and lo <= int(p.fields["scales"].min()) and int(p.fields["scales"].max()) <= hi


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_importance_lowers_the_weighted_error(name):
    g = ggml.grid(name)
    w = _weights(16, 512, seed=11)
    gen = torch.Generator().manual_seed(12)
    imp = torch.rand(512, generator=gen) ** 6 * 100 + 0.01  # a few columns matter a lot
    q0, p0 = ggml.rtn(w, g)
    q1, p1 = ggml.rtn(w, g, importance=imp)
    assert _sq_err(w, q1, p1, imp) < 0.97 * _sq_err(w, q0, p0, imp), name
    q2, p2 = ggml.rtn(w, g, importance=imp.expand(16, 512))  # per element: the same
    assert torch.equal(q2, q1) and torch.equal(p2.scale, p1.scale)


# ---------------------------------------------------------------- column-wise use (GPTQ)


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_nl", "q5_1"])
def test_columns_and_quantize_column_agree_with_the_whole(name):
    g = ggml.grid(name)
    w = _weights(9, 768, seed=13)
    q, p = ggml.rtn(w, g)
    deq = ggml.dequantize(q, p)
    part = p.columns(256, 768)
    assert torch.equal(ggml.quantize(w[:, 256:], part), q[:, 256:])
    assert _same_bits(ggml.dequantize(q[:, 256:], part), deq[:, 256:])
    assert set(part.fields) == set(p.fields)
    for j in (0, 17, 255, 256, 500, 767):
        codes, values = ggml.quantize_column(w[:, j], p, j)
        assert codes.dtype == torch.int32 and torch.equal(codes, q[:, j])
        assert _same_bits(values, deq[:, j])
    with pytest.raises(ValueError, match="blocks"):
        p.columns(16, 256)


def test_bad_inputs_are_refused():
    g = ggml.grid("q4_k")
    with pytest.raises(ValueError, match="blocks of 256"):
        ggml.fit_params(torch.randn(4, 576), g)
    with pytest.raises(ValueError, match="non-negative"):
        ggml.fit_params(torch.randn(4, 256), g, importance=-torch.ones(256))
    q, p = ggml.rtn(torch.randn(4, 256), g)
    with pytest.raises(ValueError, match="codes"):
        ggml.encode(q + 16, p)
