"""The token embedding as a tensor train (the quantizers' ``embeddings: {tt_rank: R}``, ``--embeddings-tt``).

TT-SVD (``compress.quant.tt``) is exact at full ranks and its error falls as the ranks grow; the
lookup (each row from its core slices) equals the slow reference (the whole table, then indexing)
on odd shapes, padded vocabularies included; ``TTEmbedding`` exports as its cores and a
compress.json section, reloads in ``compress.load`` computing what the in-memory model computes,
with the tied lm_head untied (dense, or quantized with ``head_bits``); the other runtimes refuse it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from compress.quant import tt_module
from compress.quant.tt import (
    factorize,
    ranks,
    tt_full,
    tt_parameters,
    tt_rows,
    tt_shape,
    tt_svd,
)
from compress.quant.tt_module import TTEmbedding
from conftest import VOCAB, compressed_in_memory, save_tiny
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from compress.api import inspect_checkpoint, run
from compress.checkpoint.export import Exporter
from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.load import load
from compress.cli import app
from compress.recipe import load_recipe

runner = CliRunner()
SHAPES = [(1000, 48), (997, 45), (320, 64), (101, 63)]  # 997 and 101 are prime: their vocabularies are padded


def _table(V, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- the algorithm


def test_factorizations_pad_the_vocabulary_and_split_the_width_exactly():
    assert factorize(1000, 3) == (10, 10, 10) and factorize(997, 3) == (10, 10, 10)  # 3 zero rows
    assert factorize(49152, 3) == (36, 37, 37) and factorize(49152, 3, pad=0) == (32, 32, 48)
    s = tt_shape(997, 45)
    assert s.padded == 1000 and s.dim == (3, 3, 5) and s.embedding_dim == 45
    assert tt_shape(576, 67).dim == (1, 1, 67)  # a prime width: one real factor
    assert math.prod(tt_shape(49152, 576, cores=4).dim) == 576


@pytest.mark.parametrize("V,D", SHAPES)
def test_full_ranks_reconstruct_the_table_exactly(V, D):
    E = _table(V, D)
    shape = tt_shape(V, D)
    cores = tt_svd(E, shape)
    assert all(g.dtype == torch.float64 for g in cores)
    assert [g.shape[1:3] for g in cores] == list(zip(shape.vocab, shape.dim))
    assert cores[0].shape[0] == cores[-1].shape[-1] == 1
    torch.testing.assert_close(tt_full(cores, shape), E, rtol=0, atol=1e-12)


@pytest.mark.parametrize("V,D", SHAPES[:2])
def test_the_error_falls_as_the_rank_grows_and_meets_its_target(V, D):
    E = _table(V, D)
    shape = tt_shape(V, D)
    errs, params = [], []
    for r in (1, 2, 4, 8, 16, 32):
        cores = tt_svd(E, shape, max_rank=r)
        assert max(ranks(cores)) <= r
        errs.append(float((tt_full(cores, shape) - E).norm() / E.norm()))
        params.append(tt_parameters(cores))
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert all(a < b for a, b in itertools.pairwise(params)) and params[-1] < V * D
    for eps in (0.5, 0.2, 0.05):  # Oseledets' bound: ‖E - Ê‖_F ≤ ε‖E‖_F
        cores = tt_svd(E, shape, rel_error=eps)
        assert float((tt_full(cores, shape) - E).norm() / E.norm()) <= eps + 1e-12


@pytest.mark.parametrize("V,D", SHAPES)
def test_the_row_lookup_equals_the_whole_table_indexed(V, D):
    E = _table(V, D, seed=1)
    shape = tt_shape(V, D)
    cores = tt_svd(E, shape, max_rank=6)
    ids = torch.cat([torch.tensor([0, V - 1, V - 1]), torch.randint(0, V, (37,))]).reshape(8, 5)  # both ends, repeats
    torch.testing.assert_close(tt_rows(cores, ids, shape.vocab), tt_full(cores, shape)[ids], rtol=0, atol=1e-12)


def test_the_module_builds_only_the_rows_asked_for(monkeypatch):
    V, D = 997, 45
    shape = tt_shape(V, D)
    m = TTEmbedding.from_cores(tt_svd(_table(V, D).float(), shape, max_rank=5), shape, dtype=torch.bfloat16)
    dense = m.dense_weight()  # (V, D) float32, from the bf16 cores as stored
    assert dense.shape == (V, D) and m.bits_per_weight < 16
    monkeypatch.setattr(tt_module, "tt_full", lambda *a: pytest.fail("the lookup formed the whole table"))
    monkeypatch.setattr(tt_module, "CHUNK", 7 * tt_module.lookup_width(m.cores()))  # chunks of 7 distinct ids
    ids = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(m(ids), dense[ids], rtol=1e-6, atol=1e-6)
    m.set_dtype(torch.bfloat16)
    assert m(ids).dtype == torch.bfloat16


def test_the_option_selects_a_tensor_train_or_a_quantized_table():
    from compress.quant.embeddings import EmbeddingsConfig

    assert EmbeddingsConfig().bits == 4 and EmbeddingsConfig(bits=8).bits == 8 and not EmbeddingsConfig(bits=8).tt
    tt = EmbeddingsConfig(tt_rank=64)
    assert tt.tt and tt.bits is None and tt.head_bits is None
    assert EmbeddingsConfig.model_validate(tt.model_dump()) == tt  # the resolved recipe reads back the same
    assert EmbeddingsConfig(tt_error=0.3).tt and EmbeddingsConfig(tt_rank=8, head_bits=8).head_bits == 8


# ---------------------------------------------------------------- end to end: export, reload, refusals

CAL = {"samples": 4, "seq_len": 32, "batch_size": 2}


def _recipe(model, out, embeddings, method="rtn", **export):
    return load_recipe({"model": str(model), "calibration": CAL, "passes": [{method: {"bits": 4, "group_size": 16, "embeddings": embeddings}}],
                        "eval": {"perplexity": None}, "export": {"path": str(out), **export}})


def _recording(fn):
    """``fn()`` with every outside-the-blocks result recorded: (its value, {name: module as written})."""
    seen = {}
    original = Exporter.write_outside

    def record(self, res):
        seen.update({r.name: copy.deepcopy(res.module.get_submodule(r.name)) for r in res.layers})
        original(self, res)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Exporter, "write_outside", record)
        return fn(), seen


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied llama, RTN W4 g16, its embedding a tensor train of rank 8 (the head kept dense); the
    same compression in memory, its outside modules recorded."""
    root = tmp_path_factory.mktemp("tt")
    model = save_tiny(root / "m", "llama")
    recipe = _recipe(model, root / "out", {"tt_rank": 8})
    report, seen = _recording(lambda: run(recipe))
    mem, mem_seen = _recording(lambda: compressed_in_memory(model, recipe, root / "mem"))
    mem.model.embed_tokens = mem_seen["model.embed_tokens"]
    mem.lm_head = mem_seen["lm_head"].float()  # untied: its own copy of the table
    return {"model": model, "out": root / "out", "report": report, "seen": seen, "mem": mem}


def _tensors(out) -> dict[str, torch.Tensor]:
    with safe_open(out / "model.safetensors", "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open is no mapping)


def test_the_export_stores_the_cores_and_an_untied_dense_head(tied):
    out, seen = tied["out"], tied["seen"]
    stored = _tensors(out)
    emb = seen["model.embed_tokens"]
    assert {"model.embed_tokens.tt_core_0", "model.embed_tokens.tt_core_1", "model.embed_tokens.tt_core_2", "lm_head.weight"} <= stored.keys()
    for k, g in enumerate(emb.cores()):
        assert torch.equal(stored[f"model.embed_tokens.tt_core_{k}"], g) and g.dtype == torch.bfloat16
    with safe_open(tied["model"] / "model.safetensors", "pt") as h:
        table = h.get_tensor("model.embed_tokens.weight")
    assert torch.equal(stored["lm_head.weight"], table)  # the head: the original table, dense
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    section = json.loads((out / "compress.json").read_text())["tt_embedding"]
    assert section["layers"]["model.embed_tokens"] == {"num_embeddings": VOCAB, "embedding_dim": 64, "vocab_factors": [5, 8, 8],
                                                       "dim_factors": [4, 4, 4], "ranks": [8, 8]}
    layer = next(r for r in tied["report"]["layers"] if r["name"] == "model.embed_tokens")
    assert layer["info"]["tt_parameters"] == tt_parameters(emb.cores()) and 0 < layer["info"]["rel_weight_error"] < 1


def test_the_reloaded_model_computes_what_the_in_memory_one_does(tied):
    m = load(tied["out"], dtype=torch.float32, log=lambda *_: None)
    emb = m.get_input_embeddings()
    assert isinstance(emb, TTEmbedding) and ranks(emb.cores()) == [8, 8]
    assert type(m.get_output_embeddings()) is nn.Linear and m.lm_head.weight is not None
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, tied["mem"](input_ids=x).logits, rtol=0, atol=1e-5)
        ref = copy.deepcopy(m)
        ref.model.embed_tokens = nn.Embedding.from_pretrained(emb.dense_weight())  # the dense table
        torch.testing.assert_close(m(input_ids=x).logits, ref(input_ids=x).logits, rtol=0, atol=1e-5)


def test_layer_by_layer_perplexity_and_inspect_read_the_tensor_train(tied):
    from compress.eval.layerwise import layerwise_perplexity
    from compress.eval.perplexity import perplexity

    from compress.checkpoint.source import ModelSource

    windows = torch.randint(0, VOCAB, (2, 16))
    whole = perplexity(load(tied["out"], dtype=torch.float32, log=lambda *_: None), windows)["perplexity"]
    assert layerwise_perplexity(ModelSource(tied["out"]), windows)["perplexity"] == pytest.approx(whole, rel=1e-4)
    info = inspect_checkpoint(tied["out"])
    assert info["tt_embedding"]["model.embed_tokens"]["ranks"] == [8, 8]
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tied["model"]).num_parameters()  # the tied table counted once
    assert info["parameters"] == dense + VOCAB * 64  # the table (as many weights as it stands for) and the untied head
    assert info["runtimes"]["loads"] == ["compress"]
    text = " ".join(runner.invoke(app, ["inspect", str(tied["out"])]).output.split())
    assert "model.embed_tokens: tensor train 5·8·8 × 4·4·4, ranks [8, 8]" in text


def test_plain_transformers_refuses_the_export(tied):
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="transformers cannot load this"):
        AutoModelForCausalLM.from_pretrained(tied["out"])
    rt = json.loads((tied["out"] / "compress.json").read_text())["runtimes"]
    assert "tensor-train embedding" in rt["refuses"]["transformers"]["why"] and "vLLM" in rt["refuses"]


def test_head_bits_quantize_the_untied_head_with_gptq_on_its_inputs(tmp_path):
    model = save_tiny(tmp_path / "m", "llama")
    report, seen = _recording(lambda: run(_recipe(model, tmp_path / "out", {"tt_rank": 4, "head_bits": 8}, method="gptq")))
    head = next(r for r in report["layers"] if r["name"] == "lm_head")
    assert head["info"]["method"] == "gptq" and head["info"]["bits"] == 8 and 0 < head["rel_output_error"] < 1
    m = load(tmp_path / "out", dtype=torch.float32, log=lambda *_: None)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bits == 8 and isinstance(m.model.embed_tokens, TTEmbedding)
    for k in ("weight_packed", "weight_scale"):
        assert torch.equal(getattr(m.lm_head, k), getattr(seen["lm_head"], k))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_the_tensor_train_alone_leaves_the_blocks_as_they_are(tmp_path):
    """`--ignore 're:.*'`: no Linear is quantized, the embedding alone becomes a tensor train (the
    export has no quantization_config: transformers stops on the empty tensor in the table's place)."""
    from transformers import AutoModelForCausalLM

    model = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(model), "-o", str(out), "--method", "rtn", "--ignore", "re:.*", "--embeddings-tt", "16",
                            "--no-eval"])
    assert r.exit_code == 0, r.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stored, source = _tensors(out), _tensors(model)
    assert stored["model.embed_tokens.weight"].numel() == 0  # the sentinel only transformers reads
    assert all(torch.equal(stored[k], v) for k, v in source.items() if k != "model.embed_tokens.weight")
    assert torch.equal(stored["lm_head.weight"], source["model.embed_tokens.weight"])
    with pytest.raises(Exception, match="mismatched_sizes"):  # the sentinel stops it
        AutoModelForCausalLM.from_pretrained(out)
    m = load(out, dtype=torch.float32, log=lambda *_: None)
    orig = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    orig.model.embed_tokens = nn.Embedding.from_pretrained(m.model.embed_tokens.dense_weight())
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, orig(input_ids=x).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bad input: exit 2, before any work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tt_bad") / "llama", "llama")


@pytest.mark.parametrize("extra,says", [
    (["--target", "vllm"], "passes.0.gptq.embeddings.tt_rank: export.target is vllm, and vLLM has no reader for a tensor-train"),
    (["--target", "transformers"], "passes.0.gptq.embeddings.tt_rank: export.target is transformers"),
    (["--target", "vllm-cpu"], "passes.0.gptq.embeddings.tt_rank: export.target is vllm-cpu"),
    (["--gguf", "q4_0"], "passes.0.gptq.embeddings.tt_rank: a GGUF export"),
    (["--set", "passes.0.gptq.embeddings.bits=4"], "tt_rank/tt_error and bits exclude each other"),
    (["--set", "passes.0.gptq.embeddings.tt_rank=0"], "passes.0.gptq.embeddings.tt_rank"),
    (["--set", "passes.0.gptq.embeddings.tt_error=1.5"], "passes.0.gptq.embeddings.tt_error"),
    (["--embeddings", "4", "--set", "passes.0.gptq.embeddings.group_size=48"], "passes.0.gptq.embeddings.group_size: 48 does not divide"),
])
def test_bad_tt_options_are_exit_2_before_any_work(tiny, tmp_path, extra, says):
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
                            "--no-eval", "--embeddings-tt", "8", *extra])
    assert r.exit_code == 2, r.output
    assert says in " ".join(r.output.split()), r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_head_bits_without_a_tensor_train_is_exit_2(tiny, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "out"), "--no-eval", "--embeddings", "4",
                            "--set", "passes.0.gptq.embeddings.head_bits=4"])
    assert r.exit_code == 2 and "head_bits is the lm_head's width beside a tensor-train table" in " ".join(r.output.split()), r.output
