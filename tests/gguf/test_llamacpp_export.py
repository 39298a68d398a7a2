"""Our GGUF export loaded by llama.cpp itself (marked ``llamacpp``: needs llama.cpp's tools,
``COMPRESS_LLAMA_CPP`` or ``python -m compress.eval.llamacpp build``; skipped with the reason
otherwise).

The demo is exported at q4_0 and q4_k_m with round-to-nearest (no calibration, quick), and
llama.cpp's perplexity of each file on a slice of the evaluation text is compared with llama.cpp's
perplexity of the bf16 conversion its own converter makes: a file whose q/k rows, tokenizer or
metadata were wrong would score far worse (a wrong rotary layout alone multiplies it)."""

from __future__ import annotations

import math

import pytest
from compress.eval import llamacpp as lc

pytestmark = [pytest.mark.llamacpp, pytest.mark.skipif(lc.find_tools() is None, reason=lc.unavailable_reason() or "")]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    from compress.data import load_texts

    f = tmp_path_factory.mktemp("text") / "eval.txt"
    f.write_text("\n\n".join(load_texts("builtin:pydoc", "eval"))[:12000])  # ~3,000 tokens: 5 windows of 512
    return f


@pytest.fixture(scope="module")
def bf16_ppl(eval_text, tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="convert_hf_to_gguf.py's Llama path imports sentencepiece")
    if lc.find_converter() is None:
        pytest.skip("convert_hf_to_gguf.py is not installed beside the tools (python -m compress.eval.llamacpp build)")
    from compress.checkpoint.source import resolve_model

    f = lc.convert_hf(resolve_model("demo"), tmp_path_factory.mktemp("bf16") / "demo-bf16.gguf", "bf16")
    return lc.perplexity(f, eval_text, ctx=512)["ppl"]


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])
def test_llama_cpp_runs_our_export(ftype, eval_text, bf16_ppl, tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    out = tmp_path / ftype
    r = CliRunner().invoke(app, ["quantize", "demo", "--method", "rtn", "--gguf", ftype, "-o", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    res = lc.perplexity(out / "model.gguf", eval_text, ctx=512)
    assert math.isfinite(res["ppl"]) and res["chunks"] >= 4
    # 4-bit round-to-nearest of a 135M model costs some perplexity, never a multiple of it
    assert bf16_ppl < res["ppl"] < 1.6 * bf16_ppl, (res["ppl"], bf16_ppl)
