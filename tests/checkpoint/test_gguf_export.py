"""GGUF export (``--gguf TYPE``): llama.cpp's per-tensor types, the file, and the closed loop
(``compress eval OUT/model.gguf`` computes what the model computed before export)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gguf
import pytest
import torch
from compress.quant import ggml
from typer.testing import CliRunner

import compress
from compress.checkpoint.gguf import TYPES, tensor_type
from compress.errors import UsageError
from tests.conftest import compressed_in_memory

# the demo's shape (SmolLM2-135M): 30 layers, 9 heads of 64 sharing 3 KV heads, 576 wide, MLP 1536
DEMO = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                       intermediate_size=1536, model_type="llama", tie_word_embeddings=True)


def _t(ftype, name, row):
    return tensor_type(ftype, name, row, DEMO, tied=True)


def test_mix_follows_llama_cpp_on_the_demo():
    # 576-wide rows: K-quants fall back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, Q3_K/Q2_K -> Q4_0)
    assert _t("q4_k_m", "blk.5.attn_q.weight", 576) == "q5_0"
    assert _t("q4_k_m", "blk.0.attn_v.weight", 576) == "q8_0"  # use_more_bits: Q6_K, falls back to Q8_0
    assert _t("q4_k_m", "blk.4.attn_v.weight", 576) == "q5_0"
    # down_proj (1536 = 6 x 256) keeps its K-quant: Q6_K in the first/last eighth and every third between
    more = [i for i in range(30) if _t("q4_k_m", f"blk.{i}.ffn_down.weight", 1536) == "q6_k"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert _t("q4_k_m", "blk.3.ffn_down.weight", 1536) == "q4_k"
    assert _t("q3_k_m", "blk.0.ffn_down.weight", 1536) == "q5_k"  # i < n/16
    assert _t("q3_k_m", "blk.9.ffn_down.weight", 1536) == "q4_k"
    assert _t("q3_k_m", "blk.9.attn_output.weight", 576) == "q5_0"  # Q4_K, falls back
    assert _t("q2_k", "blk.9.ffn_down.weight", 1536) == "q3_k"
    assert _t("q2_k", "blk.9.ffn_up.weight", 576) == "q4_0"
    assert _t("q4_0", "blk.9.ffn_down.weight", 1536) == "q4_0"
    assert _t("iq4_nl", "blk.0.ffn_down.weight", 1536) == "q5_k"
    # with an importance matrix (our calibrated solvers), llama.cpp's other rules for the first ffn_down layers
    assert tensor_type("iq4_nl", "blk.0.ffn_down.weight", 1536, DEMO, True, imatrix=True) == "iq4_nl"
    assert [tensor_type("q4_0", f"blk.{i}.ffn_down.weight", 1536, DEMO, True, imatrix=True) for i in range(5)] == ["q4_1"] * 3 + ["q4_0"] * 2
    assert tensor_type("q5_0", "blk.1.ffn_down.weight", 1536, DEMO, True, imatrix=True) == "q5_1"
    assert _t("q6_k", "blk.9.ffn_down.weight", 1536) == "q6_k"
    # tied embeddings: the token embedding takes the output's type (Q6_K, or Q8_0 for 576-wide rows)
    for t in TYPES:
        assert _t(t, "token_embd.weight", 576) == "q8_0"
    assert tensor_type("q4_k_m", "token_embd.weight", 1024, DEMO, tied=True) == "q6_k"
    assert tensor_type("q4_k_m", "token_embd.weight", 1024, DEMO, tied=False) == "q4_k"
    assert _t("q4_0", "blk.0.attn_q.weight", 100) == "f16"  # no block fits: F16, as llama.cpp


def test_unknown_type_lists_the_supported_ones():
    from compress.recipe import load_recipe

    with pytest.raises(UsageError) as e:
        load_recipe({"export": {"path": "out", "type": "q4_k_x"}})
    assert "q4_k_x" in str(e.value) and "q4_k_m" in str(e.value) and "iq4_nl" in str(e.value)


def test_cli_refuses_unknown_type_and_architecture(tmp_path):
    from compress.cli import app

    r = CliRunner().invoke(app, ["quantize", "demo", "-o", str(tmp_path / "o"), "--gguf", "q9_9", "--dry-run"])
    assert r.exit_code == 2 and "q4_k_m" in r.output, r.output
    from tests.conftest import save_tiny

    opt = save_tiny(tmp_path / "opt", "opt")
    r = CliRunner().invoke(app, ["quantize", str(opt), "-o", str(tmp_path / "o2"), "--method", "rtn", "--gguf", "q4_0", "--no-eval"])
    assert r.exit_code == 2 and "'opt'" in r.output, r.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / ".o2.partial").exists()
    llama = save_tiny(tmp_path / "llama", "llama")
    r = CliRunner().invoke(app, ["quantize", str(llama), "-o", str(tmp_path / "o3"), "--method", "w8a8", "--gguf", "q4_0",
                                 "--no-eval", "--samples", "2", "--seq-len", "32"])
    assert r.exit_code == 2 and "no GGUF form" in r.output and "--method gptq" in r.output, r.output
    assert not (tmp_path / "o3").exists()


# ---------------------------------------------------------------- end to end on a tiny llama


VOCAB = 1024  # a subword vocabulary our GGUF input's tokenizer check accepts (under 0.6 tokens per character)


def _tokenizer():
    import pydoc_data.topics as T

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [T.topics[k] for k in sorted(T.topics)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _save_wide_llama(path, seed=0):
    """A 2-layer llama 256 wide with a 512 MLP: K-quant blocks fit (q/k/v/o/gate/up at 256,
    down at 512) and every tensor of the file is exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    return _save_wide_llama(tmp_path_factory.mktemp("gguf") / "llama")


def _recipe(model, out, ftype, method="gptq"):
    from compress.recipe import load_recipe

    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2},
                        "passes": [{method: {}}], "eval": {"perplexity": {"data": "builtin:pydoc", "seq_len": 64, "max_windows": 4},
                                                         "baseline": False},
                        "export": {"path": str(out), "format": "gguf", "type": ftype}})


@pytest.mark.parametrize(("ftype", "method"), [("q4_k_m", "gptq"), ("q4_0", "rtn")])
def test_gguf_export_round_trip(wide_llama, tmp_path, ftype, method):
    """The file reads back with gguf's reader; each stored tensor has the type the mix assigns;
    ``compress eval OUT`` (the GGUF read back through our GGUF input) gives the perplexity the
    in-memory model computes with the same weights."""
    from compress.api.job import run

    out = tmp_path / "out"
    report = run(_recipe(wide_llama, out, ftype, method))
    f = out / "model.gguf"
    assert f.is_file() and not any(p.name.endswith(".safetensors") for p in out.iterdir())
    r = gguf.GGUFReader(f)
    types = {t.name: t.tensor_type.name.lower() for t in r.tensors}
    expect = "q4_k" if ftype == "q4_k_m" else "q4_0"
    assert types["blk.1.attn_q.weight"] == expect
    # use_more_bits(i, 2) holds for layer 1 only: its attn_v and ffn_down are Q6_K in q4_k_m
    assert types["blk.0.ffn_down.weight"] == expect and types["blk.0.attn_v.weight"] == expect
    assert types["blk.1.ffn_down.weight"] == types["blk.1.attn_v.weight"] == ("q6_k" if ftype == "q4_k_m" else "q4_0")
    assert types["output.weight"] == "q6_k" and types["blk.0.attn_norm.weight"] == "f32"
    assert types["token_embd.weight"] == expect
    from compress.api.inspection import inspect_checkpoint

    info = inspect_checkpoint(out)  # compress inspect OUT
    assert info["format"] == "gguf" and info["model_type"] == "llama" and sum(info["gguf_types"].values()) == len(r.tensors)
    assert info["runtimes"]["loads"] == ["llama.cpp", "compress"] and info["size_bytes"] == f.stat().st_size
    meta = json.loads((out / "compress.json").read_text())
    assert meta["runtimes"]["loads"] == ["llama.cpp", "compress"]
    assert report["gguf"]["tensors"] == len(r.tensors) and report["gguf"]["fallbacks"] == {}  # 256-multiple rows: none

    # the closed loop: the model before export (solved layers in memory, the embedding and output
    # rounded as the exporter rounds them) and the file read back compute the same logits
    recipe = _recipe(wide_llama, tmp_path / "unused", ftype, method)
    before = compressed_in_memory(wide_llama, recipe, tmp_path / "work").float()
    cfg = before.config
    for hf, g, row in (("model.embed_tokens.weight", "token_embd.weight", cfg.hidden_size), ("lm_head.weight", "output.weight", cfg.hidden_size)):
        p = before.get_parameter(hf)
        codes, params = ggml.rtn(p.detach().float(), ggml.grid(tensor_type(ftype, g, row, cfg, False)))
        p.data.copy_(ggml.dequantize(codes, params))
    after = compress.load(out, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = before(ids).logits, after(ids).logits
    # the file is read back as a bf16 checkpoint (our GGUF input): bf16 rounding of the weights apart, equal
    assert (a - b).abs().max() < 0.05 * a.abs().max(), float((a - b).abs().max())
    lp_a, lp_b = a.log_softmax(-1), b.log_softmax(-1)
    nll_a = -lp_a[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    nll_b = -lp_b[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert abs(float(nll_a.exp() / nll_b.exp()) - 1) < 0.005  # perplexity within 0.5%
    # a plain-weights baseline on the same ids is farther: the test can tell weights apart
    orig = compress.load(wide_llama, dtype=torch.float32)
    with torch.no_grad():
        c = orig(ids).logits
    assert (a - c).abs().max() > 2 * (a - b).abs().max()
    # the run evaluated the file it wrote (our GGUF input reads OUT), not the model in memory
    assert report["eval"]["model"]["ref"] == str(out) and "gguf" in report["eval"]["model"]["path"]
    assert 1 < report["eval"]["metrics"][0]["model"] < 10 * VOCAB


def test_ggml_linear_follows_its_blocks():
    """A GGUF layer keeps its dequantized weight between forwards and rebuilds it when its blocks
    change (load_state_dict copies in place): the shared cache of compressed layers."""
    from compress.checkpoint.ggml_linear import GGMLLinear

    g = ggml.grid("q4_k")
    w1, w2 = torch.randn(2, 8, 256).unbind(0)
    m1, m2 = (GGMLLinear.from_blocks(ggml.encode(*ggml.rtn(w, g)), g.qtype, 256) for w in (w1, w2))
    x = torch.randn(3, 256)
    assert torch.allclose(m1(x), x @ m1.dequantize().T)
    m1.load_state_dict(m2.state_dict())
    assert torch.equal(m1(x), m2(x)) and torch.allclose(m1(x), x @ m2.dequantize().T)
    assert torch.equal(m1.dequantize(), ggml.dequantize(*ggml.rtn(w2, g)))
