"""Corrupt checkpoints fail fast with exit 3, naming the file or tensor, and write nothing."""


import pytest
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compress.cli import app

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


def test_every_bad_pass_is_named(tiny, tmp_path):
    r = runner.invoke(app, ["run", "--set", f"model={tiny}", "--set",
                            "passes=[{gptq: {bits: 1}}, {rtn: {bits: 4}}, {wanda: {sparsity: 2}}, {nosuch: {}}]", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "passes.0.gptq.bits" in text and "passes.2.wanda" in text and "passes.3: unknown pass 'nosuch'" in text
    assert "passes.1" not in text


def test_empty_or_short_calibration_text_names_the_file(tiny, tmp_path):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("a few words")
    for f, code, what in ((empty, 3, "no text"), (short, 2, "tokens of calibration text")):
        r = runner.invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "o"), "--data", str(f), "--seq-len", "32", "--no-eval"])
        assert r.exit_code == code, r.output
        assert f.name in r.output and what in " ".join(r.output.split())
        assert not (tmp_path / "o").exists()


def test_data_free_recipes_read_no_calibration_data(tiny, tmp_path, monkeypatch):
    import compress.api.job as api_mod
    import compress.data as data
    from compress.recipe import load_recipe

    def no_data(*a, **k):
        raise AssertionError("calibration data was read")

    rec = {"model": str(tiny), "passes": [{"rtn": {"bits": 4}}], "eval": {"perplexity": None}, "export": {"path": str(tmp_path / "o")}}
    with monkeypatch.context() as m:
        m.setattr(data, "load_texts", no_data)  # where the calibration set is read
        rep = api_mod.run(load_recipe(rec))
    assert all(l["rel_output_error"] is None and 0 < l["info"]["rel_weight_error"] < 0.1 for l in rep["layers"])
    assert "relative weight error" in (tmp_path / "o" / "report.md").read_text()
    rep = api_mod.run(load_recipe({**rec, "report": {"layer_error": "output"}, "calibration": {"samples": 4, "seq_len": 32},
                                   "export": {"path": str(tmp_path / "o2")}}))
    assert all(l["rel_output_error"] is not None for l in rep["layers"])
