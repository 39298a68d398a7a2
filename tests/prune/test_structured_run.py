"""``prune_structured`` in a run: the chain of steps (pruning first, then a sweep or distillation),
its export, resume, the CLI, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, save_tiny
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress.api.job import run
from compress.cli import app
from compress.errors import UsageError
from compress.eval.report import validate
from compress.recipe import load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("structured") / "llama", "llama")


pytestmark = pytest.mark.usefixtures("private_cache")  # $COMPRESS_CACHE per test


def _recipe(model, out, passes, **extra):
    return load_recipe({"model": str(model), "calibration": {"samples": 8, "seq_len": 32, "batch_size": 2}, "passes": passes,
                        "eval": {"perplexity": {"seq_len": 32, "max_windows": 4}}, "export": {"path": str(out)}, **extra})


def test_budget_run_exports_a_smaller_standard_model(tiny, tmp_path):
    rep = run(_recipe(tiny, tmp_path / "out", [{"prune_structured": {"params": 0.7, "multiple": 16}}]))
    sec = rep["prune_structured"]
    assert sec["params_after"] <= 0.7 * sec["params_before"] and len(sec["candidates"]) > 1
    assert min(c["kl"] for c in sec["candidates"]) == sec["kl"]  # the best-scoring candidate is the one kept
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # plain transformers
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == sec["params_after"]
    assert json.loads((tmp_path / "out" / "compress.json").read_text())["structured"]["shape_after"] == sec["shape_after"]
    assert rep["eval"]["model"]["perplexity"] > 0 and (tmp_path / "out" / "recipe.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no step folder left beside it
    logs = []

    class Log:
        def log(self, m):
            logs.append(m)

        def progress(self, *a, **k):
            pass

    again = run(_recipe(tiny, tmp_path / "out2", [{"prune_structured": {"params": 0.7, "multiple": 16}}]), hooks=Log())
    assert any("are cached" in m for m in logs)  # the second budget search skips the measuring forward
    assert again["prune_structured"]["candidates"] == sec["candidates"]


def test_pruning_then_gptq_and_the_export_remembers(tiny, tmp_path):
    passes = [{"prune_structured": {"hidden": 48, "intermediate": 64, "layers": 1}}, {"gptq": {"bits": 4, "group_size": 16}}]
    rep = run(_recipe(tiny, tmp_path / "out", passes))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (48, 64, 1)
    assert "quantization_config" in cfg and len(rep["layers"]) == 7
    meta = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert meta["structured"]["layers_kept"] == rep["prune_structured"]["layers_kept"]


def test_pruning_then_distillation_with_hidden_loss(tiny, tmp_path):
    """The hidden-state loss maps the student's blocks and dimensions onto the teacher's."""
    passes = [{"prune_structured": {"hidden": 48, "layers": 1}}, {"distill": {"steps": 3, "hidden_weight": 1.0, "eval_every": 1}}]
    rep = run(_recipe(tiny, tmp_path / "out", passes))
    d = rep["distill"]
    assert d["steps"] == 3 and d["trained"]["dense"] == 7  # every Linear of the kept block trains
    assert d["perplexity"]["distilled"] == rep["eval"]["model"]["perplexity"] and d["perplexity"]["compressed"] > 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 48


def test_resume_reuses_the_pruned_checkpoint(tiny, tmp_path, monkeypatch):
    import compress.prune.structured_pass as sp

    passes = [{"prune_structured": {"hidden": 48}}, {"distill": {"steps": 2}}]
    calls = []
    real = sp.StructuredPass.transform_model
    monkeypatch.setattr(sp.StructuredPass, "transform_model", lambda self, st: calls.append(1) or real(self, st))
    import compress.distill.passes as dp

    def boom(self, stage):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dp.DistillPass, "transform_model", boom)
        with pytest.raises(KeyboardInterrupt):
            run(_recipe(tiny, tmp_path / "out", passes))
    assert (tmp_path / ".out.student" / "stage.json").is_file() and len(calls) == 1
    rep = run(_recipe(tiny, tmp_path / "out", passes), resume=True)
    assert len(calls) == 1 and rep["prune_structured"]["shape_after"]["hidden"] == 48  # its report section kept too


@pytest.mark.parametrize("opts, needle", [
    ({"params": 0.01}, "the smallest shape the search reaches"),
    ({"hidden": 50}, "a multiple of the head count \\(e.g. 48 or 52\\)"),
    ({"hidden": 48, "heads": 3}, "the same number of query heads \\(a multiple of 2\\)"),
    ({"layers": 0}, "at least 1 block must stay"),
    ({"hidden": 100}, "hidden 100: between 1 and the model's 64"),
])
def test_bad_shapes_exit_2_before_any_work(tiny, tmp_path, opts, needle):
    with pytest.raises(UsageError, match=needle):
        run(_recipe(tiny, tmp_path / "out", [{"prune_structured": opts}]))
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_family_and_wrong_place(tmp_path):
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UsageError, match="model_type 'gpt2': structured pruning knows the coupling of llama"):
        run(_recipe(gpt2, tmp_path / "out", [{"prune_structured": {"params": 0.7}}]))
    llama = save_tiny(tmp_path / "llama", "llama")
    with pytest.raises(UsageError, match="put it first"):
        run(_recipe(llama, tmp_path / "out", [{"gptq": {"bits": 4, "group_size": 16}}, {"prune_structured": {"params": 0.7}}]))
    assert not (tmp_path / "out").exists()


def test_cli_structured(tiny, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny), "-o", str(tmp_path / "out"), "--structured", "--hidden", "48", "--layers", "1",
                            "--samples", "4", "--seq-len", "32", "--no-eval", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    validate(rep)  # the report schema (eval/report.schema.json) takes the new sections
    assert rep["recipe"]["passes"][0]["prune_structured"]["hidden"] == 48
    assert rep["export"]["structured"]["shape_after"]["hidden"] == 48
    r = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "structurally pruned: hidden 48, heads 4/2, MLP 128, 1 blocks" in " ".join(r.output.split()), r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model(input_ids=torch.randint(0, VOCAB, (1, 8))).logits.shape == (1, 8, VOCAB)
    r = runner.invoke(app, ["prune", str(tiny), "-o", str(tmp_path / "out2"), "--structured", "--layers", "1", "--samples", "4",
                            "--seq-len", "32", "--set", "eval.perplexity.seq_len=32", "--set", "eval.perplexity.max_windows=2"])  # the summary a person reads
    assert r.exit_code == 0 and "perplexity" in r.output, r.output
    for args, needle in ((["--structured", "--pattern", "2:4"], "apply to unstructured"), (["--structured"], "give --params"),
                         (["--params", "0.7"], "need --structured"), (["--structured", "--params", "x"], "a share such as")):
        r = runner.invoke(app, ["prune", str(tiny), "-o", str(tmp_path / "bad"), *args, "--samples", "4", "--seq-len", "32"])
        assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
    assert not (tmp_path / "bad").exists()


def test_depth_by_kl_drops_the_block_that_matters_least(tmp_path):
    """depth: kl skips each block in turn; the block whose skipping moves the output least goes."""
    src = save_tiny(tmp_path / "llama3", "llama", seed=3)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(src).config)
    torch.manual_seed(0)
    with torch.no_grad():  # block 1 writes nothing to the residual stream: skipping it changes nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    model.save_pretrained(src)
    rep = run(_recipe(src, tmp_path / "out", [{"prune_structured": {"layers": 2, "depth": "kl"}}]))
    assert rep["prune_structured"]["layers_kept"] == [0, 2] and rep["prune_structured"]["kl"] < 1e-6
