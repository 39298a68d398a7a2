"""The command line: exit codes, --json, messages (CliRunner, tiny models)."""

import json

import pytest
from typer.testing import CliRunner

from compress.cli import app
from conftest import save_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "llama", "llama")


def _quantize(tiny, out, *extra):
    return runner.invoke(
        app,
        ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
         "--set", "eval.perplexity.max_windows=2", "--set", "eval.perplexity.seq_len=32", "--json", *extra],
    )


def test_quantize_json_inspect_eval(tiny, tmp_path):
    r = _quantize(tiny, tmp_path / "out", "--method", "rtn", "--bits", "8")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["schema"] == "compress.report/1" and rep["export"]["schemes"][0]["bits"] == 8
    assert all(l["rel_output_error"] is not None for l in rep["layers"])

    r = runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["quantized_layers"] == 14 and 8 < info["bits_per_parameter"] < 16

    r = runner.invoke(app, ["eval", str(tmp_path / "out"), "--baseline", str(tiny), "--seq-len", "32", "--max-windows", "2", "--json"])
    assert r.exit_code == 0
    res = json.loads(r.stdout)
    assert res["model"]["tokens"] == res["baseline"]["tokens"] == 62


def test_dry_run_prints_resolved_recipe(tiny):
    r = runner.invoke(app, ["quantize", str(tiny), "-o", "x", "--bits", "3", "--dry-run"])
    assert r.exit_code == 0
    assert "bits: 3" in r.stdout and "damp: 0.01" in r.stdout


def test_exit_codes(tiny, tmp_path):
    # 3: input missing
    r = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 3 and "no such recipe file" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert r.exit_code == 3 and "nope" in r.output
    # 2: bad recipe field, named
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: demo\npasses:\n  - gptq: {bits: 4, gruop_size: 64}\n")
    r = runner.invoke(app, ["run", str(bad), "--dry-run"])
    assert r.exit_code == 2 and "passes.0.gptq.gruop_size" in r.output
    # 2: group size that divides nothing, with the layers and what would work
    r = _quantize(tiny, tmp_path / "o2", "--group-size", "48")
    assert r.exit_code == 2 and "does not divide" in r.output and "use group_size 64" in r.output
    # 2: existing output without --overwrite, and nothing is touched
    (tmp_path / "exists").mkdir()
    r = _quantize(tiny, tmp_path / "exists")
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_demo_model_end_to_end(tmp_path):
    """The real demo model, few samples: GPTQ W4 g64 runs, exports, and stays close to bf16."""
    r = runner.invoke(
        app,
        ["quantize", "demo", "-o", str(tmp_path / "w4"), "--group-size", "64", "--samples", "8", "--seq-len", "128",
         "--set", "eval.perplexity.max_windows=3", "--json", "--quiet"],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    ev = rep["eval"]
    assert ev["baseline"]["perplexity"] < ev["model"]["perplexity"] < 1.5 * ev["baseline"]["perplexity"]
    assert rep["export"]["quantized_layers"] == 210 and rep["export"]["bits_per_parameter"] < 8


def test_installed_cli_is_the_root_cli_py():
    """compress/cli.py is a symlink to the design card's root cli.py: they must never diverge."""
    from pathlib import Path

    import compress.cli

    root = Path(__file__).resolve().parents[1] / "cli.py"
    if root.exists():
        assert Path(compress.cli.__file__).read_text() == root.read_text()
