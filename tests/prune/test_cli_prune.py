"""`compress prune`: the recipe it builds, its output, its errors and exit codes."""

import json

import pytest
from compress.eval.report import validate
from conftest import save_tiny
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli-prune") / "qwen2", "qwen2")


def _prune(tiny, out, *extra):
    return runner.invoke(app, ["prune", str(tiny), "-o", str(out), "--samples", "4", "--seq-len", "32", "--no-eval", *extra])


def test_prune_2_4_json_and_inspect(tiny, tmp_path):
    r = _prune(tiny, tmp_path / "out", "--method", "wanda", "--pattern", "2:4", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    validate(rep)  # the report schema (eval/report.schema.json) knows the sparsity fields
    assert rep["recipe"]["passes"] == [{"wanda": {**rep["recipe"]["passes"][0]["wanda"], "sparsity": 0.5, "pattern": "2:4"}}]
    assert rep["export"]["sparsity"] == {"structure": "2:4", "global_sparsity": pytest.approx(0.5, abs=1e-3), "layers": 14}
    r = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "14 layers pruned: 2:4, 50.0% of their weights are zero" in r.stdout


def test_dry_run_prints_the_recipe(tiny, tmp_path):
    r = _prune(tiny, tmp_path / "out", "--method", "sparsegpt", "--sparsity", "0.7", "--allocation", "owl", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    (p,) = json.loads(r.stdout)["passes"]
    assert p["sparsegpt"]["sparsity"] == 0.7 and p["sparsegpt"]["allocation"] == "owl"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "prune"], "--method 'prune': choose one of sparsegpt, wanda, magnitude"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--pattern", "2:4", "--allocation", "owl"], "allocation owl"),
    (["--pattern", "5:4"], "not a sparsity pattern"),
    (["--pattern", "3:6"], "M 6 does not divide in_features 64"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, args, needle):
    r = _prune(tiny, tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
