"""Rotations (QuaRot): orthogonal at the sizes used, the float model's function unchanged on each
family with fold points, the fused export an ordinary checkpoint that plain transformers reloads
with the in-memory logits, quantizable after, and refused where the fold points are unknown."""

import json

import pytest
import torch
from conftest import norm_scaled_model, save_tiny, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.errors import UsageError
from compress.quant.rotate import (
    FAMILIES,
    UnsupportedFamily,
    check_family,
    full_hadamard,
    hadamard,
    paley,
    random_hadamard,
    rotate_state,
)
from compress.recipe import load_recipe


@pytest.mark.parametrize("n", [1, 2, 9, 24, 64, 96, 576, 1536])
def test_random_hadamard_is_orthogonal(n):
    r = random_hadamard(n, seed=4)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=r.dtype), atol=1e-12)
    assert torch.equal(r, random_hadamard(n, seed=4)) and (n == 1 or not torch.equal(r, random_hadamard(n, seed=5)))


def test_hadamard_entries_have_one_magnitude():
    h = hadamard(64)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / 8))
    with pytest.raises(ValueError):
        hadamard(12)


@pytest.mark.parametrize("q", [11, 19, 43, 59])
def test_paley_matrices_are_hadamard(q):
    h = paley(q)
    assert h.shape == (q + 1, q + 1) and bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, (q + 1) * torch.eye(q + 1, dtype=h.dtype))


@pytest.mark.parametrize("n", [576, 3072, 5120, 96, 12 * 20 * 2])
def test_full_hadamard_at_widths_that_are_not_powers_of_two(n):
    h = full_hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # every entry the same magnitude
    r = random_hadamard(n, seed=1)
    assert torch.allclose(r.abs(), torch.full_like(r, n**-0.5))  # the demo's 576 is a true Hadamard now


def test_widths_without_a_hadamard_here_fall_back_to_an_orthogonal_factor():
    assert full_hadamard(64 * 9 * 7) is None
    r = random_hadamard(64 * 7, seed=2)
    assert torch.allclose(r @ r.T, torch.eye(64 * 7, dtype=r.dtype), atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("r1, r2", [(True, True), (True, False), (False, True)])
def test_rotations_leave_the_float_model_unchanged(family, r1, r2):
    m = norm_scaled_model(family)
    x = torch.randint(0, m.config.vocab_size, (2, 23))
    with torch.no_grad():
        ref = m(input_ids=x).logits
    state = rotate_state(m.state_dict(), m.config, seed=7, r1=r1, r2=r2)
    cfg = m.config.__class__.from_dict({**m.config.to_dict(), "tie_word_embeddings": False})
    rot = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    rot.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        got = rot(input_ids=x).logits
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max().clamp_min(1)
    moved = [k for k in state if k.endswith(("q_proj.weight", "o_proj.weight"))]
    assert any(not torch.allclose(state[k].float(), m.state_dict()[k]) for k in moved)  # the weights did change


def test_unknown_fold_points_are_refused():
    for family in ("gemma", "phi3", "gpt2"):
        cfg = tiny_config(family) if family != "gpt2" else type("C", (), {"model_type": "gpt2"})()
        with pytest.raises(UnsupportedFamily, match=family):
            check_family(cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("rot") / "llama", "llama")


def _recipe(model, out, passes):
    return load_recipe({"model": str(model), "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4}, "passes": passes,
                        "eval": {"perplexity": None}, "export": {"path": str(out)}})


def test_the_rotated_export_reloads_in_plain_transformers_with_the_in_memory_logits(tiny, tmp_path):
    out = tmp_path / "rot"
    rep = api.run(_recipe(tiny, out, [{"rotate": {"seed": 3}}]))
    assert rep["rotation"]["untied_lm_head"] is True
    src = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    state = rotate_state(src.state_dict(), src.config, seed=3)
    stored = {k: v.to(torch.bfloat16).float() for k, v in state.items()}  # what the export holds (the source is bf16)
    cfg = src.config.__class__.from_dict({**src.config.to_dict(), "tie_word_embeddings": False})
    mem = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    mem.load_state_dict(stored)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    reloaded, info = loaded
    assert not any(info.values()), info  # nothing missing, unexpected or randomly initialized
    x = torch.randint(0, 320, (2, 31))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=x).logits, mem(input_ids=x).logits)
        orig = src.eval()(input_ids=x).logits
        assert (reloaded(input_ids=x).logits - orig).abs().max() < 0.05 * orig.abs().max()  # the same function, to bf16 rounding
    assert json.loads((out / "compress.json").read_text())["rotation"]["seed"] == 3


def test_rotate_then_gptq_exports_a_quantized_checkpoint_that_keeps_the_rotation_record(tiny, tmp_path):
    out = tmp_path / "rot-w4"
    api.run(_recipe(tiny, out, [{"rotate": {}}, {"gptq": {"bits": 4, "group_size": 16}}]))
    meta = json.loads((out / "compress.json").read_text())
    assert "rotation" in meta
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "quantization_config" in cfg
    from compress.checkpoint.load import load

    m = load(out, log=lambda *_: None, dtype=torch.float32)
    assert torch.isfinite(m(input_ids=torch.randint(0, 320, (1, 16))).logits).all()


@pytest.mark.parametrize("passes, msg", [([{"gptq": {"bits": 4, "group_size": 16}}, {"rotate": {}}], "before them"),
                                         ([{"rotate": {"r1": False, "r2": False}}], "nothing to rotate")])
def test_misplaced_or_empty_rotation_exits_2_before_any_work(tiny, tmp_path, passes, msg):
    with pytest.raises(UsageError, match=msg):
        api.run(_recipe(tiny, tmp_path / "o", passes))
    assert not (tmp_path / "o").exists()


def test_rotation_on_a_family_without_fold_points_exits_2(tmp_path):
    gemma = save_tiny(tmp_path / "gemma", "gemma")
    r = CliRunner().invoke(app, ["quantize", str(gemma), "--rotate", "-o", str(tmp_path / "o"), "--samples", "4", "--seq-len", "32"])
    assert r.exit_code == 2 and "rotations support" in r.output
    assert not (tmp_path / "o").exists()
