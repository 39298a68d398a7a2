"""`compress quantize --method ...` for the scale-folding methods (AWQ, SmoothQuant, W8A8)."""

import json

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli-methods") / "qwen2", "qwen2")


def _quantize(tiny, out, *extra):
    return runner.invoke(
        app,
        ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
         "--no-eval", "--json", *extra],
    )


@pytest.mark.parametrize(
    "method, passes, fmt",
    [
        ("awq", ["awq"], "pack-quantized"),
        ("awq+gptq", ["awq", "gptq"], "pack-quantized"),
        ("smoothquant", ["smoothquant", "gptq"], "int-quantized"),
        ("w8a8", ["gptq"], "int-quantized"),
    ],
)
def test_quantize_methods(tiny, tmp_path, method, passes, fmt):
    r = _quantize(tiny, tmp_path / "out", "--method", method, "--asym", "--alpha", "0.8")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [next(iter(p)) for p in rep["recipe"]["passes"]] == passes
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == fmt
    (grp,) = cfg["config_groups"].values()
    if fmt == "int-quantized":  # W8A8 ignores --asym/--group-size: int8 per channel, symmetric
        assert grp["weights"]["symmetric"] is True and grp["weights"]["strategy"] == "channel"
        assert rep["recipe"]["passes"][0].get("smoothquant", {"alpha": 0.8})["alpha"] == 0.8
    else:
        assert grp["weights"]["symmetric"] is False and grp["weights"]["group_size"] == 16
    assert rep["export"]["quantized_layers"] == 14


def test_unknown_method_exits_2(tiny, tmp_path):
    r = _quantize(tiny, tmp_path / "out", "--method", "awq2")
    assert r.exit_code == 2
    assert "--method 'awq2': choose one of gptq, rtn, awq, awq+gptq, smoothquant, w8a8" in r.output
