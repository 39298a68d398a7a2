"""Training windows streamed from a text corpus larger than memory (``distill.data``).

The file is read lazily, once per epoch, line by line; its text is the text ``compress.data``
reads from it (a ``.txt`` file's content with ``\\r\\n`` and ``\\r`` as ``\\n``; a ``.jsonl``
file's records' ``text_field``, documents joined by blank lines), tokenized in chunks of about
``chunk_chars`` characters and cut into consecutive non-overlapping windows of ``seq_len``
tokens: the windows ``compress.data.eval_windows(tokenize(load_texts(path), tok), seq_len)``
gives, without ever holding the whole text or its tokens.

Why chunk cuts give the tokens of the whole text: a chunk ends at a line break, on the side of
its ``\\n`` where byte-level BPE pre-tokenizers always split, whatever follows. GPT-2's pattern
(SmolLM2, the test tokenizers) splits before a ``\\n`` that follows a non-space character
(``"x." | "\\n\\nY"``); Llama-3's and Qwen2's after a ``\\n`` that a non-space character follows
on its line, indented or not (``".\\n\\n"`` is one pre-token). Which one a tokenizer needs is measured once
on a probe text (``line_cut``). A tokenizer that passes neither (SentencePiece's prefix space at
the start of each call) gets the cut after the line break, and may differ from the whole text by
a token or two per chunk (``TokenStream.exact`` says which).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from compress.data import check_characters, check_tokens_per_char, record_text
from compress.errors import InputError, UsageError

SUFFIXES = (".txt", ".jsonl")
JOIN = "\n\n"  # between documents, as compress.data.tokenize joins them
# Text with no place to cut for this many chunks (no line break next to a non-space character,
# e.g. one huge line) is cut where it is:
# memory stays bounded, and the tokens at that cut may differ from the whole text's.
MAX_CHUNKS_UNCUT = 4
_BEFORE, _AFTER = re.compile(r"(?<=\S)\n"), re.compile(r"\n(?=[^\S\n]*\S)")


def probe_text() -> str:
    """Text with every kind of line break a chunk may end at: each line ending (word, number,
    punctuation) x whitespace before the last ``\\n`` x start of the next line (indented too)."""
    ends, runs = ["word", "x1", "end.", "f(x)", "a:", "it's"], ["", "\n", "\n\n", " ", "  \n", "\t", "\n \t"]
    starts = ["Next", "42", "(a", "- b", "#c", "été", "  indented", "\tx", "   "]
    return " ".join(f"{e}{r}\n{s} more" for e in ends for r in runs for s in starts)


def cut_points(text: str, after: int) -> list[int]:
    """The places in ``text`` a chunk may end at, in order: before each ``\\n`` that follows a
    non-space character (``after`` 0), or after each ``\\n`` that a non-space character follows
    on its line, after spaces or tabs or not (``after`` 1)."""
    return [m.start() for m in _BEFORE.finditer(text)] if after == 0 else [m.end() for m in _AFTER.finditer(text)]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def line_cut(tokenizer) -> int | None:
    """Where a chunk ends relative to the line break it ends at, so that chunk by chunk gives
    the tokens of the whole text: 0 before the ``\\n`` (GPT-2's pre-tokenizer), 1 after it
    (Llama-3's, Qwen2's); None when neither does on the probe text."""
    text = probe_text()
    whole = encode(tokenizer, text)
    for off in (0, 1):
        cuts = [0, *cut_points(text, off), len(text)]
        if [t for a, b in itertools.pairwise(cuts) for t in encode(tokenizer, text[a:b])] == whole:
            return off
    return None


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BOS, EOS; often none):
    ``compress.data.tokenize`` keeps them, once for the whole text."""
    bare = encode(tokenizer, "a")
    full = tokenizer.encode("a")
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def decode_line(raw: bytes, where: str, strict: bool) -> str:
    """One line of the file as text, ``\\r\\n`` and ``\\r`` as ``\\n``. ``strict``: bytes that
    are not UTF-8 are a UsageError naming ``where`` (file:line); else each becomes U+FFFD."""
    try:
        text = raw.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text: at byte {e.start:,} of the line, {raw[e.start:e.start + 4].hex(' ')} is not "
                         f"UTF-8 ({e.reason}); save the file as UTF-8, or read it with the text check off (check_text=False)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def txt_pieces(lines: Iterable[bytes], path: Path, strict: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a .txt file: its whole content is one document."""
    for i, raw in enumerate(lines, 1):
        yield i, decode_line(raw, f"{path}:{i}", strict)


def jsonl_pieces(lines: Iterable[bytes], path: Path, strict: bool, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each record of a .jsonl file, every record after the first
    preceded by the blank line that joins documents; blank lines are skipped."""
    first = True
    for i, raw in enumerate(lines, 1):
        line = decode_line(raw, f"{path}:{i}", strict)
        if not line.strip():
            continue
        text = record_text(line, f"{path}:{i}", text_field)
        yield i, text if first else JOIN + text
        first = False


def chunks(pieces: Iterable[tuple[int, str]], chunk_chars: int, off: int) -> Iterator[tuple[int, str]]:
    """The text of ``pieces`` in chunks of at least ``chunk_chars`` characters (but the last),
    each ending at its last cut point (``cut_points(text, off)``; ``off`` from ``line_cut``),
    with the line number of the last piece read. Linear time; holds one chunk plus the text
    after its cut."""
    parts, size, cut, line, tail = [], 0, -1, 0, ""  # tail: the last character before `piece`
    for line, piece in pieces:
        if points := cut_points(tail + piece, off):
            cut = size - len(tail) + points[-1]
        parts.append(piece)
        size += len(piece)
        tail = piece[-1:] or tail
        if size < chunk_chars or (cut <= 0 and size < MAX_CHUNKS_UNCUT * chunk_chars):
            continue
        text = "".join(parts)
        cut = cut if cut > 0 else len(text)
        yield line, text[:cut]
        parts, size, cut = [text[cut:]], len(text) - cut, -1
    if size:
        yield line, "".join(parts)


def windows(token_chunks: Iterable[torch.Tensor], seq_len: int) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping (seq_len,) windows of the concatenated chunks; a tail shorter
    than seq_len is dropped. Each window is a copy, so a window kept does not keep its chunk."""
    rest = torch.empty(0, dtype=torch.long)
    for ids in token_chunks:
        ids = torch.cat([rest, ids])
        n = len(ids) // seq_len
        for w in ids[: n * seq_len].view(n, seq_len):  # (n, seq_len)
            yield w.clone()
        rest = ids[n * seq_len :].clone()


def shuffled(items: Iterable[torch.Tensor], size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``items`` through a shuffle buffer of ``size``: each new item takes the place of one
    drawn at random, which is yielded; the rest are yielded in a random order at the end."""
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = int(torch.randint(size, (1,), generator=generator))
        yield buf[i]
        buf[i] = x
    for i in torch.randperm(len(buf), generator=generator).tolist():
        yield buf[i]


def full_groups(items: Iterable[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive lists of ``size`` items; an incomplete last one is dropped."""
    it = iter(items)
    while len(group := list(itertools.islice(it, size))) == size:
        yield group


def checked_path(path) -> Path:
    """``path`` as a Path, after checking it is a .txt/.jsonl file that exists."""
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise UsageError(f"{p}: a streamed corpus is a .txt file (its text) or a .jsonl file (one JSON record per line); "
                         f"{p.suffix or 'no suffix'} is neither: convert it, or use one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise InputError(f"{p}: no such data file")
    return p


def _positive(**values: int) -> None:
    """UsageError naming the first argument that is not an integer at least its minimum
    (``heldout``, ``shuffle_buffer``, ``start``: 0; the others 1)."""
    for name, v in values.items():
        least = 0 if name in ("heldout", "shuffle_buffer", "start") else 1
        if not isinstance(v, int) or v < least:
            raise UsageError(f"{name}={v!r}: must be an integer >= {least}")


class TokenStream:
    """Windows of ``seq_len`` tokens from a .txt or .jsonl corpus (jsonl: each record's
    ``text_field``), read lazily: the file is opened once per epoch and read line by line,
    tokenized in chunks of about ``chunk_chars`` characters at line breaks (module docstring),
    and cut into consecutive non-overlapping windows. At most one chunk's text and tokens plus
    one window (and ``shuffle_buffer`` windows) are held at a time.

    ``heldout``: the first ``heldout`` windows of the file are held out (``held()``, read once,
    here) and never yielded for training. ``check_text``: each chunk is checked as
    ``compress.data`` checks calibration text (characters, tokens per character) and the file
    must be UTF-8; bad text is a UsageError naming the file and line.

    ``tokens_read``: tokens tokenized so far (this first read and every epoch's);
    ``epochs_started``: passes begun by ``epoch``; ``train_windows``: the training windows of
    one pass, once a pass has been read to its end (None before); ``exact``: whether the chunk
    cuts are known to give the tokens of the whole text for this tokenizer (``line_cut``).
    """

    def __init__(self, path, tokenizer, seq_len: int, *, text_field: str = "text", heldout: int = 8,
                 chunk_chars: int = 1 << 20, check_text: bool = True, shuffle_buffer: int = 0):
        _positive(seq_len=seq_len, heldout=heldout, chunk_chars=chunk_chars, shuffle_buffer=shuffle_buffer)
        self.path = checked_path(path)
        self.tokenizer, self.seq_len, self.text_field, self.heldout = tokenizer, seq_len, text_field, heldout
        self.chunk_chars, self.check_text, self.shuffle_buffer = chunk_chars, check_text, shuffle_buffer
        cut = line_cut(tokenizer)
        self.exact, self._off = cut is not None, 1 if cut is None else cut
        self._affixes = special_affixes(tokenizer)
        self.tokens_read, self.epochs_started, self.train_windows = 0, 0, None
        with contextlib.closing(self._windows()) as ws:
            first = list(itertools.islice(ws, heldout + 1))
        if len(first) <= heldout:
            need = (heldout + 1) * seq_len
            raise UsageError(f"{self.path}: {self.tokens_read:,} tokens, fewer than the {need:,} needed for {heldout} held-out "
                             f"window{'s' * (heldout != 1)} and one training window of {seq_len} tokens; use a longer corpus, "
                             "fewer held-out windows or a shorter seq_len")
        self._held = torch.stack(first[:heldout]) if heldout else torch.empty((0, seq_len), dtype=torch.long)

    def held(self) -> torch.Tensor:
        """The held-out windows, (heldout, seq_len) int64: the file's first ``heldout`` windows."""
        return self._held

    def epoch(self, epoch: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """The training windows of one pass over the file, each a (seq_len,) int64 tensor, in
        file order after the held-out ones. ``shuffle_buffer`` > 0: through a shuffle buffer of
        that many windows, its generator seeded by (seed, epoch) as the training loop seeds its
        epochs, so a pass is the same for the same seed and epoch."""
        self.epochs_started += 1
        n = 0
        with contextlib.closing(self._windows()) as ws:
            train = itertools.islice(ws, self.heldout, None)
            if self.shuffle_buffer:
                train = shuffled(train, self.shuffle_buffer, torch.Generator().manual_seed(seed * 100_003 + epoch))
            for w in train:
                n += 1
                yield w
        self.train_windows = n

    def batches(self, batch_size: int, start: int = 0, seed: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, seq_len) batches over epochs 0, 1, 2, ...; an epoch's last
        incomplete batch is dropped. ``start``: begin at batch ``start`` (to resume a training
        run at a step): the skipped part of a pass is read and tokenized again but not kept, and
        whole passes are skipped unread once one pass has given their number of batches."""
        _positive(batch_size=batch_size, start=start)
        skip = start
        for e in itertools.count():
            per_epoch = None if self.train_windows is None else self.train_windows // batch_size
            if per_epoch == 0:
                raise UsageError(f"{self.path}: {self.train_windows} training window{'s' * (self.train_windows != 1)} per pass "
                                 f"(after {self.heldout} held out), fewer than batch_size={batch_size}; use a longer corpus, a "
                                 "smaller batch or a shorter seq_len")
            if per_epoch is not None and skip >= per_epoch:
                skip -= per_epoch
                continue
            for group in full_groups(self.epoch(e, seed), batch_size):
                if skip:
                    skip -= 1
                    continue
                yield torch.stack(group)  # (batch_size, seq_len)

    def _windows(self) -> Iterator[torch.Tensor]:
        """Every window of the file, held-out ones first; opens the file once."""
        with self.path.open("rb") as f:
            yield from windows(self._token_chunks(f), self.seq_len)

    def _token_chunks(self, lines: Iterable[bytes]) -> Iterator[torch.Tensor]:
        """The file's tokens chunk by chunk, int64, the tokenizer's special tokens around the
        whole text as ``compress.data.tokenize`` has them; each chunk checked (``check_text``)."""
        prefix, suffix = self._affixes
        if self.path.suffix == ".jsonl":
            pieces = jsonl_pieces(lines, self.path, self.check_text, self.text_field)
        else:
            pieces = txt_pieces(lines, self.path, self.check_text)
        for ids in itertools.chain([prefix], self._encoded(chunks(pieces, self.chunk_chars, self._off)), [suffix]):
            self.tokens_read += len(ids)
            if ids:
                yield torch.tensor(ids, dtype=torch.long)

    def _encoded(self, text_chunks: Iterable[tuple[int, str]]) -> Iterator[list[int]]:
        """Token ids of each chunk, after the text checks where ``check_text``."""
        for line, text in text_chunks:
            source = f"{self.path} (the text up to line {line:,})"
            if self.check_text:
                check_characters(text, source)
            ids = encode(self.tokenizer, text)
            if self.check_text:
                check_tokens_per_char(len(ids), len(text), self.tokenizer, source)
            yield ids
