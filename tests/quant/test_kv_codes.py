"""The KV cache that stores integer codes (compress.quant.kv_cache.CodeCache), against slow references
and against the emulated path (transformers' DynamicCache + the attention function's rounding)."""

from __future__ import annotations

import json

import pytest
import torch
from compress.quant import kv_cache
from compress.quant.kv_cache import (
    CodeCache,
    CodeLayer,
    HeadRotation,
    new_cache,
    pack4,
    quantize_vectors,
    unpack4,
)
from conftest import save_tiny, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

GREEDY = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True, "pad_token_id": 0}


def slow_codes(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One vector at a time: scale = absmax / qmax as a number of t's dtype, codes = round(v / scale)
    clamped to ±qmax (zero vectors: scale 0, codes 0)."""
    qmax = 2 ** (bits - 1) - 1
    flat = t.reshape(-1, t.shape[-1])
    codes = torch.zeros(flat.shape, dtype=torch.int8)
    scales = torch.zeros(flat.shape[0], dtype=t.dtype)
    for i, v in enumerate(flat):
        v = v.float()
        s = (v.abs().max() / qmax).to(t.dtype)
        scales[i] = s
        if float(s) > 0:
            q = v / s.float()  # float32 quotients; Python's round, like torch's, takes ties to even
            codes[i] = torch.tensor([max(-qmax, min(qmax, round(float(x)))) for x in q], dtype=torch.int8)
    return codes.reshape(t.shape), scales.reshape(*t.shape[:-1], 1)


def slow_unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Byte b holds code 2i in its low nibble and code 2i + 1 in its high one, each + 8."""
    out = torch.zeros(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.int8)
    flat, res = packed.reshape(-1, packed.shape[-1]), out.view(-1, out.shape[-1])
    for r in range(flat.shape[0]):
        for i, b in enumerate(flat[r].tolist()):
            res[r, 2 * i], res[r, 2 * i + 1] = (b % 16) - 8, (b // 16) - 8
    return out


def stored_codes(layer: CodeLayer, which: str) -> torch.Tensor:
    codes = layer.keys if which == "keys" else layer.values
    return codes if layer.bits == 8 else slow_unpack4(codes)


# ---------------------------------------------------------------- codes, scales, packing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("r3", [False, True])
def test_stored_codes_and_scales_are_the_rounding_of_the_rotated_input(bits, r3, dtype):
    g = torch.Generator().manual_seed(bits + 2 * r3)
    rot = HeadRotation(16, 1) if r3 else None
    k, v = (torch.randn(2, 3, 7, 16, generator=g) * torch.rand(2, 3, 7, 1, generator=g) * 5 for _ in range(2))
    k[0, 1, 2], v[1, 2, 6] = 0, 0  # zero vectors stay zero
    k, v = k.to(dtype), v.to(dtype)
    layer = CodeLayer(bits, rot)
    k1, v1 = layer.update(k[:, :, :5], v[:, :, :5])  # a prompt, then two steps
    layer.update(k[:, :, 5:6], v[:, :, 5:6])
    keys, values = layer.update(k[:, :, 6:], v[:, :, 6:])
    want_k = rot.rotate(k) if r3 else k
    for which, t, got in (("keys", want_k, keys), ("values", v, values)):
        codes, scales = slow_codes(t, bits)
        assert torch.equal(stored_codes(layer, which), codes)
        assert torch.equal(layer.key_scales if which == "keys" else layer.value_scales, scales)
        assert got.dtype == dtype and torch.equal(got, (codes.float() * scales.float()).to(dtype))
        assert torch.equal(got, quantize_vectors(t, bits))  # what the emulated path computes
    assert torch.equal(k1, keys[:, :, :5]) and torch.equal(v1, values[:, :, :5])
    assert layer.get_seq_length() == 7 and layer.keys.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert layer.keys.shape == (2, 3, 7, 16 if bits == 8 else 8) and layer.key_scales.dtype == dtype


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (1, 3, 5, 6), (3, 5, 7, 64)])
def test_4bit_codes_pack_two_per_byte_and_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(slow_unpack4(packed), codes) and torch.equal(unpack4(packed), codes)
    with pytest.raises(ValueError, match="pairs"):
        pack4(torch.zeros(1, 1, 1, 3, dtype=torch.int8))


def test_a_4bit_layer_keeps_odd_heads_and_tokens_and_refuses_an_odd_head_dim():
    g = torch.Generator().manual_seed(0)
    layer = CodeLayer(4)
    parts = [torch.randn(1, 3, n, 6, generator=g) for n in (5, 1, 3)]
    for p in parts:
        keys, values = layer.update(p, -p)
    whole = torch.cat(parts, dim=-2)
    assert layer.keys.shape == (1, 3, 9, 3) and torch.equal(keys, quantize_vectors(whole, 4))
    assert torch.equal(values, quantize_vectors(-whole, 4))
    with pytest.raises(ValueError, match="head_dim is 5"):
        CodeLayer(4).update(torch.randn(1, 1, 2, 5), torch.randn(1, 1, 2, 5))


def test_crop_and_batch_selection_keep_codes_and_scales_together():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    layer = CodeLayer(4)
    layer.update(k, v)
    layer.crop(-2)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert layer.get_seq_length() == 4 and layer.key_scales.shape == layer.value_scales.shape == (2, 2, 4, 1)
    keys, values = layer.update(k[[2, 0], :, 4:5], v[[2, 0], :, 4:5])
    assert torch.equal(keys, quantize_vectors(k[[2, 0], :, :5], 4)) and torch.equal(values, quantize_vectors(v[[2, 0], :, :5], 4))


# ---------------------------------------------------------------- decoding with a model


def tiny_model(family="llama", kv_heads=None, bits=8, r3=False, dtype=torch.float32, seed=0):
    cfg = tiny_config(family)
    if kv_heads is not None:
        cfg.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():  # outlier channels in the keys (what makes 4-bit keys hard and R3 useful)
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight[::16] *= 40
    m.to(dtype)
    if bits:
        assert kv_cache.install(m, {"bits": bits}, kv_cache.r3_section(cfg, 0) if r3 else None) == 2
    return m


def decode(m, prompt, steps, cache):
    """Greedy decoding one token a step; the logits of every step."""
    out, ids, logits = None, prompt, []
    with torch.no_grad():
        for _ in range(steps):
            out = m(input_ids=ids, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            ids = out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("r3", [False, True])
def test_greedy_decoding_with_the_code_cache_equals_the_emulated_path(kv_heads, bits, r3):
    m = tiny_model(kv_heads=kv_heads, bits=bits, r3=r3)
    prompt = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = new_cache(m)
    assert isinstance(cache, CodeCache) and all(isinstance(la, CodeLayer) for la in cache.layers)
    got = decode(m, prompt, 8, cache)
    want = decode(m, prompt, 8, DynamicCache(config=m.config))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    assert cache.get_seq_length() == 9 + 7
    # the emulated path is not the unrounded model: the equality above is not trivial
    m.config._attn_implementation = "sdpa"
    plain = decode(m, prompt, 8, DynamicCache(config=m.config))
    assert max((p - w).abs().max() for p, w in zip(plain, want)) > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "mistral"])
def test_other_families_decode_with_the_code_cache_as_emulated(family):
    cfg = tiny_config(family)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    kv_cache.install(m, {"bits": 4}, kv_cache.r3_section(cfg, 0))
    prompt = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    got = decode(m, prompt, 6, new_cache(m))
    want = decode(m, prompt, 6, DynamicCache(config=m.config))  # gemma3's sliding layers: DynamicSlidingWindowLayer
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-5) for g, w in zip(got, want))


def test_generate_with_the_code_cache_gives_the_emulated_logits_in_bf16():
    m = tiny_model(bits=4, r3=True, dtype=torch.bfloat16)
    prompt = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(2))
    kw = {**GREEDY, "max_new_tokens": 6}
    with torch.no_grad():
        cache = new_cache(m)
        got = m.generate(prompt, past_key_values=cache, **kw)
        want = m.generate(prompt, **kw)
    assert got.past_key_values is cache and isinstance(want.past_key_values, DynamicCache)
    assert cache.layers[0].key_scales.dtype == torch.bfloat16 and cache.get_seq_length() == 7 + 5
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits))


def test_r3_keys_from_the_code_cache_are_not_rotated_again(monkeypatch):
    m = tiny_model(bits=8, r3=True)
    prompt = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(3))
    cache = new_cache(m)
    with torch.no_grad():
        m(input_ids=prompt, past_key_values=cache, use_cache=True)
        shapes = []
        real = HeadRotation.rotate
        monkeypatch.setattr(HeadRotation, "rotate", lambda self, x: shapes.append(tuple(x.shape)) or real(self, x))
        step = m(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    # each layer rotates its new key (in the cache) and its query (in attention), never the 7 cached keys
    assert shapes == [(1, 2, 1, 16), (1, 4, 1, 16)] * 2
    monkeypatch.setattr(HeadRotation, "rotate", real)
    want = decode(m, prompt, 2, DynamicCache(config=m.config))[1]
    assert torch.allclose(step, want, atol=1e-5, rtol=1e-5)
    # what rotating (and rounding) the cached keys again would compute: far from the emulated logits
    monkeypatch.setattr(kv_cache, "from_code_cache", lambda key, value, cfg: False)
    twice = decode(m, prompt, 2, new_cache(m))[1]
    assert (twice - want).abs().max() > 1e-2


def test_code_cache_tensors_reaching_other_settings_are_refused():
    m = tiny_model(bits=8, r3=True)
    cache = new_cache(m)
    kv_cache.install(m, {"bits": 4}, None)
    with pytest.raises(RuntimeError, match="other settings"), torch.no_grad():
        m(input_ids=torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------- memory


def test_the_stored_bytes_are_codes_plus_one_scale_per_vector():
    m8, m4 = (tiny_model(bits=b, dtype=torch.bfloat16) for b in (8, 4))
    ref = tiny_model(bits=None, dtype=torch.bfloat16)
    prompt = torch.randint(0, 320, (3, 37), generator=torch.Generator().manual_seed(4))
    caches = {"bf16": DynamicCache(config=ref.config), 8: new_cache(m8), 4: new_cache(m4)}
    with torch.no_grad():
        for model, key in ((ref, "bf16"), (m8, 8), (m4, 4)):
            model(input_ids=prompt, past_key_values=caches[key], use_cache=True)
    layers, batch, heads, tokens, head_dim = 2, 3, 2, 37, 16
    vectors = 2 * layers * batch * heads * tokens  # keys and values
    assert kv_cache.nbytes(caches["bf16"]) == vectors * head_dim * 2
    assert caches[8].nbytes() == vectors * (head_dim + 2)  # int8 codes + a bf16 scale
    assert caches[4].nbytes() == vectors * (head_dim // 2 + 2)  # two codes a byte + a bf16 scale


@pytest.mark.parametrize("bits, ratio", [(8, (64 + 2) / 128), (4, (32 + 2) / 128)])
def test_a_cache_at_head_dim_64_stores_about_half_or_a_quarter(bits, ratio):
    cache = CodeCache(settings=[{"bits": bits, "r3": None}] * 3)
    plain = DynamicCache()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        k, v = (torch.randn(1, 3, 101, 64, generator=g).to(torch.bfloat16) for _ in range(2))
        cache.update(k, v, i)
        plain.update(k, v, i)
    assert cache.nbytes() == ratio * kv_cache.nbytes(plain) == 2 * 3 * 3 * 101 * (64 * bits // 8 + 2)


def test_a_model_without_kv_quantization_gets_no_code_cache():
    m = tiny_model(bits=None)
    assert new_cache(m) is None
    m = tiny_model(bits=8)
    m.config._attn_implementation = "sdpa"  # the rounding switched off: a code cache would not match attention
    assert new_cache(m) is None
    with pytest.raises(ValueError, match="no KV-cache quantization"):
        CodeCache(tiny_model(bits=None))


def test_compress_serve_generates_with_the_code_cache(tmp_path, monkeypatch):
    from compress.api import serving

    path = save_tiny(tmp_path / "m", "llama")
    meta = {"kv_cache": {"bits": 4}, "rotation": {"r3": kv_cache.r3_section(tiny_config("llama"), 0)}}
    (path / "compress.json").write_text(json.dumps(meta))
    calls = []
    real = CodeLayer.update
    monkeypatch.setattr(CodeLayer, "update", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = serving.generate(path, "def f(x):", max_new_tokens=4, dtype="float32", device="cpu", log=lambda *_: None)
    assert got["new_tokens"] == 4 and len(calls) == 2 * 4  # two layers, a prompt and three steps
    monkeypatch.setattr(serving, "new_cache", lambda model: None)  # transformers' cache, the rounding emulated
    assert serving.generate(path, "def f(x):", max_new_tokens=4, dtype="float32", device="cpu", log=lambda *_: None)["text"] == got["text"]


def test_a_left_padded_batch_decodes_each_row_as_alone():
    # the attention function has SDPA's masks: without them transformers gives it none (pads read)
    m = tiny_model(bits=8, r3=True)
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(1, 320, (1, 9), generator=g), torch.randint(1, 320, (1, 5), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    kw = {**GREEDY, "max_new_tokens": 4}
    with torch.no_grad():
        both = m.generate(ids, attention_mask=mask, past_key_values=new_cache(m), **kw)
        for row, alone in enumerate((long, short)):
            one = m.generate(alone, past_key_values=new_cache(m), **kw)
            assert torch.equal(both.sequences[row, 9:], one.sequences[0, alone.shape[1]:])
            assert all(torch.allclose(b[row], o[0], atol=1e-4, rtol=1e-4) for b, o in zip(both.logits, one.logits))
