"""Corrupt checkpoints fail fast with exit 3, naming the file or tensor, and write nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compress.cli import app
from conftest import save_tiny

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path):
    return save_tiny(tmp_path / "m", "llama")


def _weights(path):
    (f,) = path.glob("*.safetensors")
    return f


def _quantize(model, out):
    return runner.invoke(app, ["quantize", str(model), "-o", str(out), "--method", "rtn", "--samples", "4", "--seq-len", "32", "--no-eval"])


def test_truncated_safetensors_exit_3_naming_the_file(tiny, tmp_path):
    f = _weights(tiny)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "o"
    r = _quantize(tiny, out)
    assert r.exit_code == 3, r.output
    assert f.name in r.output and "truncated" in r.output
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_corrupt_header_exit_3(tiny, tmp_path):
    f = _weights(tiny)
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    out = tmp_path / "o"
    r = _quantize(tiny, out)
    assert r.exit_code == 3 and "bad header" in r.output and f.name in r.output
    assert not out.exists()


def test_nan_weights_exit_3_naming_the_tensor_and_count(tiny, tmp_path):
    f = _weights(tiny)
    t = load_file(f)
    w = t["model.layers.1.mlp.up_proj.weight"]
    w.view(-1)[:3] = float("nan")
    w.view(-1)[3] = float("inf")
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "o"
    r = _quantize(tiny, out)
    assert r.exit_code == 3, r.output
    assert "model.layers.1.mlp.up_proj.weight" in r.output and "4 NaN or infinite" in r.output
    assert not out.exists()
    r = runner.invoke(app, ["eval", str(tiny), "--max-windows", "1", "--seq-len", "32"])
    assert r.exit_code == 3 and "up_proj.weight" in r.output
