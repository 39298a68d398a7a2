"""compress.eval.llamacpp: the parsers of llama.cpp's tool output (captured samples, no tools
needed) and, where the tools are installed, converting the demo to a bf16 GGUF and measuring it."""

from __future__ import annotations

import json
import math

import pytest
from compress.eval import llamacpp as lc

# llama-perplexity -m bf16.gguf -f eval.txt -c 512 -b 512 -t 2 (the demo, builtin:pydoc's
# evaluation split), abridged: the lines the parser reads and a few around them.
PERPLEXITY_SAMPLE = """\
0.00.151.939 I perplexity: tokenizing the input ..
0.00.207.199 I perplexity: tokenization took 24.631 ms
0.00.207.266 I perplexity: calculating perplexity over 33 chunks, n_ctx=512, batch_size=512, n_seq=1
0.01.208.284 I perplexity: 1.00 seconds per pass - ETA 0.55 minutes
[1]19.9792,[2]10.9122,[3]12.1656,[4]12.6875,[5]11.7752,[6]11.1462,[7]11.4617,[8]10.8362,[9]10.6546,[10]11.1690,[11]11.3968,[12]10.6024,[13]10.3639,[14]10.1393,[15]10.4783,[16]10.4173,[17]10.2777,[18]10.4853,[19]10.7003,[20]10.7203,[21]10.8194,[22]11.2511,[23]11.5699,[24]11.6417,[25]11.6202,[26]11.7111,[27]11.7695,[28]11.3209,[29]11.0415,[30]10.9368,[31]10.5991,[32]10.6048,[33]10.3911,
0.34.557.335 I Final estimate: PPL = 10.3911 +/- 0.28695
"""

TOO_SHORT_SAMPLE = """\
0.00.151.939 I perplexity: tokenizing the input ..
0.00.152.001 E perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512
0.00.152.002 E perplexity: the data file you provided tokenizes to only 300 tokens
"""

# llama-quantize bf16.gguf q4_k_m.gguf Q4_K_M 2 on the demo, abridged: the type choices (and
# their fallbacks: hidden size 576 is not a multiple of the k-quants' 256-wide blocks) come
# first, then one line per tensor, then the totals.
QUANTIZE_SAMPLE = """\
llama_quantize: quantizing 'bf16.gguf' to 'q4_k_m.gguf' as Q4_K_M using 2 threads
warning: blk.0.attn_k.weight                  - ncols    576 not divisible by 256 (required for type    q4_K) -> falling back to    q5_0
warning: blk.0.attn_v.weight                  - ncols    576 not divisible by 256 (required for type    q6_K) -> falling back to    q8_0
[   1/ 272] output_norm.weight                   - [   576,      1,      1,      1], type =    f32, size =    0.002 MiB
[   2/ 272] token_embd.weight                    - [   576,  49152,      1,      1], type =   bf16, converting to q8_0 .. size =    54.00 MiB ->    28.69 MiB
[   3/ 272] blk.0.attn_k.weight                  - [   576,    192,      1,      1], type =   bf16, converting to q5_0 .. size =     0.21 MiB ->     0.07 MiB
[   7/ 272] blk.0.attn_v.weight                  - [   576,    192,      1,      1], type =   bf16, converting to q8_0 .. size =     0.21 MiB ->     0.11 MiB
[   8/ 272] blk.0.ffn_down.weight                - [  1536,    576,      1,      1], type =   bf16, converting to q6_K .. size =     1.69 MiB ->     0.69 MiB
llama_model_quantize_impl: model size  =   256.63 MiB (16.00 BPW)
llama_model_quantize_impl: quant size  =    98.87 MiB (6.17 BPW)
llama_model_quantize_impl: WARNING: 180 of 272 tensor(s) required fallback quantization

llama_quantize: quantize time =  2539.25 ms
"""

BENCH_SAMPLE = json.dumps([
    {"model_type": "llama ?B BF16", "model_size": 269100288, "model_n_params": 134515008, "n_threads": 2,
     "n_prompt": 128, "n_gen": 0, "avg_ts": 512.5, "stddev_ts": 3.1},
    {"model_type": "llama ?B BF16", "model_size": 269100288, "model_n_params": 134515008, "n_threads": 2,
     "n_prompt": 0, "n_gen": 64, "avg_ts": 61.2, "stddev_ts": 0.4},
])


def test_parse_perplexity():
    r = lc.parse_perplexity(PERPLEXITY_SAMPLE)
    assert r["ppl"] == 10.3911 and r["ppl_stderr"] == 0.28695
    assert (r["chunks"], r["n_ctx"], r["batch_size"]) == (33, 512, 512)
    assert r["scored_tokens"] == 33 * 255  # the second half of each window, less the last token
    assert len(r["running"]) == 33 and r["running"][-1] == r["ppl"]


def test_parse_perplexity_errors():
    with pytest.raises(ValueError, match="300 tokens.*at least 1024"):
        lc.parse_perplexity(TOO_SHORT_SAMPLE)
    with pytest.raises(ValueError, match="no 'Final estimate'"):
        lc.parse_perplexity("perplexity: tokenizing the input ..\n")


def test_parse_quantize():
    r = lc.parse_quantize(QUANTIZE_SAMPLE)
    assert r["tensors"]["output_norm.weight"] == {"shape": "576,      1,      1,      1", "from": "f32", "to": "f32"}
    assert r["tensors"]["token_embd.weight"]["to"] == "q8_0"
    assert r["tensors"]["blk.0.attn_k.weight"]["to"] == "q5_0"
    assert r["tensors"]["blk.0.ffn_down.weight"] == {"shape": "1536,    576,      1,      1", "from": "bf16", "to": "q6_K"}
    assert [(f["tensor"], f["ncols"], f["block"], f["wanted"], f["got"]) for f in r["fallbacks"]] == [
        ("blk.0.attn_k.weight", 576, 256, "q4_K", "q5_0"), ("blk.0.attn_v.weight", 576, 256, "q6_K", "q8_0")]
    assert (r["quant_mib"], r["quant_bpw"], r["model_mib"], r["model_bpw"]) == (98.87, 6.17, 256.63, 16.0)


def test_parse_bench():
    r = lc.parse_bench("load: some log line\n" + BENCH_SAMPLE + "\n")
    assert (r["pp_tok_s"], r["tg_tok_s"], r["n_prompt"], r["n_gen"]) == (512.5, 61.2, 128, 64)


def test_find_tools_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.ENV, str(tmp_path))
    assert lc.find_tools() is None
    assert lc.ENV in lc.unavailable_reason() and "llama-perplexity" in lc.unavailable_reason()
    for t in lc.TOOLS:
        (tmp_path / t).write_text("#!/bin/sh\n")
        (tmp_path / t).chmod(0o755)
    assert lc.find_tools() == tmp_path and lc.unavailable_reason() is None


def test_converter_view_turns_byte_fallback_off(tmp_path):
    hf = tmp_path / "model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    tok = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    view = lc.converter_view(hf, tmp_path / "scratch")
    assert view != hf and (view / "config.json").resolve() == (hf / "config.json").resolve()
    assert json.loads((view / "tokenizer.json").read_text())["model"]["byte_fallback"] is False
    tok["model"]["byte_fallback"] = False
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    assert lc.converter_view(hf, tmp_path / "scratch2") == hf  # nothing to change: the folder itself


needs_tools = pytest.mark.skipif(lc.find_tools() is None, reason=lc.unavailable_reason() or "")


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="convert_hf_to_gguf.py's Llama path imports sentencepiece (pip install sentencepiece)")
    if lc.find_converter() is None:
        pytest.skip("convert_hf_to_gguf.py is not installed beside the tools (python -m compress.eval.llamacpp build)")
    from compress.checkpoint.source import resolve_model

    out = tmp_path_factory.mktemp("gguf") / "demo-bf16.gguf"
    return lc.convert_hf(resolve_model("demo"), out, "bf16")


@pytest.mark.llamacpp
@needs_tools
def test_demo_bf16_gguf_perplexity(demo_gguf, tmp_path):
    from gguf import GGUFReader

    from compress.data import load_texts

    r = GGUFReader(str(demo_gguf))
    assert bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"  # not the SentencePiece path
    stats = lc.gguf_stats(demo_gguf)
    assert 15.9 < stats["bpw"] < 16.1 and 1.3e8 < stats["n_elements"] < 1.4e8

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(load_texts("builtin:pydoc", "eval"))[:6000])  # ~1,500 tokens
    res = lc.perplexity(demo_gguf, text, ctx=256, threads=2)
    assert res["chunks"] >= 3 and res["n_ctx"] == 256
    assert math.isfinite(res["ppl"]) and 2 < res["ppl"] < 60, res
