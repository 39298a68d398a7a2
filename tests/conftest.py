"""Tiny models built in memory, saved as ordinary HF folders, for unit tests of every family."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests (tests/compress/test_kernels.py) run on the CPU under Triton's
    # interpreter, which must be on before anything imports triton (compressed-tensors does):
    # triton.language's own helpers are built interpreted or compiled at that first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 320


def make_tokenizer():
    import pydoc_data.topics as T

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [T.topics[k] for k in sorted(T.topics)[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return AutoConfig.for_model("llama", num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", num_key_value_heads=2, **common)
    if family == "phi3":
        return AutoConfig.for_model("phi3", num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if family == "gemma":
        return AutoConfig.for_model("gemma", num_key_value_heads=2, head_dim=16, **common)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", num_key_value_heads=2, head_dim=16, **common)
    if family == "mistral":
        return AutoConfig.for_model("mistral", num_key_value_heads=2, sliding_window=32, **common)
    if family == "gemma3_text":
        return AutoConfig.for_model(
            "gemma3_text", num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"], **common
        )
    if family == "opt":
        return AutoConfig.for_model(
            "opt", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512
        )
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    if family == "phi":
        return AutoConfig.for_model("phi", **common)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **common)
    if family == "falcon":  # the falcon-7b layout: multi-query, parallel attention, one norm
        return AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=0)
    if family == "bloom":
        return AutoConfig.for_model("bloom", vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    if family == "mixtral":
        return AutoConfig.for_model("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
    if family in ("qwen2_moe", "qwen3_moe"):
        # layer 1 is a dense MLP (mlp_only_layers): both layer kinds in one model
        extra = dict(shared_expert_intermediate_size=96) if family == "qwen2_moe" else {}
        return AutoConfig.for_model(family, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    mlp_only_layers=[1], **extra, **common)
    raise ValueError(family)


def save_tiny(path, family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def norm_scaled_model(family: str, seed: int = 0):
    """A tiny float32 model of ``family`` with non-trivial norm scales and biases (what a rotation's
    folding must carry)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_()
    return m


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """``$COMPRESS_CACHE`` in the test's own folder (generated data, statistics, answers)."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def gptq_w4_recipe(model, out, **export):
    """A small GPTQ W4 g16 job on ``model`` writing ``out`` (no evaluation): what the export tests run."""
    from compress.recipe import load_recipe

    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2},
                        "passes": [{"gptq": {"bits": 4, "group_size": 16}}], "eval": {"perplexity": None},
                        "export": {"path": str(out), **export}})


def compressed_in_memory(model_path, recipe, tmp):
    """The recipe's compression with the compressed blocks kept in memory (no export reloaded):
    what a reloaded export must compute."""
    from compress.arch.families import find_blocks
    from compress.checkpoint.export import Exporter
    from compress.checkpoint.source import ModelSource, materialize
    from compress.data import calibration_windows, load_texts, tokenize
    from compress.engine import SweepOptions, compress_blocks
    from compress.passes import Context, JobView, get_pass

    src = ModelSource(model_path)
    model = src.skeleton()
    blocks_path, blocks = find_blocks(model, src.config.model_type, src.config.num_hidden_layers)
    cal = recipe.calibration
    ids = tokenize(load_texts(cal.data), src.tokenizer)
    calib = calibration_windows(ids, cal.samples, cal.seq_len)
    passes = [get_pass(name)(c, Context(dtype=torch.bfloat16)) for name, c in recipe.pass_configs()]
    job = JobView(passes, calib, recipe.export, src.config)
    for k, p in enumerate(passes):
        p.validate(k, job)
    exp = Exporter(tmp, src, recipe.fingerprint(), blocks_path, len(blocks), torch.bfloat16)
    exp.begin()
    compress_blocks(src, model, passes, calib, exp.write_block, SweepOptions(batch_size=cal.batch_size, keep=True))
    skip = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")} if src.config.tie_word_embeddings else set()
    materialize(model, "", src, skip=skip)
    if skip:
        model.tie_weights()
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """``llamacpp`` tests (llama.cpp's tools loading our GGUF files, minutes) run only when asked
    for (``-m llamacpp``): a machine that happens to have the tools built keeps the default run short."""
    if "llamacpp" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="llama.cpp integration: run with -m llamacpp (tools: python -m compress.eval.llamacpp build)")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)
