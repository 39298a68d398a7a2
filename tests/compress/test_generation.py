"""Data the model writes itself (calibration.data: generated): the sampler against a slow
reference without the KV cache, determinism per seed, the cache, the first token drawn from the
ordinary vocabulary, and the recipe/CLI path."""

import pytest
import torch
from conftest import save_tiny

import compress.checkpoint.load as load_mod
from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource
from compress.generation import calibration_of, generate_sequences, ordinary_tokens, sample
from compress.recipe import CalibrationConfig


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny random qwen2 (untied head: its continuations vary)."""
    return save_tiny(tmp_path_factory.mktemp("gen") / "qwen2", "qwen2")


pytestmark = pytest.mark.usefixtures("private_cache")  # $COMPRESS_CACHE per test


def _slow_sample(model, prompts, n, temperature, top_k, generator):
    """The obvious reference: the whole sequence through the model for every new token."""
    ids = prompts.clone()
    for _ in range(n):
        with torch.no_grad():
            z = model(input_ids=ids).logits[:, -1].float()
        if temperature == 0:
            nxt = z.argmax(-1)
        else:
            z = z / temperature
            kth = z.topk(top_k, -1).values[:, -1:]
            p = torch.softmax(z.masked_fill(z < kth, float("-inf")), -1)
            nxt = torch.multinomial(p, 1, generator=generator)[:, 0]
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_with_the_kv_cache_equals_the_slow_reference(qwen, temperature):
    model = load_source(ModelSource(qwen))
    prompts = torch.tensor([[5, 17, 33], [40, 2, 99]])
    got = sample(model, prompts, 12, temperature=temperature, top_k=20, generator=torch.Generator().manual_seed(1))
    want = _slow_sample(model, prompts, 12, temperature, 20, torch.Generator().manual_seed(1))
    assert torch.equal(got, want)


def test_greedy_after_switches_to_the_most_likely_token(qwen):
    model = load_source(ModelSource(qwen))
    prompts = torch.tensor([[5, 17]])
    mixed = sample(model, prompts, 10, temperature=1.0, top_k=None, greedy_after=4, generator=torch.Generator().manual_seed(0))
    # from the 4th token on, each one is the argmax given what came before
    greedy_tail = sample(model, mixed[:, :4], 8, temperature=0.0)
    assert torch.equal(mixed, greedy_tail)


def test_greedy_first_takes_the_most_likely_tokens_then_samples(qwen):
    model = load_source(ModelSource(qwen))
    prompts = torch.tensor([[5], [77]])
    hybrid = sample(model, prompts, 12, temperature=1.0, top_k=None, greedy_first=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hybrid[:, :4], sample(model, prompts, 3, temperature=0.0))  # tokens 1..3: top-1
    sampled = sample(model, prompts, 12, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hybrid, sampled)


def test_generated_sequences_are_deterministic_per_seed_and_start_with_an_ordinary_token(qwen):
    model = load_source(ModelSource(qwen))
    tok = ModelSource(qwen).tokenizer
    a = generate_sequences(model, tok, 5, 16, seed=3, batch_size=2)
    b = generate_sequences(model, tok, 5, 16, seed=3, batch_size=2)
    c = generate_sequences(model, tok, 5, 16, seed=4, batch_size=2)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    ordinary = ordinary_tokens(tok, model.get_output_embeddings().weight.shape[0])
    assert ordinary[a[:, 0]].all()
    assert not ordinary[[i for i in tok.all_special_ids if i < len(ordinary)]].any()


def test_generated_calibration_is_cached_by_model_and_seed(qwen, monkeypatch):
    src = ModelSource(qwen)
    cal = CalibrationConfig(data="generated", samples=4, seq_len=12)
    first = calibration_of(cal, src, seed=0)
    monkeypatch.setattr(load_mod, "load_source", lambda *a, **k: pytest.fail("the cache was not used"))
    assert torch.equal(calibration_of(cal, src, seed=0), first)  # read back, no model loaded
    with pytest.raises(pytest.fail.Exception):
        calibration_of(cal, src, seed=1)  # another seed: generated anew
    with pytest.raises(pytest.fail.Exception):
        calibration_of(cal.model_copy(update={"generate": cal.generate.model_copy(update={"temperature": 0.5})}), src, seed=0)


def test_a_run_calibrates_on_generated_data(qwen, tmp_path):
    from compress import api
    from compress.recipe import load_recipe

    out = tmp_path / "o"
    rep = api.run(load_recipe({"model": str(qwen), "calibration": {"data": "generated", "samples": 4, "seq_len": 32},
                               "passes": [{"gptq": {"bits": 4, "group_size": 16}}], "eval": {"perplexity": None},
                               "export": {"path": str(out)}}))
    assert rep["recipe"]["calibration"]["data"] == "generated"
    assert any((tmp_path / "cache" / "generated").glob("*.pt"))
    assert (out / "config.json").exists()


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": 0}, {"batch_size": 0}, {"greedy_after": 0}])
def test_bad_generation_options_are_refused(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CalibrationConfig(data="generated", generate=bad)
