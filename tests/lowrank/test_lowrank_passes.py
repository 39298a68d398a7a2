"""The lowrank pass end to end on tiny models: ranks within the budget, the factored export
reloads to the in-memory logits, the merged export loads in plain transformers, quantized
factors, propagation, and bad input (exit 2, nothing written)."""

import json

import pytest
import torch
from compress.lowrank.module import LoSparseLinear, LowRankLinear
from conftest import save_tiny
from typer.testing import CliRunner

from compress.api import inspect_checkpoint, run
from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.load import load
from compress.checkpoint.source import ModelSource, materialize
from compress.cli import app
from compress.engine import SweepOptions, compress_blocks
from compress.errors import UsageError
from compress.passes import Context, get_pass
from compress.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("lowrank") / "llama", "llama")


def _recipe(model, out, passes, samples=8, **extra):
    raw = {
        "model": str(model),
        "calibration": {"samples": samples, "seq_len": 64, "batch_size": 4},
        "passes": passes,
        "eval": {"perplexity": None},
        "export": {"path": str(out)},
    }
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return load_recipe(raw)


def _in_memory(model_path, recipe):
    """The same job with the compressed blocks kept in memory (no export, no reload)."""
    from compress.data import calibration_windows, load_texts, tokenize

    src = ModelSource(model_path)
    model = src.skeleton()
    cal = recipe.calibration
    calib = calibration_windows(tokenize(load_texts(cal.data), src.tokenizer), cal.samples, cal.seq_len)
    passes = [get_pass(n)(c, Context(dtype=torch.bfloat16)) for n, c in recipe.pass_configs()]
    compress_blocks(src, model, passes, calib, lambda res, inputs: None, SweepOptions(batch_size=cal.batch_size, keep=True, propagate=cal.propagate))
    materialize(model, "", src, skip={n for n, _ in model.named_parameters() if n.startswith("lm_head.")})
    model.tie_weights()
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("opts", [{"reduction": 0.3}, {"reduction": 0.3, "sensitivity": "layer"},
                                  {"reduction": 0.25, "allocation": "uniform", "method": "asvd"},
                                  {"rank": 8, "method": "svd"}])
def test_factored_export_reloads_to_the_in_memory_logits(tiny, tmp_path, opts):
    out = tmp_path / "out"
    rec = _recipe(tiny, out, [{"lowrank": opts}], report={"layer_error": "output"})
    report = run(rec)
    layers = report["layers"]
    assert len(layers) == 14
    kept = sum(l["info"]["params_kept"] for l in layers)
    dense = sum(l["info"]["params_dense"] for l in layers)
    if "reduction" in opts:
        assert kept <= (1 - opts["reduction"]) * dense  # never over the budget
    for l in layers:
        r = l["info"]["rank"]
        assert r is None or (r % 8 == 0 and l["info"]["params_kept"] < l["info"]["params_dense"])
        assert l["rel_output_error"] is not None and 0 <= l["rel_output_error"] < 1
    meta = json.loads((out / "compress.json").read_text())["lowrank"]
    assert meta["export"] == "factored" and meta["parameters_kept"] == kept
    info = inspect_checkpoint(out)
    assert info["lowrank"]["layers"] == sum(1 for l in layers if l["info"]["rank"] is not None)

    ours = load(out, dtype=torch.float32)
    mods = {n: m for n, m in ours.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in mods.items()} == {k: v["rank"] for k, v in meta["layers"].items() if v["rank"] is not None}
    assert all(isinstance(m.A, torch.nn.Linear) and m.A.weight.requires_grad for m in mods.values())  # trainable factors
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(_logits(ours, x), _logits(_in_memory(tiny, rec), x), rtol=0, atol=1e-5)


def test_whitened_beats_svd_on_the_same_budget(tiny, tmp_path):
    errs = {}
    for m in ("whitened", "svd"):
        rep = run(_recipe(tiny, tmp_path / m, [{"lowrank": {"method": m, "reduction": 0.3, "allocation": "uniform"}}],
                          report={"layer_error": "output"}))  # plain svd needs no data: output errors on request
        errs[m] = sum(l["rel_output_error"] for l in rep["layers"])
    assert errs["whitened"] < errs["svd"]


def test_merged_export_loads_in_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run(_recipe(tiny, tmp_path / "f", [{"lowrank": {"reduction": 0.3}}]))
    run(_recipe(tiny, tmp_path / "m", [{"lowrank": {"reduction": 0.3}}], export={"lowrank": "merged"}))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    merged = load(tmp_path / "m", dtype=torch.float32)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(_logits(hf, x), _logits(merged, x), rtol=0, atol=0)
    # the same model as the factored export, up to rounding B·A to bf16
    torch.testing.assert_close(_logits(merged, x), _logits(load(tmp_path / "f", dtype=torch.float32), x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("quant", [{"rtn": {"bits": 4, "group_size": 16}}, {"gptq": {"bits": 4, "group_size": 16}}])
def test_lowrank_then_quantize_exports_and_reloads(tiny, tmp_path, quant):
    out = tmp_path / "out"
    rec = _recipe(tiny, out, [{"lowrank": {"reduction": 0.2, "rank_multiple": 8}}, quant])
    report = run(rec)
    for l in report["layers"]:
        assert l["passes"] == ["lowrank", next(iter(quant))]
        if l["info"]["rank"] is not None:
            assert l["info"]["rank"] % 16 == 0  # ranks follow the factors' group size
    ours = load(out, dtype=torch.float32)
    lr = [m for m in ours.modules() if isinstance(m, LowRankLinear)]
    assert lr and all(isinstance(m.A, QuantLinear) and isinstance(m.B, QuantLinear) for m in lr)
    assert inspect_checkpoint(out)["quantized_layers"] > 0
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(_logits(ours, x), _logits(_in_memory(tiny, rec), x), rtol=0, atol=1e-5)


def test_propagation_changes_what_later_blocks_see(tiny, tmp_path):
    a = run(_recipe(tiny, tmp_path / "a", [{"lowrank": {"reduction": 0.4, "allocation": "uniform"}}]))
    b = run(_recipe(tiny, tmp_path / "b", [{"lowrank": {"reduction": 0.4, "allocation": "uniform"}}], calibration={"propagate": False}))
    ea = {l["name"]: l["rel_output_error"] for l in a["layers"]}
    eb = {l["name"]: l["rel_output_error"] for l in b["layers"]}
    q0 = "model.layers.0.self_attn.q_proj"
    assert ea[q0] == pytest.approx(eb[q0], rel=1e-5)  # block 0's first group sees the same inputs
    assert any(abs(ea[n] - eb[n]) > 1e-4 for n in ea if ".layers.1." in n)


def test_cli_lowrank_runs_evaluates_and_reports(tiny, tmp_path):
    from compress.eval.report import to_markdown, validate

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["lowrank", str(tiny), "-o", str(out), "--reduction", "25%", "--samples", "8", "--seq-len", "64",
                                 "--set", "eval.perplexity.seq_len=64", "--set", "eval.perplexity.max_windows=2", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    validate(report)
    lr = report["export"]["lowrank"]
    assert lr["export"] == "factored" and lr["parameters_kept"] <= 0.75 * lr["parameters_dense"]
    assert report["eval"]["model"]["perplexity"] > 0 and report["recipe"]["passes"][0]["lowrank"]["reduction"] == 0.25
    md = to_markdown(report)
    assert "low-rank (whitened, factored)" in md and "| rank | parameters kept |" in md


def test_original_objective_runs_the_original_block_alongside(tiny, tmp_path):
    def errors(objective, **cal):
        rep = run(_recipe(tiny, tmp_path / f"{objective}{len(cal)}", [{"lowrank": {"reduction": 0.4, "allocation": "uniform",
                                                                                    "objective": objective}}], calibration=cal))
        return {l["name"]: l["rel_output_error"] for l in rep["layers"]}

    orig, prop = errors("original"), errors("propagated")
    q0 = "model.layers.0.self_attn.q_proj"
    assert orig[q0] == pytest.approx(prop[q0], rel=1e-5)  # nothing compressed before it: x̂ = x
    assert any(abs(orig[n] - prop[n]) > 1e-4 for n in orig if ".layers.1." in n)
    # without propagation every layer sees the original inputs: both objectives are one
    assert errors("original", propagate=False) == errors("propagated", propagate=False)


@pytest.mark.parametrize("opts", [{"sparse": 0.05}, {"sparse": 0.1, "sparse_pattern": "column", "allocation": "uniform"}])
def test_losparse_spends_the_same_budget_and_reloads_to_the_in_memory_logits(tiny, tmp_path, opts):
    out = tmp_path / "out"
    rec = _recipe(tiny, out, [{"lowrank": {"reduction": 0.3, **opts}}])
    report = run(rec)
    layers = report["layers"]
    kept = sum(l["info"]["params_kept"] for l in layers)
    dense = sum(l["info"]["params_dense"] for l in layers)
    assert kept <= 0.7 * dense  # factors + the residual's nonzeros: the low-rank-only budget
    factored = [l for l in layers if l["info"]["rank"] is not None]
    assert factored and all(0 < l["info"]["sparse_nonzeros"] <= round(opts["sparse"] * l["info"]["params_dense"]) for l in factored)
    assert all(l["info"]["params_kept"] == l["info"]["rank"] * (l["info"]["max_rank"] + l["info"]["params_dense"] // l["info"]["max_rank"])
               + l["info"]["sparse_nonzeros"] for l in factored)
    meta = json.loads((out / "compress.json").read_text())["lowrank"]
    assert meta["parameters_kept"] == kept
    ours = load(out, dtype=torch.float32)
    mods = {n: m for n, m in ours.named_modules() if isinstance(m, LoSparseLinear)}
    assert set(mods) == {l["name"] for l in factored}
    assert all(m.nonzeros == meta["layers"][n]["sparse_nonzeros"] and not m.S.requires_grad for n, m in mods.items())
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(_logits(ours, x), _logits(_in_memory(tiny, rec), x), rtol=0, atol=1e-5)


def test_losparse_merged_export_loads_in_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run(_recipe(tiny, tmp_path / "f", [{"lowrank": {"reduction": 0.3, "sparse": 0.05}}]))
    run(_recipe(tiny, tmp_path / "m", [{"lowrank": {"reduction": 0.3, "sparse": 0.05}}], export={"lowrank": "merged"}))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 16))
    assert not any(isinstance(m, LowRankLinear) for m in load(tmp_path / "m", dtype=torch.float32).modules())
    torch.testing.assert_close(_logits(hf, x), _logits(load(tmp_path / "f", dtype=torch.float32), x), rtol=0.02, atol=0.02)


def test_losparse_lowers_the_output_error_at_the_same_budget(tiny, tmp_path):
    def error(**opts):
        rep = run(_recipe(tiny, tmp_path / str(len(opts)), [{"lowrank": {"reduction": 0.4, "allocation": "uniform", **opts}}],
                          report={"layer_error": "output"}, calibration={"propagate": False}))
        return sum(l["rel_output_error"] for l in rep["layers"])

    assert error(sparse=0.05) < error()


# ---------------------------------------------------------------- bad input


def test_bad_options_exit_2_and_write_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(app, ["lowrank", str(tiny), "-o", str(out), "--reduction", "1.2", "--no-eval"])
    assert r.exit_code == 2 and "passes.0.lowrank.reduction" in r.output and "outside (0, 1)" in r.output
    r = runner.invoke(app, ["lowrank", str(tiny), "-o", str(out), "--rank", "48", "--no-eval", "--samples", "8", "--seq-len", "64"])
    assert r.exit_code == 2 and "rank 48 is larger than min(in, out) = 32" in r.output and "k_proj" in r.output
    r = runner.invoke(app, ["lowrank", str(tiny), "-o", str(out), "--set", "passes.0.lowrank.targets=[nothing_here]", "--no-eval"])
    assert r.exit_code == 2 and "no Linear layer" in r.output
    r = runner.invoke(app, ["lowrank", str(tiny), "-o", str(out), "--method", "pca"])
    assert r.exit_code == 2 and "--method 'pca'" in r.output
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_refused_combinations(tiny, tmp_path):
    with pytest.raises(UsageError, match=r"lowrank cannot be combined with wanda"):
        run(_recipe(tiny, tmp_path / "o", [{"wanda": {}}, {"lowrank": {}}]))
    with pytest.raises(UsageError, match=r"lowrank cannot be combined with rtn"):
        run(_recipe(tiny, tmp_path / "o", [{"rtn": {"group_size": 16}}, {"lowrank": {}}]))
    with pytest.raises(UsageError, match=r"merged would multiply quantized factors"):
        run(_recipe(tiny, tmp_path / "o", [{"lowrank": {}}, {"rtn": {"group_size": 16}}], export={"lowrank": "merged"}))
    with pytest.raises(UsageError, match=r"rank 12: the factors are quantized with group_size 16"):
        run(_recipe(tiny, tmp_path / "o", [{"lowrank": {"rank": 12}}, {"rtn": {"group_size": 16}}]))
    with pytest.raises(UsageError, match=r"sparse > 0 \(LoSparse\) cannot be combined with rtn"):
        run(_recipe(tiny, tmp_path / "o", [{"lowrank": {"sparse": 0.05}}, {"rtn": {"group_size": 16}}]))
    for bad, says in [({"sparse": 0.05, "method": "asvd"}, "sparse needs method: whitened"),
                      ({"sparse": 0.5, "reduction": 0.6}, "leaves nothing for the factors")]:
        with pytest.raises(UsageError, match=says):
            run(_recipe(tiny, tmp_path / "o", [{"lowrank": bad}]))
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    run(_recipe(tiny, tmp_path / "f", [{"lowrank": {"reduction": 0.3}}]))
    with pytest.raises(UsageError, match=r"stores low-rank factors"):
        run(_recipe(tmp_path / "f", tmp_path / "o", [{"rtn": {"group_size": 16}}]))


def test_a_layer_that_sees_no_signal_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "m", "llama")
    f = path / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.post_attention_layernorm.weight"].zero_()  # gate/up of block 1 see only zeros
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"model.layers.1.mlp.gate_proj: XᵀX of its calibration inputs is all zeros"):
        run(_recipe(path, tmp_path / "o", [{"lowrank": {"reduction": 0.3, "allocation": "uniform"}}]))
    assert not (tmp_path / "o").exists()


def test_block_error_probe_measures_what_reaches_the_block_output():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from compress.engine.observe import BlockErrorProbe

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    block = model.model.layers[0]
    x = torch.randn(2, 8, 64)
    pos = model.model.rotary_emb(x, torch.arange(8)[None])
    kw = {"position_embeddings": pos, "attention_mask": None}
    with torch.no_grad():
        y = block(x, **kw)
    y = y[0] if isinstance(y, tuple) else y
    probe = BlockErrorProbe(block, x, y, ((), kw))
    W = block.mlp.down_proj.weight.detach().clone()
    assert probe("mlp.down_proj", W) == (0.0, 0.0)
    out_err, layer_err = probe("mlp.down_proj", W * 1.1)
    # down_proj writes straight into the residual stream: all of its error reaches the output
    assert out_err == pytest.approx(layer_err, rel=1e-4) and layer_err > 0
    torch.testing.assert_close(block.mlp.down_proj.weight, W)  # restored
    out_err, layer_err = probe("self_attn.k_proj", block.self_attn.k_proj.weight * 1.5)
    assert layer_err > 0 and out_err != pytest.approx(layer_err, rel=1e-2)  # through softmax: not one to one
