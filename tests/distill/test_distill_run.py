"""Distillation end to end on tiny models: the loss goes down, what must stay fixed stays fixed
(integer codes, sparsity masks), the evaluation split is never read while training, an
interrupted run resumes to the same weights, and bad input exits with its code and message."""

import json
import subprocess
import sys

import pytest
import torch
from compress.distill import losses
from compress.distill.config import DistillConfig
from compress.distill.loop import split_windows, train_model
from compress.distill.trainable import prepare
from conftest import save_tiny
from safetensors.torch import load_file
from typer.testing import CliRunner

from compress import api
from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource
from compress.cli import app
from compress.data import calibration_windows, load_texts, tokenize
from compress.errors import TrainingError
from compress.recipe import load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama whose next-token distributions are peaked like a trained model's (the default
    random init gives near-uniform logits: nothing for a student to match): embeddings ×25, the
    blocks' Linears ×5."""
    from conftest import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("distill") / "llama"
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(25)
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers"):
                mod.weight.mul_(5)
    m.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _recipe(model, out, passes, samples=12, **extra):
    raw = {"model": str(model), "calibration": {"samples": samples, "seq_len": 64, "batch_size": 4},
           "passes": passes, "eval": {"perplexity": None}, "export": {"path": str(out)}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return load_recipe(raw)


@pytest.fixture(scope="module")
def w3(tiny, tmp_path_factory):
    """A GPTQ W3 export of the tiny model (the student of the loop tests)."""
    out = tmp_path_factory.mktemp("w3") / "w3"
    api.run(_recipe(tiny, out, [{"gptq": {"bits": 3, "group_size": 32}}]))
    return out


def _windows(src, n=12):
    return calibration_windows(tokenize(load_texts("builtin:pydoc"), src.tokenizer), n, 64)


def _kd_loss(student, teacher, windows):
    with torch.no_grad():
        return float(losses.forward_kl(student(input_ids=windows).logits, teacher(input_ids=windows).logits))


def _setup(tiny, w3, **opts):
    src = ModelSource(tiny)
    student, teacher = load_source(ModelSource(w3)), load_source(src)
    cfg = DistillConfig(**{"eval_every": 2, "grad_accum": 2, "lr": 1e-3, "scale_lr": 1e-2, **opts})
    train, held = split_windows(_windows(src), cfg.holdout)
    prep = prepare(student, cfg.train, set(), "model.layers")
    return student, teacher, train, held, cfg, prep


def test_the_loss_goes_down_in_a_few_steps(tiny, w3):
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=8, restore_best=False, train="scales")
    before = _kd_loss(student, teacher, train)
    rec = train_model(student, teacher, train, held, cfg, prep)
    assert rec["steps"] == 8 and rec["tokens"] == 8 * 2 * 64
    assert _kd_loss(student, teacher, train) < 0.8 * before


def test_the_best_held_out_weights_are_kept(tiny, w3):
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=8, patience=1)
    rec = train_model(student, teacher, train, held, cfg, prep)
    gaps = [r["heldout_kl"] for r in rec["curve"] if "heldout_kl" in r]
    assert rec["heldout_kl_best"] == pytest.approx(min(gaps), abs=1e-6) and rec["heldout_kl_best"] <= rec["heldout_kl_start"]
    if rec["best_step"] < rec["steps"]:  # the model is back at the best step's weights: its held-out gap is the best one
        from compress.distill.loop import heldout, teacher_topk

        assert heldout(student, held, teacher_topk(teacher, held, cfg.top_k, 1.0, 1), cfg)[0] == pytest.approx(rec["heldout_kl_best"], rel=1e-5)


def test_topk_teacher_trains_too(tiny, w3):
    from compress.distill.loop import teacher_topk

    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=6, teacher="topk", top_k=16, restore_best=False, train="scales")
    before = _kd_loss(student, teacher, train)
    topk = teacher_topk(teacher, train, 16, 1.0, 2)
    assert topk[0].shape == (len(train), 64, 16)
    train_model(student, None, train, held, cfg, prep, topk=topk, held_topk=teacher_topk(teacher, held, 16, 1.0, 2))
    assert _kd_loss(student, teacher, train) < before


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tiny, w3, tmp_path):
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=6, save_every=2, restore_best=False)
    full = train_model(student, teacher, train, held, cfg, prep, seed=3)
    want = {n: p.detach().clone() for n, p in student.named_parameters()}

    state = tmp_path / "state.pt"
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=6, save_every=2, restore_best=False)
    with pytest.raises(KeyboardInterrupt):
        train_model(student, teacher, train, held, cfg, prep, seed=3, state_path=state, interrupt_at=3)
    assert state.exists()
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=6, save_every=2, restore_best=False)  # a new process's view
    resumed = train_model(student, teacher, train, held, cfg, prep, seed=3, state_path=state, resume=True)
    got = dict(student.named_parameters())
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert resumed["curve"] == full["curve"][: len(resumed["curve"])] or [r["loss"] for r in resumed["curve"][1:]] == [
        r["loss"] for r in full["curve"][1:]]


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_ones(tiny, w3):
    runs = []
    for seed in (1, 1, 2):
        student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=3, batch_size=2, grad_accum=1, restore_best=False)
        train_model(student, teacher, train, held, cfg, prep, seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_a_nan_loss_stops_with_exit_5_and_restores_the_best_weights(tiny, w3, monkeypatch):
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=4)
    start = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    calls = {"n": 0}
    real = losses.logit_loss

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(losses, "logit_loss", flaky)
    with pytest.raises(TrainingError, match="step 2") as e:
        train_model(student, teacher, train, held, cfg, prep)
    assert e.value.exit_code == 5
    got = dict(student.named_parameters())
    assert all(torch.equal(got[n], t) for n, t in start.items())  # the best (held-out) weights: the start here


def _codes(path):
    t = {}
    for f in path.glob("*.safetensors"):
        t.update(load_file(f))
    return t


def test_gptq_then_distill_keeps_the_codes_and_trains_the_scales(tiny, w3, tmp_path):
    out = tmp_path / "w3-distilled"
    rep = api.run(_recipe(tiny, out, [{"gptq": {"bits": 3, "group_size": 32}}, {"distill": {"steps": 4, "lr": 1e-3, "restore_best": False}}],
                          eval={"perplexity": {"seq_len": 64, "max_windows": 4}}))
    a, b = _codes(w3), _codes(out)
    packed = [k for k in a if k.endswith("weight_packed")]
    assert packed and all(torch.equal(a[k], b[k]) for k in packed)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight_scale"))
    d = rep["distill"]
    assert d["scope"] == "model" and d["steps"] >= 1 and d["trained"]["quantized"] == 14
    assert set(d["perplexity"]) == {"original", "compressed", "distilled", "recovered"}
    assert json.loads((out / "compress.json").read_text())["distill"]["steps"] == d["steps"]
    assert "mermaid" in (out / "report.md").read_text()
    assert not (tmp_path / ".w3-distilled.student").exists()  # the staging folder is gone
    model = api.evaluate(out, None, load_recipe({"eval": {"perplexity": {"seq_len": 64, "max_windows": 4}}}).eval.perplexity)
    assert model["model"]["perplexity"] == pytest.approx(d["perplexity"]["distilled"], rel=1e-6)


def test_wanda_24_then_distill_keeps_the_sparsity_pattern(tiny, tmp_path):
    pruned, out = tmp_path / "pruned", tmp_path / "pruned-distilled"
    api.run(_recipe(tiny, pruned, [{"wanda": {"pattern": "2:4"}}]))
    api.run(_recipe(tiny, out, [{"wanda": {"pattern": "2:4"}}, {"distill": {"steps": 3, "lr": 1e-3, "restore_best": False}}]))
    a, b = _codes(pruned), _codes(out)
    targets = json.loads((out / "compress.json").read_text())["sparsity"]["targets"]
    assert targets
    changed = 0
    for name in targets:
        w0, w1 = a[name + ".weight"], b[name + ".weight"]
        assert torch.equal(w0 == 0, w1 == 0)  # the very same zeros
        changed += not torch.equal(w0, w1)
    assert changed  # and the surviving weights trained


def test_lowrank_then_distill_trains_the_factors_and_reloads(tiny, tmp_path):
    out = tmp_path / "lr"
    rep = api.run(_recipe(tiny, out, [{"lowrank": {"reduction": 0.3, "allocation": "uniform", "rank_multiple": 4}},
                                      {"distill": {"steps": 2, "lr": 1e-3, "restore_best": False}}]))
    assert rep["distill"]["trained"]["lowrank"] > 0
    from compress.lowrank.module import LowRankLinear

    from compress.checkpoint.load import load

    m = load(out, log=lambda *_: None, dtype=torch.float32)
    assert any(isinstance(x, LowRankLinear) for x in m.modules())


def test_block_scope_trains_each_block_inside_the_sweep(tiny, w3, tmp_path):
    out = tmp_path / "block"
    rep = api.run(_recipe(tiny, out, [{"gptq": {"bits": 3, "group_size": 32}}, {"distill": {"scope": "block", "steps": 8, "lr": 1e-3}}]))
    d = rep["distill"]
    assert d["scope"] == "block" and set(d["blocks"]) == {"model.layers.0", "model.layers.1"}
    assert all(b["error_after"] <= b["error_before"] for b in d["blocks"].values())
    assert any(b["error_after"] < b["error_before"] for b in d["blocks"].values())
    a, b = _codes(w3), _codes(out)
    # block 0's codes are GPTQ's; block 1 was calibrated on the trained block 0's outputs, so its codes may differ
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed") and k.startswith("model.layers.0."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight_scale") and k.startswith("model.layers.0."))
    assert all("distill" in l["passes"] for l in rep["layers"])


def test_training_reads_the_calibration_split_only(tiny, tmp_path, monkeypatch):
    import compress.distill.run as run_mod

    import compress.api.evaluation as evaluation
    import compress.data as data

    events = []
    real_load, real_train = data.load_texts, run_mod.train_model

    def load_spy(ref, split="calibration", *a, **k):
        events.append(("load", split))
        return real_load(ref, split, *a, **k)

    def train_spy(student, teacher, train, held, *a, **k):
        events.append(("train", None))
        cal = tokenize(load_texts("builtin:pydoc", "calibration"), ModelSource(tiny).tokenizer).tolist()
        ev = tokenize(load_texts("builtin:pydoc", "eval"), ModelSource(tiny).tokenizer)
        text = " ".join(map(str, cal))
        for w in torch.cat([train, held]):  # every window is calibration text ...
            assert " ".join(map(str, w.tolist())) in text
        evtext = " ".join(map(str, ev.tolist()))
        assert " ".join(map(str, train[0].tolist())) not in evtext  # ... and not evaluation text
        return real_train(student, teacher, train, held, *a, **k)

    monkeypatch.setattr(data, "load_texts", load_spy)  # the calibration set is read there
    monkeypatch.setattr(evaluation, "load_texts", load_spy)  # the evaluation reads its split there
    monkeypatch.setattr(run_mod, "train_model", train_spy)

    api.run(_recipe(tiny, tmp_path / "o", [{"rtn": {"bits": 4, "group_size": 32}}, {"distill": {"steps": 1}}],
                    eval={"perplexity": {"seq_len": 64, "max_windows": 2}, "baseline": False}))
    t = events.index(("train", None))
    assert ("load", "eval") in events[t:] and ("load", "eval") not in events[:t]


@pytest.mark.parametrize("opt, field", [
    ("steps: 0", "passes.1.distill.steps"),
    ("lr: 0", "passes.1.distill.lr"),
    ("lr: -1", "passes.1.distill.lr"),
    ("loss: kl_div", "passes.1.distill.loss"),
    ("teacher: topk, loss: reverse_kl", "passes.1.distill"),
])
def test_bad_options_exit_2_naming_the_field(tiny, tmp_path, opt, field):
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--set", f"model={tiny}", "--set", f"passes=[{{rtn: {{bits: 4, group_size: 32}}}}, {{distill: {{{opt}}}}}]",
                            "--set", "calibration.samples=4", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert field in r.output
    assert not out.exists()


def test_too_few_calibration_windows_for_the_holdout_exit_2(tiny, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--set", f"model={tiny}", "--set", "passes=[{rtn: {bits: 4, group_size: 32}}, {distill: {}}]",
                            "--set", "calibration.samples=1", "--set", "calibration.seq_len=64", "-o", str(out)])
    assert r.exit_code == 2 and "passes.1.distill.holdout" in r.output and "calibration.samples" in r.output
    assert not out.exists()


def test_distill_needs_a_compressing_pass_first(tiny, tmp_path):
    r = runner.invoke(app, ["run", "--set", f"model={tiny}", "--set", "passes=[{distill: {}}]", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "compress distill" in r.output


def test_a_nan_loss_in_a_run_exits_5_and_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "logit_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--set", f"model={tiny}", "--set", "passes=[{rtn: {bits: 4, group_size: 32}}, {distill: {}}]",
                            "--set", "calibration.samples=4", "--set", "calibration.seq_len=64", "--set", "eval.perplexity=null", "-o", str(out)])
    assert r.exit_code == 5, r.output
    assert "loss became nan" in r.output
    assert not out.exists()


def test_cli_distill_an_existing_checkpoint(tiny, w3, tmp_path):
    out = tmp_path / "d"
    r = runner.invoke(app, ["distill", str(w3), "--teacher", str(tiny), "-o", str(out), "--samples", "8", "--seq-len", "64",
                            "--steps", "2", "--lr", "1e-3", "--set", "eval_every=1", "--set", "restore_best=false", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["kind"] == "distill" and rep["distill"]["steps"] >= 1
    assert rep["distill"]["perplexity"]["original"] == rep["eval"]["baseline"]["perplexity"]
    assert (out / "report.json").exists() and (out / "config.json").exists()
    assert not (tmp_path / ".d.distill").exists()
    from compress.eval.report import validate

    validate(rep)


def test_cli_distill_refuses_a_different_architecture(tiny, tmp_path):
    other = save_tiny(tmp_path / "qwen", "qwen2")
    r = runner.invoke(app, ["distill", str(other), "--teacher", str(tiny), "-o", str(tmp_path / "d"), "--samples", "4", "--seq-len", "64"])
    assert r.exit_code == 2 and "--teacher" in r.output and "model_type" in r.output
    assert not (tmp_path / "d").exists()
    r = runner.invoke(app, ["distill", str(other), "--teacher", str(tiny), "-o", str(tmp_path / "d"), "--scope", "block"])
    assert r.exit_code == 2 and "scope block" in r.output.replace("\n", " ")


def test_a_run_interrupted_while_distilling_resumes_without_compressing_again(tiny, tmp_path, monkeypatch):
    import compress.distill.run as run_mod

    import compress.api.job as api_mod

    out = tmp_path / "o"
    passes = [{"rtn": {"bits": 4, "group_size": 32}}, {"distill": {"steps": 4, "save_every": 1, "restore_best": False}}]
    real = run_mod.train_model
    monkeypatch.setattr(run_mod, "train_model", lambda *a, **k: real(*a, **{**k, "interrupt_at": 2}))
    with pytest.raises(KeyboardInterrupt):
        api.run(_recipe(tiny, out, passes))
    stage = tmp_path / ".o.student"
    assert (stage / "distill_state.pt").exists() and not out.exists()

    monkeypatch.setattr(run_mod, "train_model", real)
    monkeypatch.setattr(api_mod, "compress_blocks", lambda *a, **k: pytest.fail("the compressing passes ran again"))
    rep = api.run(_recipe(tiny, out, passes), resume=True)
    assert rep["distill"]["steps"] == 4 and out.exists() and not stage.exists()

    monkeypatch.undo()
    fresh = api.run(_recipe(tiny, tmp_path / "fresh", passes))
    a, b = _codes(out), _codes(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same checkpoint as a run never interrupted


def test_gradient_checkpointing_gives_the_same_training(tiny, w3):
    out = []
    for ckpt in (False, True):
        student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=2, restore_best=False, grad_checkpointing=ckpt)
        train_model(student, teacher, train, held, cfg, prep)
        assert not student.training
        out.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.allclose(out[0], out[1], atol=1e-6)


@pytest.mark.parametrize("quant, train", [
    ({"rtn": {"bits": 8, "group_size": -1, "activations": {"bits": 8}}}, "auto"),  # W8A8: per-channel scales
    ({"gptq": {"bits": 3, "group_size": 32}}, "qat"),  # latent weights, re-quantized to new codes
])
def test_w8a8_and_qat_students_export_valid_checkpoints(tiny, w3, tmp_path, quant, train):
    from compress.checkpoint.load import load

    out = tmp_path / "o"
    # qat starts from the dequantized weights, half a grid step from any rounding boundary: a large
    # rate moves some of them across in three steps
    lr = 5e-2 if train == "qat" else 1e-3
    rep = api.run(_recipe(tiny, out, [quant, {"distill": {"steps": 3, "lr": lr, "train": train, "restore_best": False}}]))
    assert rep["distill"]["steps"] == 3
    m = load(out, log=lambda *_: None, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.randint(0, 300, (1, 16))).logits).all()
    if train == "qat":
        a, b = _codes(w3), _codes(out)
        assert rep["distill"]["trained"]["qat"] == 14
        assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))  # new codes


def test_compress_distill_checks_and_locks_its_output_before_training(tiny, w3, tmp_path, monkeypatch):
    """A file at -o, or another run writing there: exit 2 before any training (issue 23)."""
    import compress.api.distillation as job
    from compress.checkpoint.files import export_lock
    from compress.errors import UsageError

    monkeypatch.setattr(job, "distill_checkpoint", lambda *a, **k: pytest.fail("trained although the output was refused"))
    cal = load_recipe({"calibration": {"samples": 4, "seq_len": 32}}).calibration
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match="a file is there, not an export folder"):
        api.distill(w3, tiny, tmp_path / "file", calibration=cal, overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"

    code = ("import sys, time; from pathlib import Path; from compress.checkpoint.files import export_lock\n"
            "with export_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=str(holder.pid)):
            api.distill(w3, tiny, tmp_path / "busy", calibration=cal)
    finally:
        holder.kill()
        holder.wait()
    with export_lock(tmp_path / "busy"):  # a killed holder's lock is free again
        pass
