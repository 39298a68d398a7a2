"""The command line: exit codes, --json, messages (CliRunner, tiny models)."""

import json

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from compress.cli import app

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
    assert rep["schema"] == "compress.report/2" and rep["export"]["schemes"][0]["bits"] == 8
    # rtn needs no statistics: no calibration ran, each layer reports its weight error instead
    assert all(l["rel_output_error"] is None and l["info"]["rel_weight_error"] > 0 for l in rep["layers"])

    r = runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["quantized_layers"] == 14 and 8 < info["bits_per_parameter"] < 16

    r = runner.invoke(app, ["eval", str(tmp_path / "out"), "--baseline", str(tiny), "--seq-len", "32", "--max-windows", "2", "--json"])
    assert r.exit_code == 0
    res = json.loads(r.stdout)["eval"]
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


# --- evaluation, gates, reports (issue 3) -------------------------------------------------------

EVAL_FAST = ["--seq-len", "32", "--max-windows", "2"]


@pytest.fixture(scope="module")
def worse(tiny, tmp_path_factory):
    """The tiny model with its final norm scaled 30x: sharper, uncorrelated logits, so its
    perplexity is far above the original's (a regression every gate must catch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("cli") / "worse"
    m = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    with torch.no_grad():
        m.model.norm.weight.mul_(30)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _validate(report):
    from compress.eval.report import validate

    validate(report)  # jsonschema against eval/report.schema.json
    return report


def test_eval_gate_that_must_fail_exits_4_names_the_metric_and_still_reports(tiny, worse, tmp_path, cache):
    md = tmp_path / "summary.md"
    r = runner.invoke(app, ["eval", str(worse), "--baseline", str(tiny), *EVAL_FAST, "--max-ppl-increase", "5%",
                            "--json", "--markdown", str(md)])
    assert r.exit_code == 4, r.output
    assert "quality gate" in r.stderr and "max_ppl_increase perplexity" in r.stderr
    rep = _validate(json.loads(r.stdout))  # the report is printed before the failure
    ev = rep["eval"]
    assert ev["passed"] is False and ev["model"]["perplexity"] > 1.05 * ev["baseline"]["perplexity"]
    assert [g["metric"] for g in ev["gates"] if not g["passed"]] == ["perplexity"]
    assert "**FAIL**" in md.read_text() and "| perplexity ↓ |" in md.read_text()


def test_eval_gate_that_must_pass_exits_0(tiny, tmp_path, cache):
    r = runner.invoke(app, ["eval", str(tiny), "--baseline", str(tiny), *EVAL_FAST, "--max-ppl-increase", "0%",
                            "--min-recovery", "1.0", "--json"])
    assert r.exit_code == 0, r.output
    ev = _validate(json.loads(r.stdout))["eval"]
    assert ev["passed"] is True and len(ev["gates"]) == 2 and ev["ppl_increase"] == 0


def test_gates_without_a_baseline_are_a_usage_error(tiny, cache):
    r = runner.invoke(app, ["eval", str(tiny), *EVAL_FAST, "--max-ppl-increase", "5%"])
    assert r.exit_code == 2 and "baseline" in r.output


def test_eval_cache_hits_and_no_cache(tiny, worse, cache):
    args = ["eval", str(worse), "--baseline", str(tiny), *EVAL_FAST, "--tasks", "pydoc_lastword", "--perplexity", "--limit", "3", "--json"]
    first = json.loads(runner.invoke(app, args).stdout)["eval"]
    assert first["baseline"]["cached"] == [] and first["model"]["cached"] == []
    second = json.loads(runner.invoke(app, args).stdout)["eval"]
    assert second["baseline"]["cached"] == second["model"]["cached"] == ["perplexity", "pydoc_lastword"]
    assert second["metrics"] == first["metrics"]
    assert second["model"]["seconds"] < first["model"]["seconds"]  # nothing loaded, nothing run
    # other settings (limit) are another key; --no-cache evaluates again
    other = json.loads(runner.invoke(app, [*args[:-2], "2", "--json"]).stdout)["eval"]
    assert other["model"]["cached"] == ["perplexity"]
    fresh = json.loads(runner.invoke(app, [*args, "--no-cache"]).stdout)["eval"]
    assert fresh["model"]["cached"] == [] and fresh["metrics"] == first["metrics"]


def test_offline_tasks_run_with_hub_offline_env(tiny, tmp_path):
    """The shipped tasks need nothing from the network: a fresh process with HF_HUB_OFFLINE=1."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COMPRESS_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "compress", "eval", str(tiny), "--tasks", "pydoc_ppl,pydoc_lastword", "--limit", "3",
                        "--json", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ev = _validate(json.loads(p.stdout))["eval"]
    names = {m["name"] for m in ev["metrics"]}
    assert {"pydoc_lastword/acc", "pydoc_ppl/word_perplexity", "pydoc_ppl/bits_per_byte"} <= names and "perplexity" not in names
    assert ev["model"]["tasks"]["pydoc_lastword"]["samples"] == 3


def test_unreachable_task_fails_fast_with_exit_3(tiny, tmp_path, cache):
    from compress.eval.harness import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable from here")
    f = tmp_path / "hub.yaml"
    f.write_text("task: hub_only\ndataset_path: someone/not_cached_here\noutput_type: loglikelihood\ntest_split: test\n"
                 "doc_to_text: \"{{a}}\"\ndoc_to_target: \"{{b}}\"\nmetric_list:\n  - metric: acc\n")
    r = runner.invoke(app, ["eval", str(tiny), "--task-file", str(f), "--limit", "2"])
    assert r.exit_code == 3 and "hub_only" in r.output and "--task-file" in r.output
    r = runner.invoke(app, ["eval", str(tiny), "--task-file", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 3 and "missing.yaml" in r.output


def test_quantize_gate_fails_after_writing_report_json_and_md(tiny, tmp_path, cache):
    out = tmp_path / "q"
    r = _quantize(tiny, out, "--method", "rtn", "--bits", "8", "--max-ppl-increase", "50%", "--max-drop", "exact_match=0.01")
    assert r.exit_code == 4 and "exact_match" in r.stderr
    saved = _validate(json.loads((out / "report.json").read_text()))
    assert saved["kind"] == "run" and saved["eval"]["passed"] is False
    assert {g["metric"]: g["passed"] for g in saved["eval"]["gates"]} == {"perplexity": True, "exact_match": False}
    assert json.loads(r.stdout)["eval"]["gates"] == saved["eval"]["gates"]
    md = (out / "report.md").read_text()
    assert "Highest relative weight error" in md and "bits/param" in md and "peak RSS" in md  # rtn: no calibration
    # the same gates that pass: exit 0, and the saved recipe holds them
    r = _quantize(tiny, tmp_path / "q2", "--method", "rtn", "--bits", "8", "--max-ppl-increase", "50%")
    assert r.exit_code == 0, r.output
    assert "max_ppl_increase: 0.5" in (tmp_path / "q2" / "recipe.yaml").read_text()


def test_compare_two_checkpoints(tiny, worse, tmp_path, cache):
    r = runner.invoke(app, ["compare", str(tiny), str(worse), *EVAL_FAST, "--json"])
    assert r.exit_code == 0, r.output
    rep = _validate(json.loads(r.stdout))
    assert rep["kind"] == "compare" and set(rep["checkpoints"]) == {"baseline", "model"}
    assert rep["eval"]["baseline"]["path"] == str(tiny) and rep["eval"]["metrics"][0]["recovery"] < 0.95
    r = runner.invoke(app, ["compare", str(tiny), str(worse), *EVAL_FAST])
    assert r.exit_code == 0 and "baseline" in r.stdout and "perplexity" in r.stdout and "cached: perplexity" in r.stdout


@pytest.mark.slow
def test_demo_model_offline_tasks_end_to_end(tmp_path, cache):
    """The demo model on both shipped tasks, a few items (well under a minute on an idle machine)."""
    import math

    r = runner.invoke(app, ["eval", "demo", "--tasks", "pydoc_lastword,pydoc_ppl", "--limit", "12", "--batch-size", "8", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    ev = _validate(json.loads(r.stdout))["eval"]
    lw, ppl = ev["model"]["tasks"]["pydoc_lastword"], ev["model"]["tasks"]["pydoc_ppl"]
    assert lw["samples"] == ppl["samples"] == 12
    assert lw["metrics"]["acc"] > 0  # a trained model predicts some paragraph endings (random weights: none)
    assert 1 < ppl["metrics"]["byte_perplexity"] < 3  # English prose and code, bf16 SmolLM2
    assert ppl["metrics"]["bits_per_byte"] == pytest.approx(math.log2(ppl["metrics"]["byte_perplexity"]), rel=1e-6)


def test_bench_refuses_shapes_it_cannot_quantize():
    for shape, words in (("64x64", "multiple of 128"), ("4096", "expected IN x OUT")):
        r = runner.invoke(app, ["bench", "--cpu", "--no-decode", "--shape", shape])
        assert r.exit_code == 2 and words in r.output.replace("\n", " "), r.output
