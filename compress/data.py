"""Text for calibration and evaluation, and its tokenized windows.

Data references:

* ``builtin:pydoc`` — CPython's own reference documentation (``pydoc_data.topics``), topics
  sorted by key; topic index % 5 == 0 is the evaluation split, the rest is calibration. Always
  present, so everything runs offline. (Its text changes between Python versions; the figures in
  BENCHMARKS.md come from CPython 3.11's copy.)
* a ``.txt`` file (the whole text), a ``.jsonl`` file (one JSON object per line, its ``text``
  field), a ``.parquet`` file (its ``text`` column) — the same text serves either split;
* ``hf:NAME[:CONFIG][:SPLIT]`` (or a bare ``NAME[:CONFIG][:SPLIT]`` that is not a file) — a hub
  dataset through the ``datasets`` package, where the hub is reachable.

Documents are joined with blank lines and tokenized once; calibration takes ``samples`` windows
of ``seq_len`` tokens evenly spaced over the text (``sampling: random`` draws their starts with
the seed instead); evaluation uses consecutive non-overlapping windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import InputError, UsageError
from compress.hub import offline_unless_reachable

BUILTIN = ("builtin:pydoc",)


def pydoc_topics(split: str) -> list[str]:
    """The texts of ``builtin:pydoc``'s ``split`` (``eval``: the topics at index % 5 == 0 by key;
    else the rest)."""
    import pydoc_data.topics as T

    keys = sorted(T.topics)
    if split == "eval":
        return [T.topics[k] for i, k in enumerate(keys) if i % 5 == 0]
    return [T.topics[k] for i, k in enumerate(keys) if i % 5 != 0]


def load_texts(ref: str, split: str = "calibration", text_field: str = "text") -> list[str]:
    """The documents of a data reference; ``split`` is ``calibration`` or ``eval``."""
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
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}:{i}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or text_field not in rec:
                    raise InputError(f"{p}:{i}: the record has no {text_field!r} field (set calibration.text_field)")
                texts.append(str(rec[text_field]))
            return texts
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise UsageError("reading .parquet needs pyarrow: pip install 'compress[parquet]'") from e
            table = pq.read_table(p)
            if text_field not in table.column_names:
                raise InputError(f"{p}: no {text_field!r} column (has {table.column_names}); set calibration.text_field")
            return [str(t) for t in table.column(text_field).to_pylist()]
        return [p.read_text(encoding="utf-8", errors="replace")]
    return _hub_texts(ref.removeprefix("hf:"), split, text_field)


def _hub_texts(spec: str, split: str, text_field: str) -> list[str]:
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
    return [str(t) for t in ds[text_field]]


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


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows -> (n, seq_len); the tail shorter than seq_len is dropped."""
    n = len(ids) // seq_len
    if n == 0:
        raise UsageError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)
