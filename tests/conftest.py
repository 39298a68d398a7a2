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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import pydoc_data.topics as T

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
    raise ValueError(family)


def save_tiny(path, family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")
