"""The layer-wise perplexity (compress.eval.layerwise) against the whole-model one, on tiny models
of each family and on compressed exports, and the choice between them in ``compress eval``."""

from __future__ import annotations

import resource

import psutil
import pytest
from compress.eval import layerwise
from compress.eval.layerwise import (
    available_memory_bytes,
    layerwise_perplexity,
    whole_model_bytes,
)
from compress.eval.perplexity import perplexity
from conftest import save_tiny

from compress import api
from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource
from compress.data import eval_windows, load_texts, tokenize
from compress.modules import keep_dense
from compress.recipe import EvalConfig, PerplexityConfig, load_recipe

KEYS = {"perplexity", "nll", "tokens", "windows", "seconds", "mode"}


def _windows(source, n=6, seq_len=64):
    return eval_windows(tokenize(load_texts("builtin:pydoc", "eval"), source.tokenizer), seq_len, n)


def _both(path, batch_size=4):
    """(whole-model result, layer-wise result) on the same 6 windows: batches of 4 and 2."""
    source = ModelSource(path)
    windows = _windows(source)
    model = load_source(source)
    keep_dense(model)
    whole = perplexity(model, windows, batch_size)
    del model
    return whole, layerwise_perplexity(source, windows, batch_size)


def _same(whole, lw):
    assert set(whole) == set(lw) == KEYS
    assert (whole["mode"], lw["mode"]) == ("model", "layerwise")
    assert (lw["tokens"], lw["windows"]) == (whole["tokens"], whole["windows"]) == (6 * 63, 6)
    assert lw["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    assert lw["nll"] == pytest.approx(whole["nll"], rel=1e-4)


# llama and opt tie the head to the embeddings, qwen2 does not; gemma3 scales its embeddings and
# alternates sliding-window and global layers (two rotary tables, two masks); falcon and bloom blocks
# return tuples (the stand-ins in the head pass must too)
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gemma3_text", "falcon", "bloom"])
def test_layerwise_equals_whole_model_dense(family, tmp_path):
    _same(*_both(save_tiny(tmp_path / family, family)))


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("lw") / "llama", "llama")


def _export(model, out, passes):
    rec = {
        "model": str(model),
        "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
        "passes": passes,
        "eval": {"perplexity": None},
        "export": {"path": str(out)},
    }
    api.run(load_recipe(rec))
    return out


# packed W4 layers (QuantLinear, dequantized once per block), and low-rank factors whose A and B
# are themselves packed (a container replaced before the modules inside it)
@pytest.mark.parametrize("passes", [[{"gptq": {"bits": 4, "group_size": 16}}], [{"lowrank": {"rank": 16, "method": "svd"}}, {"rtn": {"bits": 4, "group_size": 16}}]],
                         ids=["gptq-w4", "lowrank-rtn-w4"])
def test_layerwise_equals_whole_model_compressed(passes, tiny_llama_path, tmp_path):
    out = _export(tiny_llama_path, tmp_path / "out", passes)
    assert ModelSource(out).quantized
    _same(*_both(out))


class _Log(api.Hooks):
    def __init__(self):
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)


def _evaluate(path, layerwise_setting="auto"):
    hooks = _Log()
    cfg = EvalConfig(perplexity=PerplexityConfig(seq_len=64, max_windows=4, batch_size=2, layerwise=layerwise_setting), cache=False)
    return api.evaluate(path, None, cfg, hooks=hooks)["model"], hooks.lines


def test_auto_goes_layerwise_when_the_model_does_not_fit(tiny_llama_path, monkeypatch):
    whole, lines = _evaluate(tiny_llama_path)
    assert whole["mode"] == "model"  # a tiny model fits
    assert not any("layer by layer:" in line for line in lines)

    monkeypatch.setattr(layerwise, "available_memory_bytes", lambda: 1_000_000)  # 1 MB free
    lw, lines = _evaluate(tiny_llama_path)
    assert lw["mode"] == "layerwise"
    assert lw["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    need = whole_model_bytes(ModelSource(tiny_llama_path), 2, 64)
    assert f"perplexity layer by layer: the model needs {need / 1e9:.1f} GB in fp32, 0.0 GB is available" in lines

    forced, _ = _evaluate(tiny_llama_path, False)  # the setting wins over the estimate
    assert forced["mode"] == "model"


def test_layerwise_true_forces_it(tiny_llama_path):
    res, lines = _evaluate(tiny_llama_path, True)
    assert res["mode"] == "layerwise" and res["windows"] == 4
    assert not any("layer by layer:" in line for line in lines)  # asked for, not chosen: no reason to give


def test_layerwise_setting_values():
    assert PerplexityConfig().layerwise == "auto"
    assert load_recipe({"eval": {"perplexity": {"layerwise": True}}}).eval.perplexity.layerwise is True
    with pytest.raises(Exception, match="layerwise"):
        load_recipe({"eval": {"perplexity": {"layerwise": "sometimes"}}})


def test_memory_estimates(tiny_llama_path, monkeypatch):
    source = ModelSource(tiny_llama_path)
    params = sum(p.numel() for p in source.skeleton().parameters())
    # float32 weights + the checkpoint as read + one batch's logits (3 copies of B × T × V floats)
    assert whole_model_bytes(source, 2, 64) == 4 * params + source.disk_bytes() + 3 * 2 * 64 * 320 * 4
    assert available_memory_bytes() > 0
    # an address-space limit (ulimit -v) counts the process's mappings: the room is what is left
    limit = psutil.Process().memory_info().vms + 10**8
    monkeypatch.setattr(resource, "getrlimit", lambda what: (limit, resource.RLIM_INFINITY))
    assert 0 < available_memory_bytes() <= 10**8
    monkeypatch.setattr(resource, "getrlimit", lambda what: (limit - 2 * 10**8, resource.RLIM_INFINITY))
    assert available_memory_bytes() == 0  # already past the limit: no room, never a negative one


def test_report_carries_the_mode(tiny_llama_path):
    pytest.importorskip("jsonschema")
    from compress.eval.report import validate

    cfg = EvalConfig(perplexity=PerplexityConfig(seq_len=64, max_windows=2, layerwise=True), cache=False)
    report = api.eval_report(tiny_llama_path, None, cfg)
    validate(report)
    assert report["eval"]["model"]["mode"] == "layerwise"
    assert report["eval"]["settings"]["perplexity"]["layerwise"] is True
