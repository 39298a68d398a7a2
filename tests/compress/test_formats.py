"""compress.checkpoint.formats: bit layout, QuantLinear, and the config that transformers and vLLM read.

The interoperability checks run compressed-tensors' own code (pack/unpack helpers, the
pack-quantized decompressor, the pydantic config models) against ours.
"""


import pytest
import torch
import torch.nn.functional as F
from compress.quant.rtn import QuantResult, QuantScheme, rtn_quantize
from safetensors.torch import load, save

from compress.checkpoint.formats import (
    WEIGHT_FIELDS,
    FormatError,
    QuantLinear,
    pack_int32,
    packed_size,
    quantization_config,
    read_quantization_config,
    unpack_int32,
)
from compress.utils import replace_linear

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

SHAPES = [(5, 37), (33, 7), (3, 64), (1, 1)]  # odd sizes need padding along either dim


def _signed(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g, dtype=torch.int8)


# ---------------------------------------------------------------- bit layout


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits, dim, dense):
    for shape in SHAPES:
        v = _signed(shape, bits)
        p = pack_int32(v, bits, dim, dense=dense)
        assert p.dtype == torch.int32
        expect = list(shape)
        expect[dim] = packed_size(shape[dim], bits, dense)
        assert list(p.shape) == expect
        assert torch.equal(unpack_int32(p, bits, shape[dim], dim, dense=dense), v.int())


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_is_bit_exact_with_compressed_tensors(bits, dim):
    for shape in SHAPES:
        v = _signed(shape, bits, seed=bits)
        try:
            theirs = ct_helpers.pack_to_int32(v, bits, packed_dim=dim)
        except ValueError as e:
            pytest.skip(f"compressed-tensors does not pack {bits} bits: {e}")
        ours = pack_int32(v, bits, dim)
        assert torch.equal(ours, theirs), (shape, bits, dim)
        assert torch.equal(unpack_int32(theirs, bits, shape[dim], dim), v.int())
        back = ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim)
        assert torch.equal(back.int(), v.int())


def test_word_layout_is_32_over_bits_values_per_word():
    # compressed-tensors <= 0.17: value i of a word sits at bits [i·b, (i+1)·b), nothing straddles
    bits = 3
    u = torch.arange(23) % 8  # unsigned codes; 23 values -> 3 words of 10, 10, 3
    p = pack_int32(u - 4, bits, dim=0, dense=False)
    words = [sum(int(c) << (bits * i) for i, c in enumerate(u[k : k + 10])) for k in (0, 10, 20)]
    assert p.tolist() == words
    # dense: one stream, so the 11th value (bits 30..32) straddles words 0 and 1
    d = pack_int32(u - 4, bits, dim=0)
    stream = sum(int(c) << (bits * i) for i, c in enumerate(u))
    assert [w & 0xFFFFFFFF for w in d.tolist()] == [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]
    assert p.tolist() != d.tolist()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layouts_agree_when_bits_divide_32(bits):
    v = _signed((7, 45), bits)
    assert torch.equal(pack_int32(v, bits, dense=True), pack_int32(v, bits, dense=False))


def test_pack_rejects_out_of_range_and_wrong_sizes():
    with pytest.raises(ValueError, match="range"):
        pack_int32(torch.tensor([[8]]), 4)  # 4-bit signed max is 7
    with pytest.raises(ValueError, match="bits"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)
    p = pack_int32(_signed((2, 16), 4), 4)  # 2 words per row
    with pytest.raises(ValueError, match="words"):
        unpack_int32(p, 4, 17)


# ---------------------------------------------------------------- QuantLinear


def _result(bits, group_size, symmetric, act_order=False, shape=(24, 64), seed=0):
    torch.manual_seed(seed)
    W = torch.randn(*shape)
    res = rtn_quantize(W, QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric, observer="minmax"))
    if act_order:
        # as GPTQ with act_order leaves it: columns keep their place, groups are scattered
        perm = torch.randperm(shape[1])
        res = QuantResult(res.q[:, perm], res.scale, res.zero, res.g_idx[perm], res.scheme, act_order=True)
    return res


CASES = [  # bits, group_size, symmetric, act_order
    (4, 16, True, False),
    (4, 16, False, False),
    (4, -1, True, False),
    (8, -1, False, False),
    (3, 32, False, False),
    (4, 16, False, True),
    (2, 8, True, True),
]


@pytest.mark.parametrize("bits,gs,sym,act", CASES)
def test_quantlinear_reproduces_the_result(bits, gs, sym, act):
    res = _result(bits, gs, sym, act)
    bias = torch.randn(res.q.shape[0])
    m = QuantLinear.from_result(res, bias=bias)
    assert torch.equal(m.dequantize(), res.dequantize())
    x = torch.randn(3, 5, res.q.shape[1])
    assert torch.equal(m(x), F.linear(x, res.dequantize(), bias))
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert m.kernel == "torch"
    assert m.spec() == {"bits": bits, "group_size": gs, "symmetric": sym, "act_order": act}


@pytest.mark.parametrize("bits,gs,sym,act", CASES)
def test_state_dict_is_the_export(bits, gs, sym, act):
    res = _result(bits, gs, sym, act, shape=(37, 64))  # 37 rows: the packed zero points need padding
    m = QuantLinear.from_result(res)
    out_f, in_f = res.q.shape
    G = 1 if gs == -1 else in_f // gs
    expect = {
        "weight_packed": (torch.int32, (out_f, packed_size(in_f, bits))),
        "weight_scale": (torch.bfloat16, (out_f, G)),
        "weight_shape": (torch.int64, (2,)),
    }
    if not sym:
        expect["weight_zero_point"] = (torch.int32, (packed_size(out_f, bits), G))
    if act:
        expect["weight_g_idx"] = (torch.int32, (in_f,))
    sd = m.state_dict()
    assert {k: (t.dtype, tuple(t.shape)) for k, t in sd.items()} == expect
    assert sd["weight_shape"].tolist() == [out_f, in_f]

    # through safetensors into a fresh module built from the scheme alone, as the loader does
    fresh = QuantLinear(in_f, out_f, bits, gs, sym, has_g_idx=act)
    fresh.load_state_dict(load(save(dict(sd))))
    assert torch.equal(fresh.dequantize(), res.dequantize())


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("gs", [16, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_decompressor_reads_our_state_dict(bits, gs, sym):
    """The key interoperability check: compressed-tensors' own pack-quantized decompressor (what
    transformers runs on load) turns our tensors back into our weight, to bf16 rounding."""
    from compressed_tensors import QuantizationConfig
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )

    res = _result(bits, gs, sym, shape=(37, 48))
    m = QuantLinear.from_result(res, bias=torch.randn(37))
    cfg = quantization_config([{"targets": ["Linear"], "bits": bits, "group_size": gs, "symmetric": sym, "act_order": False}], [])
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    sd = {k: v for k, v in m.state_dict().items() if k != "bias"}
    out = PackedQuantizationCompressor.decompress(sd, scheme)
    assert out["weight"].dtype == torch.bfloat16  # compressed-tensors computes in the scale dtype
    assert torch.equal(out["weight"], m.dequantize().to(torch.bfloat16))


def test_from_result_refuses_what_it_cannot_store():
    res = _result(4, 16, True)
    inexact = QuantResult(res.q, res.scale * (1 + 2**-12), res.zero, res.g_idx, res.scheme)
    with pytest.raises(ValueError, match="representable"):
        QuantLinear.from_result(inexact)
    shifted = QuantResult(res.q, res.scale, res.zero - 1, res.g_idx, res.scheme)  # symmetric, z != 8
    with pytest.raises(ValueError, match="zero"):
        QuantLinear.from_result(shifted)
    with pytest.raises(ValueError, match="divide"):
        QuantLinear(60, 8, 4, 16)


def test_bits_per_weight():
    assert QuantLinear(256, 64, 4, 128).bits_per_weight == pytest.approx(4 + 16 / 128)
    # asymmetric adds a packed 4-bit zero per group; act-order an int32 per column
    assert QuantLinear(256, 64, 4, 128, symmetric=False).bits_per_weight == pytest.approx(4 + 20 / 128)
    assert QuantLinear(256, 64, 4, 128, has_g_idx=True).bits_per_weight == pytest.approx(4 + 16 / 128 + 32 / 64)
    assert QuantLinear(96, 8, 3, -1, dense=True).bits_per_weight == pytest.approx(3 + 16 / 96)
    assert "int4 sym" in repr(QuantLinear(256, 64, 4, 128))


# ---------------------------------------------------------------- quantization_config


GROUPS = [
    {"targets": ["Linear"], "bits": 4, "group_size": 128, "symmetric": True, "act_order": False},
    {"targets": ["re:.*down_proj"], "bits": 8, "group_size": -1, "symmetric": False, "act_order": False},
    {"targets": ["re:.*up_proj"], "bits": 4, "group_size": 64, "symmetric": False, "act_order": "weight"},
]


def test_quantization_config_validates_with_compressed_tensors():
    from compressed_tensors import QuantizationConfig

    cfg = quantization_config(GROUPS, ignore=["lm_head"])
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
    assert parsed.quantization_status == "compressed"
    w1 = parsed.config_groups["group_1"].weights
    assert (w1.num_bits, w1.strategy, w1.symmetric, w1.group_size) == (8, "channel", False, None)
    for g in cfg["config_groups"].values():
        # vLLM's older compressed-tensors forbids unknown fields: write only the common ones
        assert set(g["weights"]) <= set(WEIGHT_FIELDS)
        assert g["format"] == "pack-quantized"
    assert read_quantization_config(cfg) == {
        f"group_{i}": {**{k: g[k] for k in ("targets", "bits", "group_size", "symmetric")}, "act_order": False, "dense": True,
                       "format": "pack-quantized", "activations": None}
        for i, g in enumerate(GROUPS)
    }


def test_act_order_with_g_idx_round_trips_but_newer_compressed_tensors_refuse_it():
    import compressed_tensors
    from compressed_tensors import QuantizationConfig
    from packaging.version import Version

    cfg = quantization_config([{**GROUPS[0], "act_order": True}], ignore=[])
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert read_quantization_config(cfg)["group_0"]["act_order"] is True
    if Version(compressed_tensors.__version__) >= Version("0.19"):
        with pytest.raises(ValueError, match="actorder"):
            QuantizationConfig.model_validate(cfg)
    else:
        QuantizationConfig.model_validate(cfg)


def test_read_quantization_config_picks_the_layout_from_the_version():
    cfg = quantization_config([{**GROUPS[0], "bits": 3}, GROUPS[0]], ignore=[])
    assert read_quantization_config(cfg)["group_0"]["dense"] is True
    old = read_quantization_config({**cfg, "version": "0.17.1"})
    assert old["group_0"]["dense"] is False  # 3 bits: 10 values per word before 0.18
    assert old["group_1"]["dense"] is True  # 4 bits: the same bits either way


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("format",), "marlin-24", "format"),
        # int-quantized (W8A8) groups must quantize their activations per token
        (("format",), "int-quantized", "group_0.input_activations"),
        (("config_groups", "group_0", "format"), "float-quantized", "group_0.format"),
        (("config_groups", "group_0", "weights", "type"), "float", "weights.type"),
        (("config_groups", "group_0", "weights", "strategy"), "tensor", "weights.strategy"),
        (("config_groups", "group_0", "weights", "num_bits"), 16, "weights.num_bits"),
        (("config_groups", "group_0", "weights", "dynamic"), True, "weights.dynamic"),
        (("config_groups", "group_0", "input_activations"), {"num_bits": 8}, "input_activations"),
        (("quant_method",), "gptq", "quant_method"),
        (("quantization_status",), "frozen", "quantization_status"),
        (("kv_cache_scheme",), {"num_bits": 8, "type": "float"}, "kv_cache_scheme"),
        (("version",), "not a version", "version"),
    ],
)
def test_read_quantization_config_names_the_unsupported_field(path, value, field):
    cfg = quantization_config([GROUPS[0]], ignore=[])
    cfg["config_groups"]["group_0"].pop("format")  # so the top-level format is the one that counts
    if path == ("config_groups", "group_0", "format"):
        cfg["config_groups"]["group_0"]["format"] = value
    else:
        d = cfg
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        read_quantization_config(cfg)
    assert isinstance(e.value, FormatError)


def test_w8a8_config_validates_with_compressed_tensors_and_reads_back():
    from compressed_tensors import QuantizationConfig

    w8a8 = {"targets": ["Linear"], "bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}
    cfg = quantization_config([w8a8], ignore=["lm_head"])
    assert cfg["format"] == "int-quantized"
    parsed = QuantizationConfig.model_validate(cfg)
    a = parsed.config_groups["group_0"].input_activations
    assert (a.num_bits, a.strategy, a.dynamic, a.symmetric) == (8, "token", True, True)
    assert read_quantization_config(cfg)["group_0"]["format"] == "int-quantized"
    mixed = quantization_config([w8a8, {**GROUPS[0], "targets": ["re:.*down_proj"]}], ignore=[])
    assert mixed["format"] == "mixed-precision"
    assert {g["format"] for g in read_quantization_config(mixed).values()} == {"int-quantized", "pack-quantized"}
    # int8 inputs with another weight scheme: packed weights with input_activations (WnA8), read back as such
    grouped = quantization_config([{**w8a8, "group_size": 64}], ignore=[])
    assert grouped["format"] == "pack-quantized" and grouped["config_groups"]["group_0"]["input_activations"]["num_bits"] == 8
    QuantizationConfig.model_validate(grouped)
    assert read_quantization_config(grouped)["group_0"]["activations"] == 8


def test_replace_linear_sets_a_dotted_submodule():
    model = torch.nn.Sequential(torch.nn.ModuleDict({"mlp": torch.nn.ModuleList([torch.nn.Linear(4, 4)])}))
    new = QuantLinear(4, 4, 4, -1)
    old = replace_linear(model, "0.mlp.0", new)
    assert isinstance(old, torch.nn.Linear)
    assert model.get_submodule("0.mlp.0") is new
    replace_linear(model, "0", torch.nn.Identity())
    assert isinstance(model[0], torch.nn.Identity)


def test_keep_dequantized_computes_the_same_and_follows_buffer_changes():
    from compress.quant.rtn import QuantScheme, rtn_quantize

    from compress.modules import keep_dense as keep_dequantized

    W = torch.randn(8, 32)
    q = QuantLinear.from_result(rtn_quantize(W, QuantScheme(bits=4, group_size=16)))
    holder = torch.nn.Sequential(q)
    x = torch.randn(3, 32)
    ref = q(x)
    assert keep_dequantized(holder) == 1
    assert torch.equal(q(x), ref) and "_dense" in q.__dict__
    q.weight_scale.mul_(2)  # an in-place change of the packed buffers rebuilds the kept weight
    assert torch.allclose(q(x), 2 * ref, atol=1e-5)
    keep_dequantized(holder, False)
    assert "_dense" not in q.__dict__
