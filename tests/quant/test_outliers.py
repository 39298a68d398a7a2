"""GPTQ with SpQR-style outliers (``gptq: {outliers: f}``): the export stores them beside the codes
(``OutlierQuantLinear``), compress.load gives the in-memory logits back, other runtimes refuse,
and impossible recipes exit before any work."""

import json

import pytest
import torch
from conftest import compressed_in_memory, save_tiny

from compress.errors import UsageError


def _recipe(model, out, passes, **export):
    from compress.recipe import load_recipe

    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out), **export}})


def test_outliers_export_and_reload_with_the_in_memory_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.api import run
    from compress.api.inspection import inspect_checkpoint
    from compress.checkpoint.load import load

    path = save_tiny(tmp_path / "m", "llama")
    passes = [{"gptq": {"bits": 3, "group_size": 16, "outliers": 0.05}}]
    rec = _recipe(path, tmp_path / "out", passes)
    report = run(rec)
    meta = json.loads((tmp_path / "out" / "compress.json").read_text())
    layers = meta["outliers"]["layers"]
    assert len(layers) == 14 and {v["bits"] for v in layers.values()} == {3}
    assert all(v["per_column"] >= 1 for v in layers.values())
    assert meta["runtimes"]["loads"] == ["compress"] and "outlier" in meta["runtimes"]["refuses"]["transformers"]["why"]
    reloaded = load(tmp_path / "out", dtype=torch.float32)
    kinds = [type(m).__name__ for m in reloaded.modules()]
    assert kinds.count("OutlierQuantLinear") == 14 and "QuantLinear" not in kinds
    mem = compressed_in_memory(path, rec, tmp_path / "mem")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)
    info = inspect_checkpoint(tmp_path / "out")
    assert info["quantized_layers"] == 14 and info["parameters"] == AutoModelForCausalLM.from_pretrained(path).num_parameters()
    # the outliers cost bits: more than plain W3 g16 on the same model
    plain = run(_recipe(path, tmp_path / "plain", [{"gptq": {"bits": 3, "group_size": 16}}]))
    assert report["export"]["bits_per_parameter"] > plain["export"]["bits_per_parameter"]
    err = {r["name"]: r["rel_output_error"] for r in report["layers"]}
    err_plain = {r["name"]: r["rel_output_error"] for r in plain["layers"]}
    assert sum(err.values()) < sum(err_plain.values())
    with pytest.raises(Exception, match="mismatched_sizes|compression_ratio"):  # transformers refuses to load it (the sentinel)
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("passes,export,match", [
    ([{"gptq": {"outliers": 0.01}}], {"target": "vllm"}, r"passes\.0\.gptq\.outliers: export.target is vllm"),
    ([{"gptq": {"outliers": 0.01}}], {"format": "gguf", "type": "q4_0"}, r"passes\.0\.gptq\.outliers: a GGUF export"),
    ([{"gptq": {"outliers": 0.01, "bits": 8, "group_size": -1, "activations": {"bits": 8}}}], {}, "outliers apply to weight-only"),
    ([{"gptq": {"outliers": 0.5}}], {}, r"passes\.0\.gptq\.outliers"),
])
def test_impossible_outlier_recipes_are_refused_before_any_work(tmp_path, passes, export, match):
    from compress.api import run

    path = save_tiny(tmp_path / "m", "llama")
    with pytest.raises(UsageError, match=match):
        run(_recipe(path, tmp_path / "out", passes, **export))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,says", [
    (["--outliers", "0.01", "--target", "vllm"], "passes.0.gptq.outliers: export.target is vllm"),
    (["--outliers", "0.01", "--method", "w8a8"], "outliers apply to weight-only"),
])
def test_the_cli_exits_2_on_outliers_a_runtime_cannot_read(tmp_path, extra, says):
    from typer.testing import CliRunner

    from compress.cli import app

    path = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["quantize", str(path), "-o", str(out), "--samples", "4", "--seq-len", "32", "--no-eval", *extra])
    assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    assert not out.exists()
