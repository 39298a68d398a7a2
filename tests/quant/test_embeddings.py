"""Quantized embeddings and lm_head (the rtn/gptq/awq ``embeddings`` option, ``--embeddings``).

The token embedding is stored pack-quantized row by row (``QuantEmbedding``); a tied lm_head reads
the same stored table, an untied one is a packed Linear; what computes the logits is solved by GPTQ
on the head's inputs (the gptq pass) or rounded to nearest. Reloads are exact; the lookup unpacks only
the rows it gathers; the runtimes that cannot read it refuse it (exit 2 with --target, and plain
transformers 5.17 raises by itself; with the upstream init fix it loads the untied export whole).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, save_tiny
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from compress.api import inspect_checkpoint, run
from compress.checkpoint.embedding import QuantEmbedding
from compress.checkpoint.export import Exporter
from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.load import load
from compress.cli import app
from compress.modules import COMPRESS, TRANSFORMERS, VLLM, VLLM_CPU
from compress.quant.rtn import QuantScheme, rtn_quantize
from compress.recipe import load_recipe

runner = CliRunner()
CAL = {"samples": 4, "seq_len": 32, "batch_size": 2}


def _recipe(model, out, embeddings, bits=4, method="gptq", **export):
    opts = {"bits": bits, "group_size": 16} | ({"embeddings": embeddings} if embeddings is not None else {})
    return load_recipe({"model": str(model), "calibration": CAL, "passes": [{method: opts}], "eval": {"perplexity": None},
                        "export": {"path": str(out), **export}})


def _run_recording(recipe):
    """Run ``recipe``; returns (report, the modules the pass computed outside the blocks, as written)."""
    seen = {}
    original = Exporter.write_outside

    def record(self, res):
        seen.update({k: v.clone() for k, v in res.module.state_dict().items()})
        seen["_modules"] = copy.deepcopy(res.module)
        original(self, res)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Exporter, "write_outside", record)
        report = run(recipe)
    return report, seen


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied llama, GPTQ W4 g16 with its table at 4 bits (GPTQ on the head's inputs); and the same
    without; and RTN (data-free) with its table at 4 bits (rounded before block 0)."""
    root = tmp_path_factory.mktemp("emb_tied")
    model = save_tiny(root / "m", "llama")
    report, seen = _run_recording(_recipe(model, root / "out", {"bits": 4}))
    plain = run(_recipe(model, root / "plain", None))
    rtn, rtn_seen = _run_recording(_recipe(model, root / "rtn", {"bits": 4}, method="rtn"))
    return {"model": model, "out": root / "out", "report": report, "seen": seen, "plain": plain, "rtn": root / "rtn",
            "rtn_report": rtn, "rtn_seen": rtn_seen}


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """An untied qwen2, its embedding (RTN) and head (GPTQ) at 8 bits, for vLLM (GPU) as export.target."""
    root = tmp_path_factory.mktemp("emb_untied")
    model = save_tiny(root / "m", "qwen2")
    report, seen = _run_recording(_recipe(model, root / "out", {"bits": 8}, target="vllm"))
    return {"model": model, "out": root / "out", "report": report, "seen": seen}


def _layer(report, name) -> dict:
    return next(r for r in report["layers"] if r["name"] == name)


def _keys(out) -> set[str]:
    with safe_open(out / "model.safetensors", "pt") as h:
        return set(h.keys())


def _source_tensor(model, name) -> torch.Tensor:
    with safe_open(model / "model.safetensors", "pt") as h:
        return h.get_tensor(name).float()


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("bits,group", [(4, 16), (8, 32), (4, -1)])
def test_the_lookup_equals_the_dense_table_exactly_and_unpacks_only_its_rows(bits, group, monkeypatch):
    torch.manual_seed(0)
    W = torch.randn(50, 64)
    m = QuantEmbedding.from_result(rtn_quantize(W, QuantScheme(bits=bits, group_size=group)))
    table = m.dequantize()  # (50, 64) float32
    ids = torch.tensor([[3, 3, 0, 49, 7], [12, 1, 1, 2, 48]])
    monkeypatch.setattr(QuantEmbedding, "dequantize", lambda self: pytest.fail("the lookup dequantized the whole table"))
    assert torch.equal(m(ids), F.embedding(ids, table))
    m.set_dtype(torch.bfloat16)  # the loader's compute dtype
    assert torch.equal(m(ids), F.embedding(ids, table.to(torch.bfloat16)))
    head = m.tied_head()  # the tied lm_head: the same tensors, no copy
    assert head.weight_packed.data_ptr() == m.weight_packed.data_ptr() and head.weight_scale.data_ptr() == m.weight_scale.data_ptr()
    x = torch.randn(2, 5, 64)
    assert torch.equal(head(x), F.linear(x, table))
    packed = m.weight_packed.numel() * 4 + m.weight_scale.numel() * 2
    assert packed <= W.numel() * (bits + 16 / (64 if group == -1 else group)) / 8  # what it holds: the packed size


def test_the_rules_of_the_runtimes():
    spec = {"bits": 4, "group_size": 64, "symmetric": True, "act_order": False}
    assert QuantEmbedding.runtimes({**spec, "tied": False}) == [VLLM, COMPRESS]
    assert QuantEmbedding.runtimes({**spec, "tied": True}) == [COMPRESS]
    assert "Triton" in QuantEmbedding.refusal(spec, VLLM_CPU) and "5.17" in QuantEmbedding.refusal(spec, TRANSFORMERS)


# ---------------------------------------------------------------- export and reload


@pytest.mark.parametrize("how", ["gptq", "rtn"])
def test_quantized_embeddings_reload_exactly_and_tied_stays_tied(tied, how):
    out, seen = (tied["out"], tied["seen"]) if how == "gptq" else (tied["rtn"], tied["rtn_seen"])
    keys = _keys(out)
    assert "model.embed_tokens.weight_packed" in keys and "model.embed_tokens.weight" not in keys
    assert not any(k.startswith("lm_head.") for k in keys)  # one stored tensor serves both
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    groups = cfg["quantization_config"]["config_groups"]
    assert ["Embedding"] in [g["targets"] for g in groups.values()] and "lm_head" in cfg["quantization_config"]["ignore"]
    m = load(out, dtype=torch.float32, log=lambda *_: None)
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    for k in ("weight_packed", "weight_scale", "weight_shape"):  # bit for bit what the pass computed
        assert torch.equal(getattr(emb, k), seen[f"model.embed_tokens.{k}"]), k
    assert torch.equal(emb.dequantize(), seen["_modules"].model.embed_tokens.dequantize())
    assert head.weight_packed.data_ptr() == emb.weight_packed.data_ptr()  # tied in memory too
    layer = _layer(tied["report"] if how == "gptq" else tied["rtn_report"], "model.embed_tokens")
    assert layer["info"]["tied_head"] and layer["info"]["bits"] == 4 and layer["info"]["method"] == how
    if how == "gptq":  # solved on the head's inputs: its output error is measured
        assert 0 < layer["rel_output_error"] < 1
    else:  # round-to-nearest of the source's table, before block 0 (no calibration data at all)
        scheme = QuantScheme(bits=4, group_size=16, symmetric=True, observer="mse", scale_dtype=torch.bfloat16)
        assert torch.equal(emb.dequantize(), rtn_quantize(_source_tensor(tied["model"], "model.embed_tokens.weight"), scheme).dequantize())


def test_the_loaded_model_equals_its_dense_reference_exactly(tied):
    m = load(tied["out"], dtype=torch.float32, log=lambda *_: None)
    ref = copy.deepcopy(m)
    table = nn.Parameter(m.get_input_embeddings().dequantize())
    ref.model.embed_tokens = nn.Embedding(VOCAB, table.shape[1])
    ref.lm_head = nn.Linear(table.shape[1], VOCAB, bias=False)
    ref.model.embed_tokens.weight = ref.lm_head.weight = table  # the dense tied model
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, ref(input_ids=x).logits)


def test_the_untied_head_is_quantized_as_a_linear(untied):
    out, model = untied["out"], untied["model"]
    keys = _keys(out)
    assert {"lm_head.weight_packed", "model.embed_tokens.weight_packed"} <= keys
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & keys
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(map(tuple, (g["targets"] for g in groups.values()))) == [("Embedding",), ("Linear",), ("lm_head",)]
    m = load(out, dtype=torch.float32, log=lambda *_: None)
    head, emb = m.get_output_embeddings(), m.get_input_embeddings()
    assert isinstance(head, QuantLinear) and head.bits == 8 and isinstance(emb, QuantEmbedding) and emb.bits == 8
    scheme = QuantScheme(bits=8, group_size=16, symmetric=True, observer="mse", scale_dtype=torch.bfloat16)
    W = _source_tensor(model, "model.embed_tokens.weight")
    assert torch.equal(emb.dequantize(), rtn_quantize(W, scheme).dequantize())  # the lookup: RTN, before block 0
    for k in ("weight_packed", "weight_scale", "weight_shape"):  # the head: GPTQ on its inputs, after the last block
        assert torch.equal(getattr(head, k), untied["seen"][f"lm_head.{k}"]), k
    layer = _layer(untied["report"], "lm_head")
    assert layer["info"]["method"] == "gptq" and 0 < layer["rel_output_error"] < 1
    assert _layer(untied["report"], "model.embed_tokens")["info"]["method"] == "rtn"


def test_bits_per_parameter_count_the_quantized_table(tied):
    with_emb, without = tied["report"]["export"], tied["plain"]["export"]
    assert with_emb["parameters"] == without["parameters"]  # the tied table counted once, as before
    assert with_emb["bits_per_parameter"] < without["bits_per_parameter"] - 1
    shown = inspect_checkpoint(tied["out"])
    assert shown["embeddings"] == {"bits": 4, "group_size": 16, "tied_head": True}
    text = runner.invoke(app, ["inspect", str(tied["out"])])
    assert "token embedding (the tied lm_head reads it): int4" in text.output


def test_layer_by_layer_perplexity_reads_the_quantized_table(tied):
    from compress.checkpoint.source import ModelSource
    from compress.eval.layerwise import layerwise_perplexity
    from compress.eval.perplexity import perplexity

    windows = torch.randint(0, VOCAB, (2, 16))
    whole = perplexity(load(tied["out"], dtype=torch.float32, log=lambda *_: None), windows)["perplexity"]
    assert layerwise_perplexity(ModelSource(tied["out"]), windows)["perplexity"] == pytest.approx(whole, rel=1e-4)


def _tensors(out) -> dict[str, torch.Tensor]:
    with safe_open(out / "model.safetensors", "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open is no mapping)


@pytest.mark.parametrize("stop_after", [0, 1, "after"])  # block 0, the last block, the head solved after it
def test_an_interrupted_run_resumes_into_the_same_export(tied, tmp_path, monkeypatch, stop_after):
    real = Exporter.write_block

    def stop(self, res, inputs):
        real(self, res, inputs)
        if getattr(res, "index", getattr(res, "phase", None)) == stop_after:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(Exporter, "write_block", stop)
        with pytest.raises(KeyboardInterrupt):
            run(_recipe(tied["model"], out, {"bits": 4}))
    report = run(_recipe(tied["model"], out, {"bits": 4}), resume=True)
    a, b = _tensors(out), _tensors(tied["out"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["name"] for r in report["layers"]] == [r["name"] for r in tied["report"]["layers"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(out.glob("block-*"))


# ---------------------------------------------------------------- transformers


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_plain_transformers_refuses_the_export_and_the_export_says_so(which, tied, untied):
    """transformers 5.17 cannot build a pack-quantized nn.Embedding (its _init_weights reads
    `.weight`): it raises, never loads random weights; compress.json and the report name why."""
    from transformers import AutoModelForCausalLM

    case = tied if which == "tied" else untied
    with pytest.raises(AttributeError, match="weight"):
        AutoModelForCausalLM.from_pretrained(case["out"])
    rt = json.loads((case["out"] / "compress.json").read_text())["runtimes"]
    assert "quantized embedding" in rt["refuses"][TRANSFORMERS]["why"] and rt == case["report"]["runtimes"]
    assert rt["loads"] == ([COMPRESS] if which == "tied" else [VLLM, COMPRESS])


def test_transformers_with_the_embedding_init_fix_loads_the_untied_export_whole(untied, monkeypatch):
    """With the guard huggingface/transformers#47959 adds (skip an nn.Embedding without `.weight`),
    the untied export loads with nothing missing or unexpected and computes what compress.load does."""
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    init = mu.PreTrainedModel._init_weights
    monkeypatch.setattr(mu.PreTrainedModel, "_init_weights",
                        lambda self, m: None if isinstance(m, nn.Embedding) and getattr(m, "weight", None) is None else init(self, m))
    hf, info = AutoModelForCausalLM.from_pretrained(untied["out"], dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load(untied["out"], dtype=torch.float32, log=lambda *_: None)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- bad input: exit 2, before any work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("emb_bad") / "llama", "llama")


def test_a_rotation_first_unties_the_head_so_vllm_is_a_fine_target(tiny, tmp_path):
    """`--rotate` unties a tied lm_head, so vLLM (which refuses a quantized embedding tied to its
    head) serves the result: the preflight must judge the model the embeddings pass will see."""
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
                            "--no-eval", "--rotate", "--embeddings", "4", "--target", "vllm"])
    assert r.exit_code == 0, r.output
    rt = json.loads((out / "compress.json").read_text())["runtimes"]
    assert "vLLM" in rt["loads"] and not json.loads((out / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize("extra,says", [
    (["--embeddings", "3"], "passes.0.gptq.embeddings.bits"),
    (["--embeddings", "4", "--set", "passes.0.gptq.embeddings.group_size=48"], "passes.0.gptq.embeddings.group_size: 48 does not divide"),
    (["--embeddings", "4", "--target", "transformers"], "passes.0.gptq.embeddings: export.target is transformers"),
    (["--embeddings", "4", "--target", "vllm-cpu"], "passes.0.gptq.embeddings: export.target is vllm-cpu"),
    (["--embeddings", "4", "--target", "vllm"], "ties lm_head"),  # a tied model
    (["--embeddings", "8", "--gguf", "q4_0"], "passes.0.gptq.embeddings: a GGUF export"),
    (["--method", "awq+gptq", "--embeddings", "4", "--set", "passes.0.awq.embeddings.bits=4"], "quantizes the embeddings too"),
    (["--method", "rtn", "--embeddings", "4", "--set", "passes.0.rtn.embeddings.method=gptq"], "passes.0.rtn.embeddings.method: gptq"),
])
def test_bad_embeddings_options_are_exit_2_before_any_work(tiny, tmp_path, extra, says):
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
                            "--no-eval", *extra])
    assert r.exit_code == 2, r.output
    assert says in " ".join(r.output.split()), r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
