"""The streamed corpus (compress.distill.stream) against compress.data's whole-text windows: the
same tokens chunk by chunk, the file opened once per pass and read line by line, held-out
windows never trained on, resumable batches, a deterministic shuffle, and its errors."""

from __future__ import annotations

import itertools
import json
import pathlib
import pydoc_data.topics as T

import pytest
import torch
from compress.distill import stream as S
from compress.distill.stream import TokenStream, line_cut
from conftest import VOCAB, make_tokenizer

from compress.data import eval_windows, load_texts, tokenize
from compress.errors import InputError, UsageError

# Llama-3's (and Qwen2's) pre-tokenizer pattern: punctuation takes the line breaks after it
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _bpe(pre_tokenizer, merges=None, train=False):
    """A byte-level BPE tokenizer with ``pre_tokenizer``: trained on pydoc (``train``) or with
    the byte alphabet and ``merges`` only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if train:
        t = Tokenizer(models.BPE())
    else:
        vocab = {c: i for i, c in enumerate(alphabet)} | {a + b: len(alphabet) + k for k, (a, b) in enumerate(merges)}
        t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizer
    t.decoder = decoders.ByteLevel()
    if train:
        t.train_from_iterator(_docs(40), trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=t)


def _llama3_pre():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _docs(n=12):
    return [T.topics[k] for k in sorted(T.topics)[:n]]


def _txt(tmp_path, text, name="corpus.txt"):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


def _jsonl(tmp_path, records, name="corpus.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return p


def _reference(path, tokenizer, seq_len):
    """compress.data's windows of the whole text: what the stream must give."""
    return eval_windows(tokenize(load_texts(str(path)), tokenizer), seq_len)


def _lines(n=400):
    """Distinct lines, so that no two windows are equal."""
    return "".join(f"Line {i}: the value {i * 7919 % 1013} follows {i - 1}.\n" for i in range(n))


class _Counting:
    """The tokenizer, recording the length of every text it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def encode(self, text, **kw):
        self.lengths.append(len(text))
        return self.tokenizer.encode(text, **kw)


def test_txt_windows_are_compress_data_windows_whatever_the_chunk_size(tok, tmp_path):
    # CRLF and lone CR lines, blank lines, indented blocks: the text compress.data reads
    text = "\n\n".join(_docs()).replace("\n\n", "\r\n\r\n", 5).replace("\n", "\r", 3)
    path = _txt(tmp_path, text)
    ref = _reference(path, tok, 16)
    for chunk_chars in (40, 500, 1 << 20):
        counting = _Counting(tok)
        s = TokenStream(path, counting, 16, heldout=3, chunk_chars=chunk_chars)
        assert s.exact
        counting.lengths.clear()
        before = s.tokens_read
        got = torch.stack(list(s.epoch(0)))
        assert torch.equal(s.held(), ref[:3]) and torch.equal(got, ref[3:]), chunk_chars
        assert got.dtype == torch.int64 and got.shape[1] == 16
        assert s.tokens_read - before == len(tokenize(load_texts(str(path)), tok))
        if chunk_chars == 500:  # many chunks, none much over chunk_chars (pydoc has long indented runs)
            assert len(counting.lengths) > len(text) // 2000
            assert max(counting.lengths) <= S.MAX_CHUNKS_UNCUT * chunk_chars + max(map(len, text.splitlines()))


def test_jsonl_windows_are_compress_data_windows(tok, tmp_path):
    docs = _docs() + ["", "short", "ends with a space ", "  indented start"]
    records = [{"id": i, "text": d} for i, d in enumerate(docs)]
    path = _jsonl(tmp_path, records[:3] + [""] + records[3:])  # a blank line is skipped
    ref = _reference(path, tok, 32)
    s = TokenStream(path, tok, 32, heldout=2, chunk_chars=300)
    assert torch.equal(s.held(), ref[:2])
    assert torch.equal(torch.stack(list(s.epoch(0))), ref[2:])


def test_a_llama3_style_tokenizer_cuts_after_the_line_break_and_matches(tmp_path, monkeypatch):
    llama3 = _bpe(_llama3_pre(), train=True)
    assert line_cut(llama3) == 1
    path = _txt(tmp_path, "\n\n".join(_docs()))
    ref = _reference(path, llama3, 16)
    assert torch.equal(torch.stack(list(TokenStream(path, llama3, 16, heldout=0, chunk_chars=200).epoch(0))), ref)
    monkeypatch.setattr(S, "line_cut", lambda tokenizer: 0)  # GPT-2's cut: the tokens differ, so the choice matters
    wrong = torch.stack(list(TokenStream(path, llama3, 16, heldout=0, chunk_chars=200).epoch(0)))
    assert wrong.shape != ref.shape or not torch.equal(wrong, ref)


def test_line_cut_tells_the_pre_tokenizers_apart():
    from tokenizers import pre_tokenizers

    merges = [(".", "Ċ"), ("Ċ", "Ċ")]  # ".\n" and "\n\n" as tokens: where the two cuts differ
    assert line_cut(_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), merges)) == 0
    assert line_cut(_bpe(_llama3_pre(), merges)) == 1
    assert line_cut(_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True), merges)) is None  # a prefix space per call


def test_a_bos_token_is_kept_once_at_the_start(tok, tmp_path):
    from tokenizers import processors

    bos = make_tokenizer()
    bos.add_special_tokens({"bos_token": "<s>"})
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos.bos_token_id)])
    path = _txt(tmp_path, "\n\n".join(_docs(4)))
    ref = _reference(path, bos, 16)
    assert ref[0, 0] == bos.bos_token_id
    s = TokenStream(path, bos, 16, heldout=1, chunk_chars=100)
    assert torch.equal(s.held(), ref[:1]) and torch.equal(torch.stack(list(s.epoch(0))), ref[1:])


def test_the_file_is_opened_once_per_pass_and_read_line_by_line(tok, tmp_path, monkeypatch):
    path = _txt(tmp_path, _lines(300))
    opened, line_lengths = [], []
    real_open = pathlib.Path.open

    class Lines:
        """The file object, recording each line read; reading it whole fails."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __iter__(self):
            return self

        def __next__(self):
            line = next(self.f)
            line_lengths.append(len(line))
            return line

        def read(self, *a):
            raise AssertionError("the stream read the file whole")

        readlines = read

    def counted_open(self, *a, **kw):
        opened.append(self)
        return Lines(real_open(self, *a, **kw))

    monkeypatch.setattr(pathlib.Path, "open", counted_open)
    monkeypatch.setattr(pathlib.Path, "read_text", lambda *a, **kw: pytest.fail("read_text"))
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda *a, **kw: pytest.fail("read_bytes"))
    s = TokenStream(path, tok, 16, heldout=2, chunk_chars=200)
    assert len(opened) == 1 and len(line_lengths) < 50  # the held-out read stops early
    for e in range(3):
        n = sum(1 for _ in s.epoch(e))
        assert len(opened) == 2 + e and n == s.train_windows > 0
    assert max(line_lengths) <= max(map(len, _lines(300).splitlines(keepends=True)))
    assert s.epochs_started == 3


def test_held_out_windows_are_never_trained_on(tok, tmp_path):
    path = _txt(tmp_path, _lines())
    s = TokenStream(path, tok, 16, heldout=8, chunk_chars=300, shuffle_buffer=16)
    held = {tuple(w.tolist()) for w in s.held()}
    assert s.held().shape == (8, 16) and len(held) == 8
    ref = _reference(path, tok, 16)
    seen = {tuple(w.tolist()) for b in itertools.islice(s.batches(4), 3 * len(ref) // 4) for w in b}  # 3 passes
    assert not seen & held
    assert seen == {tuple(w.tolist()) for w in ref[8:]}  # every other window (shuffled: each pass drops another)


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_batches_from_start_are_a_fresh_runs_batches_from_there(tok, tmp_path, shuffle_buffer):
    path = _txt(tmp_path, _lines(30))
    fresh = TokenStream(path, tok, 16, heldout=2, chunk_chars=250, shuffle_buffer=shuffle_buffer)
    run = list(itertools.islice(fresh.batches(5, seed=3), 40))
    per_epoch = fresh.train_windows // 5
    assert 3 <= per_epoch < 20 and all(b.shape == (5, 16) for b in run)
    for k in (1, per_epoch, per_epoch + 2, 2 * per_epoch + 1):
        s = TokenStream(path, tok, 16, heldout=2, chunk_chars=250, shuffle_buffer=shuffle_buffer)
        resumed = list(itertools.islice(s.batches(5, start=k, seed=3), 40 - k))
        assert len(resumed) == 40 - k and all(torch.equal(a, b) for a, b in zip(resumed, run[k:])), k
    # whole passes after the first are skipped unread: k = 2 * per_epoch + 1 reads pass 0, then 2 on
    assert s.epochs_started == 1 + len(range(2, 39 // per_epoch + 1))


def test_passes_repeat_and_a_shuffle_buffer_is_deterministic_per_seed(tok, tmp_path):
    path = _txt(tmp_path, _lines(200))
    plain = TokenStream(path, tok, 16, heldout=2, chunk_chars=300)
    e1, e2 = torch.stack(list(plain.epoch(1))), torch.stack(list(plain.epoch(2)))
    assert torch.equal(e1, e2)
    s = TokenStream(path, tok, 16, heldout=2, chunk_chars=300, shuffle_buffer=10)
    a, again = torch.stack(list(s.epoch(1, seed=0))), torch.stack(list(s.epoch(1, seed=0)))
    other_seed, other_epoch = torch.stack(list(s.epoch(1, seed=1))), torch.stack(list(s.epoch(2, seed=0)))
    assert torch.equal(a, again)
    assert not torch.equal(a, e1) and not torch.equal(a, other_seed) and not torch.equal(a, other_epoch)
    # the same windows, each once
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, e1.tolist()))


def test_missing_files_and_other_suffixes(tok, tmp_path):
    with pytest.raises(InputError, match=r"nothere\.txt: no such data file"):
        TokenStream(tmp_path / "nothere.txt", tok, 16)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match=r"c\.csv: .*\.csv is neither.*\.txt, \.jsonl"):
        TokenStream(tmp_path / "c.csv", tok, 16)
    with pytest.raises(UsageError, match="seq_len=0: must be an integer >= 1"):
        TokenStream(_txt(tmp_path, _lines()), tok, 0)


def test_bad_jsonl_lines_are_named_by_file_and_line(tok, tmp_path):
    path = _jsonl(tmp_path, [{"text": "fine"}, "", "{not json"])
    with pytest.raises(InputError, match=r"corpus\.jsonl:3: not valid JSON"):
        TokenStream(path, tok, 4, heldout=0)
    path = _jsonl(tmp_path, [{"text": "fine"}, {"body": "x"}], name="f.jsonl")
    with pytest.raises(InputError, match=r"f\.jsonl:2: the record has no 'text' field"):
        TokenStream(path, tok, 4, heldout=0)


def test_too_short_a_corpus_says_how_many_tokens_it_has_and_needs(tok, tmp_path):
    path = _txt(tmp_path, "A few words.\n")
    n = len(tokenize(load_texts(str(path)), tok))
    with pytest.raises(UsageError, match=rf"corpus\.txt: {n} tokens, fewer than the 144 needed for 8 held-out windows and one"):
        TokenStream(path, tok, 16, heldout=8)
    s = TokenStream(path, tok, 2, heldout=0)  # one window fits
    with pytest.raises(UsageError, match=r"training windows? per pass .*fewer than batch_size=64"):
        next(s.batches(64))


def test_text_that_is_not_text_is_refused_naming_the_file(tok, tmp_path):
    binary = _txt(tmp_path, _lines(50) + "\x00\x01\x02\x03" * 500 + "\n" + _lines(50), name="bin.txt")
    with pytest.raises(UsageError, match=r"bin\.txt \(the text up to line \d+\): not text"):
        list(TokenStream(binary, tok, 16, heldout=0, chunk_chars=400).epoch(0))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(_lines(5).encode() + "café\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1\.txt:6: not UTF-8 text: at byte 3 of the line"):
        TokenStream(latin1, tok, 4, heldout=0, chunk_chars=1 << 20)
    lenient = TokenStream(latin1, tok, 4, heldout=0, check_text=False)  # U+FFFD, as compress.data reads it leniently
    assert torch.equal(torch.cat(list(lenient.epoch(0))), _reference(latin1, tok, 4).flatten())
