"""Text for calibration and evaluation, and its tokenized windows.

Data references:

* ``builtin:pydoc`` — CPython's own reference documentation (``pydoc_data.topics``), topics
  sorted by key; topic index % 5 == 0 is the evaluation split, the rest is calibration. Always
  present, so everything runs offline. (Its text changes between Python versions; the figures in
  BENCHMARKS.md come from CPython 3.11's copy.)
* a ``.txt`` file (the whole text), a ``.jsonl`` file (one JSON object per line, its ``text``
  field), a ``.parquet`` file (its ``text`` column) — the same text serves either split;
* ``generated`` (calibration only) — sequences the model writes itself (``compress.generation``);
* ``hf:NAME[:CONFIG][:SPLIT]`` (or a bare ``NAME[:CONFIG][:SPLIT]`` that is not a file) — a hub
  dataset through the ``datasets`` package, where the hub is reachable.

Documents are joined with blank lines and tokenized once; calibration takes ``samples`` windows
of ``seq_len`` tokens evenly spaced over the text (``sampling: random`` draws their starts with
the seed instead); evaluation uses consecutive non-overlapping windows.

Calibration text is checked for being text (``calibration.check_text``, on by default; the
one-method commands' ``--no-text-check`` turns it off): files decode as strict UTF-8, at most
``MAX_BAD_CHAR_SHARE`` of the characters are control or replacement characters, and the model's
tokenizer gives at most ``MAX_TOKENS_PER_CHAR_RATIO`` times the tokens per character it gives on
English (``SAMPLE_TEXT``). A failed check is a UsageError (exit 2) naming the file and what was
found, before any model work.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from compress.errors import InputError, UsageError
from compress.hub import offline_unless_reachable

BUILTIN = ("builtin:pydoc",)

# Plain ASCII English prose (two paragraphs): the reference every tokenizer is measured on, here
# and by the GGUF tokenizer check (compress.checkpoint.gguf_tokenizer). Any vocabulary, with or
# without byte fallback, encodes it without an unknown token and decodes it back exactly.
SAMPLE_TEXT = (
    "The river had been rising for three days when the village council finally met in the old "
    "school house. Nobody wanted to leave, but everyone agreed that the bridge would not hold "
    "much longer. The farmers moved their animals to the hills, and the baker, who had lived by "
    "the water all his life, packed his bread into baskets and carried it up the road to the "
    "church, where the families were gathering for the night.\n\n"
    "By morning the rain had stopped. Children stood on the wall and counted the trees that were "
    "floating past, while their parents talked quietly about what they would need to rebuild: "
    "timber, stone, at least 40 workers, and a great deal of patience. It would take months, "
    "perhaps a year, but the mayor said it plainly: \"We have done this before, and we will do "
    "it again.\""
)

# Control characters (C0 and C1, but tab, line feed, vertical tab, form feed and carriage return)
# and U+FFFD, the replacement character a lenient decoder leaves for each undecodable byte. Text
# has next to none (measured: under 0.01% in each of the standard library's 11,000 Python files,
# none in Python's docs or in vim's tutor in 30 languages); random bytes decoded leniently are
# over half replacement characters, Latin-1 decoded binary a quarter controls, a UTF-16 file of
# ASCII text read as UTF-8 half NULs.
MAX_BAD_CHAR_SHARE = 0.05
_BAD_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")

# Tokens per character over the tokenizer's own figure on SAMPLE_TEXT (measured with SmolLM2's
# byte-level BPE, 0.215 on the sample): Python source 1.2, Python's docs 1.1, European languages
# 1.3-2.4, Cyrillic and Greek 3.0-3.9, Arabic and Devanagari 4.4, Chinese and Japanese 4.1-6.9,
# Korean 5.2-8.9 (pure Hangul); random CJK or BMP characters 12.5-13. The check catches text no
# tokenizer sees as language; base64 or hex of random bytes (3.8-4.2) reads as ASCII text and
# passes, and a tokenizer that knows no merges of a script sees that script's prose as noise.
MAX_TOKENS_PER_CHAR_RATIO = 10.0
MIN_CHECKED_CHARS = 1000  # fewer characters say little about tokens per character

_OVERRIDE = "pass --no-text-check (recipe: calibration.check_text: false) to calibrate on it anyway"


def pydoc_topics(split: str) -> list[str]:
    """The texts of ``builtin:pydoc``'s ``split`` (``eval``: the topics at index % 5 == 0 by key;
    else the rest)."""
    import pydoc_data.topics as T

    keys = sorted(T.topics)
    if split == "eval":
        return [T.topics[k] for i, k in enumerate(keys) if i % 5 == 0]
    return [T.topics[k] for i, k in enumerate(keys) if i % 5 != 0]


def load_texts(ref: str, split: str = "calibration", text_field: str = "text", strict: bool = False) -> list[str]:
    """The documents of a data reference; ``split`` is ``calibration`` or ``eval``. ``strict``:
    text that is not UTF-8 is a UsageError naming the file and the byte (else bad bytes become
    U+FFFD)."""
    if ref == "builtin:pydoc":
        return pydoc_topics(split)
    if ref.startswith("builtin:"):
        raise UsageError(f"unknown builtin corpus {ref!r}; the builtin corpus is 'builtin:pydoc'")
    p = Path(ref).expanduser()
    if p.suffix in (".txt", ".jsonl", ".parquet") or p.exists():
        if not p.is_file():
            raise InputError(f"{p}: no such data file")
        if p.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(_read_text(p, strict).splitlines(), 1):
                if line.strip():
                    texts.append(record_text(line, f"{p}:{i}", text_field))
            return texts
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise UsageError("reading .parquet needs pyarrow: pip install 'compress[parquet]'") from e
            table = pq.read_table(p)
            if text_field not in table.column_names:
                raise InputError(f"{p}: no {text_field!r} column (has {table.column_names}); set calibration.text_field")
            return [_as_text(t, f"{p}: row {i}", strict) for i, t in enumerate(table.column(text_field).to_pylist())]
        return [_read_text(p, strict)]
    return _hub_texts(ref.removeprefix("hf:"), split, text_field, strict)


def record_text(line: str, where: str, text_field: str) -> str:
    """The ``text_field`` of one JSON line (``where``: the file and line, for the errors)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(rec, dict) or text_field not in rec:
        raise InputError(f"{where}: the record has no {text_field!r} field (set calibration.text_field)")
    return str(rec[text_field])


def _hub_texts(spec: str, split: str, text_field: str, strict: bool = False) -> list[str]:
    name, *rest = spec.split(":")
    config = rest[0] if rest and rest[0] else None
    hf_split = rest[1] if len(rest) > 1 else ("validation" if split == "eval" else "train")
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"{spec}: not a local file, and hub datasets need `pip install 'compress[datasets]'`") from e

    try:
        with offline_unless_reachable():  # unreachable hub: fail at once instead of half a minute of retries per file
            ds = datasets.load_dataset(name, config, split=hf_split)
    except Exception as e:
        raise InputError(
            f"{spec}: could not load the dataset {name!r} (config {config}, split {hf_split}) from the hub "
            f"({type(e).__name__}). Offline, use a local .txt/.jsonl/.parquet file or builtin:pydoc"
        ) from e
    if text_field not in ds.column_names:
        raise InputError(f"{spec}: no {text_field!r} column (has {ds.column_names}); set calibration.text_field")
    return [_as_text(t, f"{spec}: row {i}", strict) for i, t in enumerate(ds[text_field])]


def _read_text(p: Path, strict: bool) -> str:
    """A text file's content with newlines as ``Path.read_text`` gives them (\\r\\n and \\r become \\n)."""
    return decode_utf8(p.read_bytes(), str(p), strict).replace("\r\n", "\n").replace("\r", "\n")


def _as_text(value, where: str, strict: bool) -> str:
    """A record's text: bytes (a binary column) decoded as UTF-8, anything else as ``str``."""
    return decode_utf8(value, where, strict) if isinstance(value, bytes) else str(value)


def decode_utf8(data: bytes, where: str, strict: bool = True) -> str:
    """``data`` as UTF-8. ``strict``: bytes that are not UTF-8 are a UsageError naming ``where``,
    the byte offset and line of the first ones and how many places do not decode; else each
    undecodable sequence becomes U+FFFD."""
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data.decode("utf-8", errors="replace").count("\ufffd")
        bom = " (it starts with a UTF-16 byte-order mark: convert it, e.g. iconv -f UTF-16 -t UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UsageError(f"{where}: not UTF-8 text: at byte {e.start:,} (line {line:,}), {data[e.start:e.start + 4].hex(' ')} is not UTF-8 "
                         f"({e.reason}), and {bad:,} place{'s' * (bad != 1)} in its {len(data):,} bytes {'do' if bad != 1 else 'does'} not decode{bom}; save it as UTF-8, or {_OVERRIDE}") from None


def check_characters(text: str, source: str) -> None:
    """UsageError when over ``MAX_BAD_CHAR_SHARE`` of ``text`` is control or replacement
    characters, naming ``source``, the share, the commonest ones and where the first is."""
    found = Counter(_BAD_CHARS.findall(text))
    n = sum(found.values())
    if not text or n / len(text) <= MAX_BAD_CHAR_SHARE:
        return
    first = _BAD_CHARS.search(text).start()
    top = ", ".join(f"U+{ord(c):04X} ×{k:,}" for c, k in found.most_common(3))
    raise UsageError(f"{source}: not text: {n / len(text):.0%} of its {len(text):,} characters are control or replacement "
                     f"characters ({top}; the first at character {first:,}); text has under {MAX_BAD_CHAR_SHARE:.0%}; use text, or {_OVERRIDE}")


def check_tokens_per_char(n_tokens: int, n_chars: int, tokenizer, source: str) -> None:
    """UsageError when the tokenizer splits the text into over ``MAX_TOKENS_PER_CHAR_RATIO`` times
    the tokens per character it gives on English (``SAMPLE_TEXT``): no language it knows."""
    if n_chars < MIN_CHECKED_CHARS:
        return
    english = tokens_per_char(tokenizer)
    tpc = n_tokens / n_chars
    if tpc > MAX_TOKENS_PER_CHAR_RATIO * english:
        raise UsageError(f"{source}: does not read as text to the model's tokenizer: {tpc:.2f} tokens per character, "
                         f"{tpc / english:.1f} times its {english:.2f} on English (prose in other languages and code stay under "
                         f"{MAX_TOKENS_PER_CHAR_RATIO:g} times; random characters go over); use text, or {_OVERRIDE}")


def tokens_per_char(tokenizer, text: str = SAMPLE_TEXT) -> float:
    """Tokens per character of ``text`` (no special tokens added)."""
    return len(tokenizer.encode(text, add_special_tokens=False)) / len(text)


def calibration_tokens(texts: list[str], tokenizer, source: str, check: bool = True) -> torch.Tensor:
    """``tokenize(texts, tokenizer)``, with the text checks of ``calibration.check_text`` (module
    docstring) where ``check``: characters before tokenizing, tokens per character after."""
    text = "\n\n".join(texts)
    if check:
        check_characters(text, source)
    ids = tokenize([text], tokenizer)
    if check:
        check_tokens_per_char(len(ids), len(text), tokenizer, source)
    return ids


def tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents joined by blank lines, as one 1-D tensor of token ids."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    return ids


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int, sampling: str = "even", seed: int = 0,
                        source: str = "the calibration text") -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens -> (samples, seq_len) int64.

    ``even``: starts evenly spaced over the text (the peer's protocol; independent of the seed).
    ``random``: starts drawn uniformly with ``seed``. ``source`` names the data in errors."""
    n = len(ids)
    if n == 0:
        raise InputError(f"{source}: no text to calibrate on (the file is empty, or its records' text fields are); "
                         "use another calibration.data")
    if n < seq_len:
        raise UsageError(f"{source}: {n} tokens of calibration text, fewer than calibration.seq_len={seq_len}; use more text or a "
                         "shorter seq_len")
    if sampling == "even":
        step = max(1, (n - seq_len) // samples)
        starts = [min(i * step, n - seq_len) for i in range(samples)]
    elif sampling == "random":
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g).tolist()
    else:
        raise UsageError(f"calibration.sampling: {sampling!r} is not 'even' or 'random'")
    return torch.stack([ids[s : s + seq_len] for s in starts])


def calibration_set(cal, tokenizer, seed: int) -> torch.Tensor:
    """The calibration windows of a recipe's ``calibration`` section (``CalibrationConfig``): its
    text read (strictly UTF-8 and checked as text unless ``check_text`` is off), tokenized, cut
    into ``samples`` windows of ``seq_len`` tokens. (``data: generated``:
    ``compress.generation.calibration_of``.)"""
    if cal.data == "generated":
        raise UsageError("calibration.data: generated is written by the model: use compress.generation.calibration_of")
    texts = load_texts(cal.data, "calibration", cal.text_field, strict=cal.check_text)
    ids = calibration_tokens(texts, tokenizer, cal.data, check=cal.check_text)  # not text: exit 2 here
    return calibration_windows(ids, cal.samples, cal.seq_len, cal.sampling, seed, source=cal.data)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows -> (n, seq_len); the tail shorter than seq_len is dropped."""
    n = len(ids) // seq_len
    if n == 0:
        raise UsageError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)
