"""Data of the offline tasks shipped in ``eval/tasks/``, built from the builtin evaluation split.

Both tasks are derived deterministically from ``builtin:pydoc``'s evaluation split (topics sorted
by key, index % 5 == 0; see ``compress.data``), so they need no network and never overlap the
calibration text. The records are written once per Python version as JSON Lines under
``<cache>/tasks/`` (``compress.checkpoint.source.cache_dir()``), where a user can read them or copy them as a
starting point for their own ``--task-file``; the task YAMLs find them through
``custom_dataset`` functions at run time, so no path is baked into a YAML.

* ``pydoc_ppl``: one document per topic (``{"text": ...}``), scored with lm-eval's
  ``loglikelihood_rolling`` (word/byte perplexity, bits per byte).
* ``pydoc_lastword``: LAMBADA-style. Every prose paragraph of at least ``MIN_WORDS`` words that
  ends in a word of three or more letters followed by ``.``, ``!`` or ``?`` becomes one item:
  ``context`` is the paragraph up to that word (line breaks joined by spaces), ``target`` is
  `` word``; accuracy is whether greedy decoding would produce exactly the target.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from compress.checkpoint.source import cache_dir
from compress.data import pydoc_topics

MIN_WORDS = 12
_LAST = re.compile(r"([A-Za-z]{3,})[.!?]")


def ppl_records() -> list[dict]:
    return [{"text": t} for t in pydoc_topics("eval")]


def lastword_records() -> list[dict]:
    out = []
    for topic in pydoc_topics("eval"):
        for para in re.split(r"\n\s*\n", topic):
            if "::=" in para or para.lstrip().startswith(">>>"):  # grammar rules, doctest sessions
                continue
            words = " ".join(line.strip() for line in para.splitlines()).split()
            if len(words) < MIN_WORDS:
                continue
            m = _LAST.fullmatch(words[-1])
            if not m:
                continue
            out.append({"context": " ".join(words[:-1]), "target": " " + m.group(1)})
    return out


_BUILDERS = {"pydoc_ppl": ppl_records, "pydoc_lastword": lastword_records}


def data_file(name: str) -> Path:
    """The JSON Lines file of shipped task ``name``, written on first use (atomically)."""

    ver = "py{}.{}".format(*sys.version_info[:2])  # the corpus text changes between versions
    path = cache_dir() / "tasks" / f"{name}-{ver}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in _BUILDERS[name]()), encoding="utf-8")
        tmp.replace(path)
    return path


def data_hash(name: str) -> str:
    """Content hash of a shipped task's data (part of the evaluation cache key)."""
    return hashlib.sha256(data_file(name).read_bytes()).hexdigest()[:16]


def dataset(name: str):
    """A ``datasets.DatasetDict`` with one ``test`` split, read from the data file."""
    import datasets

    path = data_file(name)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
