"""Generic helpers every layer may use: module paths, atomic writes, process memory.

A leaf: it imports torch, the standard library and ``compress.errors`` (itself a leaf) only, so
nothing here can close an import cycle. A helper belongs here when it knows nothing of compression
(no pass, format or family).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.errors import InputError



def cache_dir() -> Path:
    """compress's cache root: ``$COMPRESS_CACHE``, else ``~/.cache/compress`` (models, generated
    data, built kernels, statistics)."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")

def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule of ``root`` at ``dotted`` (e.g. ``mlp.down_proj``)."""
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Set any submodule at dotted ``name`` (e.g. ``model.layers.0.mlp.up_proj``) to ``module``;
    returns the module it replaced. Forward pre-hooks marked ``carried`` (an online rotation of the
    input, ``compress.quant.online``) move to the new module: they are part of what it computes."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    carried = [h for h in getattr(old, "_forward_pre_hooks", {}).values() if getattr(h, "carried", False)]
    for h in carried:
        if module is not old and h not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(h)
    for attr, value in list(vars(owner).items()):  # an alias the model's forward reads (a renamed module: gpt_neox's lm_head)
        if value is old:
            owner.__dict__[attr] = module
    return old


def first_output(out):
    """A decoder block's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def group_width(group_size: int, in_features: int) -> int:
    """Columns per quantization group: ``group_size``, or all of them for per-channel (-1)."""
    return in_features if group_size == -1 else group_size


# what each errno says about the disk, in words ("the disk holding /x ...")
DISK_CAUSES = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over your disk quota",
    errno.EIO: "reported an I/O error (a failing disk, or a network mount that went away)",
    errno.EROFS: "is read-only",
    errno.EACCES: "refuses writes here (permission denied)",
    errno.EPERM: "refuses writes here (operation not permitted: an immutable or protected folder)",
    errno.EFBIG: "refuses a file this large (a file size limit)",
}
ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # the failures that more room cures
# when to try again, for an advice's "{when}"
RETRY_WHEN = {errno.ENOSPC: "once the disk has room", errno.EDQUOT: "once you are under your quota",
              errno.EIO: "once the disk is healthy again", errno.EROFS: "once the location is writable",
              errno.EACCES: "once the location is writable", errno.EPERM: "once the location is writable",
              errno.EFBIG: "with a higher file size limit (ulimit -f)"}


class DiskError(InputError):
    """Writing ``path`` failed for a reason outside the program (a full, read-only or failing
    disk): exit 3. ``cause`` says it in words; ``errno`` which one it was."""

    def __init__(self, path: Path, code: int, cause: str, advice: str = ""):
        super().__init__(f"{path}: {cause}" + (f"; {advice}" if advice else ""))
        self.path, self.errno, self.cause, self.advice = Path(path), code, cause, advice

    def with_advice(self, advice: str, needed: int = 0) -> DiskError:
        """The same failure with what to do (its "{when}": when to try again, for this cause)
        and, for a full disk, the room the job needs."""
        cause = self.cause + (f", about {size_words(needed)} needed" if needed and self.errno in ROOM_ERRNOS else "")
        return DiskError(self.path, self.errno, cause, advice.replace("{when}", RETRY_WHEN.get(self.errno, "once the disk is fixed")))


def size_words(n: int) -> str:
    """Bytes for people: 812 kB, 40 MB, 1.5 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a folder or a file)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest existing ancestor folder (what a disk-usage query can ask about)."""
    path = nearest_existing(path)
    return path if path.is_dir() else path.parent


def _errno(e: BaseException | None) -> int | None:
    """The errno behind ``e``: an OSError's own, the "(os error N)" safetensors' Rust writer
    reports, or an OSError that torch's zip writer turned into a RuntimeError (its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"os error (\d+)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def disk_error(e: BaseException, path: Path) -> DiskError | None:
    """``e``, raised while writing ``path``, as a DiskError naming the cause in words; None when
    it is not a disk failure (a bug, an interrupt: those propagate as they are)."""
    code = _errno(e)
    folder = existing_folder(Path(path).parent)
    if code is None and isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "write failed" in str(e)):
        # torch.save given a file name reports a full disk as its zip writer's position mismatch
        code = errno.ENOSPC if shutil.disk_usage(folder).free < 2**20 else None
    if code not in DISK_CAUSES:
        return None
    cause = f"the disk holding {folder} {DISK_CAUSES[code]}"
    if code in ROOM_ERRNOS:
        cause += f": {size_words(shutil.disk_usage(folder).free)} free"
    return DiskError(path, code, cause)


def remove_quietly(path: Path) -> None:
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename: never half a file at
    ``path``. On any failure the temporary file is removed; a disk failure (full, read-only,
    I/O error) raises DiskError (exit 3) naming the cause in words."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        err = disk_error(e, path) if isinstance(e, Exception) and not isinstance(e, DiskError) else None
        if err is not None:
            raise err from e
        raise


def _torch_save(obj, tmp: Path) -> None:
    with open(tmp, "wb") as f:  # a file object: a full disk surfaces as the OSError behind torch's RuntimeError
        torch.save(obj, f)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename: never half a file."""
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
