"""Cache of evaluation results per (model fingerprint, task, settings), in ``<cache>/eval/``.

A model's fingerprint hashes its ``config.json`` and the name, size and modification time of
every weight and tokenizer file in its folder, so a checkpoint that has not been rewritten is
recognised without reading its weights; one that has (even with identical bytes) is evaluated
again. The key also holds the versions of compress, lm-eval, transformers, torch and Python,
since any of them can change a result. Entries are small JSON files written atomically;
deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from compress.checkpoint.source import cache_dir

_FILES = (".safetensors", ".json", ".model", ".txt", ".bin", ".tiktoken")
_NOT_MODEL = {"report.json", "recipe.yaml", "report.md"}


def model_fingerprint(path: Path) -> str:
    """Hash of config.json and (name, size, mtime) of the weight and tokenizer files."""
    path = Path(path)
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in _FILES and f.name not in _NOT_MODEL:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _versions() -> dict:

    out = {"python": platform.python_version()}
    for pkg in ("compress", "lm-eval", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cache_key(fingerprint: str, task: str, settings: dict) -> str:
    blob = json.dumps({"model": fingerprint, "task": task, "settings": settings, "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _path(key: str) -> Path:

    return cache_dir() / "eval" / f"{key}.json"


def get(key: str) -> dict | None:
    p = _path(key)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def put(key: str, value: dict) -> None:
    p = _path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(p)
