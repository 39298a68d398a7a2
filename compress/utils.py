"""Generic helpers every layer may use: module paths, atomic writes, process memory.

A leaf: it imports torch and the standard library only, so nothing here can close an import
cycle. A helper belongs here when it knows nothing of compression (no pass, format or family).
"""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

import torch
from torch import nn


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule of ``root`` at ``dotted`` (e.g. ``mlp.down_proj``)."""
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Set any submodule at dotted ``name`` (e.g. ``model.layers.0.mlp.up_proj``) to ``module``;
    returns the module it replaced."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


def first_output(out):
    """A decoder block's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def group_width(group_size: int, in_features: int) -> int:
    """Columns per quantization group: ``group_size``, or all of them for per-channel (-1)."""
    return in_features if group_size == -1 else group_size


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename: never half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the peak RSS
    creeps up block after block from fragmentation)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
