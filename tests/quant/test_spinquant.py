"""SpinQuant's learned rotations: the Cayley step against closed forms, the training forward
against the fused export, the learning loop's guarantees, and the rotate pass's `learn` option."""

import json

import pytest
import torch
from conftest import norm_scaled_model, save_tiny
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.errors import UsageError
from compress.quant import spinquant
from compress.quant.rotate import fold_norms, random_orthogonal, rotate_state
from compress.quant.rtn import QuantScheme, fake_quantize, fit_qparams
from compress.recipe import load_recipe


def _orth(n, seed):
    return random_orthogonal(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [5, 13, 64])
def test_cayley_steps_stay_orthogonal(n):
    g = torch.Generator().manual_seed(n)
    x, buf = _orth(n, 1), None
    for _ in range(50):
        x, buf = spinquant.cayley_step(x, 10 * torch.randn(n, n, dtype=torch.float64, generator=g), buf, lr=1.5, momentum=0.9)
    assert spinquant.orthogonality_error(x) < 1e-12


@pytest.mark.parametrize("n", [3, 7, 16])
def test_cayley_sgd_solves_orthogonal_procrustes(n):
    """min ‖A X − B‖² over orthogonal X has the closed form X* = U Vᵀ (AᵀB = U S Vᵀ)."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(4 * n, n, dtype=torch.float64, generator=g)
    b = a @ _orth(n, 3) + 0.1 * torch.randn(4 * n, n, dtype=torch.float64, generator=g)
    u, _, vt = torch.linalg.svd(a.T @ b)
    best = float(((a @ (u @ vt) - b) ** 2).sum())
    x = torch.eye(n, dtype=torch.float64)
    x[0, 0] = torch.linalg.det(u @ vt).sign()  # a Cayley step keeps det(X): start in X*'s component
    start = float(((a @ x - b) ** 2).sum())
    for _ in range(400):
        grad = 2 * a.T @ (a @ x - b)
        x, _ = spinquant.cayley_step(x, grad / (4 * n), None, lr=0.1)
    got = float(((a @ x - b) ** 2).sum())
    assert float(torch.linalg.det(x)) == pytest.approx(float(torch.linalg.det(u @ vt)))
    assert start > best * 1.5  # the start is far from the optimum
    assert got <= best * (1 + 1e-6) + 1e-9


def test_a_small_cayley_step_descends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 6, dtype=torch.float64, generator=g), torch.randn(20, 6, dtype=torch.float64, generator=g)
    x = _orth(6, 2)
    f = lambda x: float(((a @ x - b) ** 2).sum())
    new, _ = spinquant.cayley_step(x, 2 * a.T @ (a @ x - b), None, lr=1e-3)
    assert f(new) < f(x)


@pytest.mark.parametrize("bits, group, sym", [(4, 16, True), (3, 8, False), (2, -1, True), (4, "auto", False)])
def test_fake_quantize_ste_is_per_group_rtn_with_an_identity_gradient(bits, group, sym):
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(bits)).requires_grad_(True)
    got = spinquant.fake_quantize_ste(w, spinquant.Target(bits=bits, group_size=group, symmetric=sym))
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, observer="minmax")
    g = {16: 16, 8: 8, -1: 48, "auto": 16}[group]  # auto: 48 = 16 · 3, its largest power-of-two divisor
    ref = torch.empty_like(w)
    for r in range(6):  # slow: one group at a time
        for c in range(0, 48, g):
            chunk = w.detach()[r : r + 1, c : c + g]
            s, z = fit_qparams(chunk, scheme)
            ref[r, c : c + g] = fake_quantize(chunk, s[:, None], z[:, None], scheme.maxq)
    assert torch.equal(got.detach(), ref)
    got.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def _folded(m):
    state = {k: v.float() for k, v in fold_norms(m.state_dict(), m.config).items()}
    cfg = m.config.__class__.from_dict({**m.config.to_dict(), "tie_word_embeddings": False})
    f = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    f.load_state_dict(state, strict=True)
    return f


def _rotations(cfg, seed=5):
    d = cfg.hidden_size // cfg.num_attention_heads
    return _orth(cfg.hidden_size, seed).float(), torch.stack([_orth(d, seed + 1 + i) for i in range(cfg.num_hidden_layers)]).float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_the_training_forward_is_the_fused_exports_forward(family):
    """Unquantized, the rotated training forward (weights rotated, embedding and head by hooks)
    computes the original function and the same logits as ``rotate_state`` with those matrices
    (per-layer R2) fused into a checkpoint."""
    m = norm_scaled_model(family)
    f = _folded(m)
    r1, r2 = _rotations(m.config)
    x = torch.randint(0, m.config.vocab_size, (2, 19))
    base = spinquant.Problem.of(f, spinquant.Target()).base
    with torch.no_grad(), spinquant.rotated_stream(f, [r1], None):
        got = torch.func.functional_call(f, spinquant.rotated_weights(base, r1, r2, m.config.num_attention_heads,
                                                                     m.config.num_key_value_heads), (),
                                         {"input_ids": x}, tie_weights=False).logits
    with torch.no_grad():
        ref = m(input_ids=x).logits
        fused = _folded(m)
        state = rotate_state(fold_norms(m.state_dict(), m.config), m.config, folded=True, matrices=(r1.double(), r2.double()))
        fused.load_state_dict({k: v.float() for k, v in state.items()})
        exported = fused(input_ids=x).logits
    tol = 1e-4 * ref.abs().max()
    assert (got - ref).abs().max() < tol and (exported - ref).abs().max() < tol and (got - exported).abs().max() < tol
    assert not torch.allclose(state["model.layers.0.self_attn.o_proj.weight"].float(), f.state_dict()["model.layers.0.self_attn.o_proj.weight"])


def test_quantized_logits_match_a_fused_fake_quantized_model():
    """With quantization, the student is the fused model whose Linears hold the rounded weights."""
    m = norm_scaled_model("llama")
    f = _folded(m)
    r1, r2 = _rotations(m.config)
    target = spinquant.Target(bits=3, group_size=16, symmetric=False, act_bits=8)
    x = torch.randint(0, m.config.vocab_size, (2, 17))
    prob = spinquant.Problem.of(f, target)
    with torch.no_grad():
        got = prob.logits(x, r1, r2)
        state = rotate_state(fold_norms(m.state_dict(), m.config), m.config, folded=True, matrices=(r1.double(), r2.double()))
        fused = _folded(m)
        fused.load_state_dict({k: (spinquant.fake_quantize_ste(v.float(), target) if k.startswith("model.layers.") and
                                   k.endswith("proj.weight") else v.float()) for k, v in state.items()})
        from compress.kernels.reference import quantize_input

        for name, mod in fused.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                mod.register_forward_pre_hook(lambda mod, a: (quantize_input(a[0], 8),))
        ref = fused(input_ids=x).logits
        plain = m(input_ids=x).logits
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()
    assert (got - plain).abs().max() > 10 * (got - ref).abs().max()  # quantization did change the logits


def _planted(seed=0):
    """A tiny llama whose residual stream has outlier channels (what rotations are for)."""
    m = norm_scaled_model("llama", seed)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, :3] *= 25
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight[:, 5] *= 8
            layer.mlp.up_proj.weight[:, 7] *= 8
    return _folded(m)


def test_learning_lowers_the_held_out_gap_and_returns_orthogonal_rotations():
    f = _planted()
    cfg = f.config
    from compress.quant.rotate import initial_rotations

    r1, r2 = initial_rotations(cfg, 0)
    r2 = r2.expand(cfg.num_hidden_layers, *r2.shape).clone()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (20, 32), generator=g)
    prob = spinquant.Problem.of(f, spinquant.Target(bits=2, group_size=16, symmetric=True))
    opts = spinquant.LearnOptions(steps=40, lr=0.5, batch_size=4, topk=16, eval_every=10)
    x1, x2, rec = spinquant.learn_rotations(prob, windows[:16], windows[16:], r1, r2, opts)
    assert rec["held_out_kl"] < 0.95 * rec["held_out_kl_start"], rec
    assert rec["best_step"] > 0 and len(rec["loss_curve"]) == 40
    assert spinquant.orthogonality_error(x1) < 1e-10 and max(spinquant.orthogonality_error(r) for r in x2) < 1e-10
    assert not torch.allclose(x1, r1)
    again = spinquant.held_out_kl(prob, windows[16:], spinquant._teacher(prob, windows[16:], 16, 4), x1, x2, 4)
    assert again == pytest.approx(rec["held_out_kl"], rel=1e-4)  # the record scores the rotations returned


def test_a_rate_too_high_to_help_returns_the_start():
    """Never worse than the Hadamard start on the held-out windows: the best seen is returned."""
    f = _planted(1)
    cfg = f.config
    r1 = _orth(cfg.hidden_size, 0)
    r2 = torch.stack([_orth(16, 1)] * cfg.num_hidden_layers)
    windows = torch.randint(0, cfg.vocab_size, (10, 24), generator=torch.Generator().manual_seed(1))
    prob = spinquant.Problem.of(f, spinquant.Target(bits=2, group_size=16))
    x1, x2, rec = spinquant.learn_rotations(prob, windows[:8], windows[8:], r1, r2,
                                            spinquant.LearnOptions(steps=2, lr=1e-12, batch_size=4, topk=8, eval_every=1))
    assert rec["held_out_kl"] <= rec["held_out_kl_start"]
    if rec["best_step"] == 0:
        assert torch.equal(x1, r1.double()) and torch.equal(x2, r2.double())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("spin") / "llama", "llama")


def _recipe(model, out, passes, samples=8):
    return load_recipe({"model": str(model), "calibration": {"samples": samples, "seq_len": 64, "batch_size": 4}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out)}})


def test_the_learned_rotation_pass_exports_a_quantized_checkpoint_with_its_record(tiny, tmp_path):
    out = tmp_path / "spin"
    learn = {"steps": 4, "batch_size": 2, "seq_len": 32, "holdout": 0.25, "topk": 8, "eval_every": 2}
    rep = api.run(_recipe(tiny, out, [{"rotate": {"learn": learn}}, {"rtn": {"bits": 4, "group_size": 16}}]))
    sec = rep["rotation"]
    assert sec["kind"] == "spinquant" and sec["learned"]["steps"] == 4 and sec["learned"]["windows"] == 6
    assert sec["learned"]["held_out_kl"] <= sec["learned"]["held_out_kl_start"]
    assert json.loads((out / "compress.json").read_text())["rotation"]["kind"] == "spinquant"
    from compress.checkpoint.load import load

    m = load(out, log=lambda *_: None, dtype=torch.float32)
    assert torch.isfinite(m(input_ids=torch.randint(0, 320, (1, 16))).logits).all()


def test_a_learned_rotation_reloads_in_plain_transformers_with_the_original_function(tiny, tmp_path):
    """Whatever was learned, the fused export still computes the original model (to bf16 and 8-bit
    rounding), and transformers loads it."""
    out = tmp_path / "spin-float"
    learn = {"steps": 3, "batch_size": 2, "seq_len": 32, "holdout": 0.25, "topk": 8, "eval_every": 1, "lr": 0.5}
    passes = [{"rotate": {"learn": learn}}, {"rtn": {"bits": 8, "group_size": 16}}]
    api.run(_recipe(tiny, out, passes))
    src = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 320, (2, 29))
    with torch.no_grad():
        a, b = src(input_ids=x).logits, got(input_ids=x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("passes, msg", [
    ([{"rotate": {"learn": {}}}], "quantizer after them"),
    ([{"rotate": {"learn": {}, "r2": False}}, {"rtn": {"bits": 4, "group_size": 16}}], "learns R1 and R2 together"),
    ([{"rotate": {"learn": {"holdout": 0.99}}}, {"rtn": {"bits": 4, "group_size": 16}}], "learn.holdout"),
])
def test_bad_learn_settings_exit_2_before_any_work(tiny, tmp_path, passes, msg):
    with pytest.raises(UsageError, match=msg):
        api.run(_recipe(tiny, tmp_path / "o", passes))
    assert not (tmp_path / "o").exists()


def test_cli_spinquant_needs_rotate_and_puts_learn_in_the_recipe(tiny, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny), "--spinquant", "5", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--rotate" in r.output
    r = CliRunner().invoke(app, ["quantize", str(tiny), "--rotate", "--spinquant", "5", "--method", "rtn", "-o", str(tmp_path / "o"),
                                 "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "learn" in r.output and "steps: 5" in r.output.replace("'", "")
