"""The export location: checked before a run does any model work, locked while it writes, and
the finished folder installed in one rename.

* ``claim(target, ...)``: pre-flight then the lock, one context for a whole run. The target must
  not be a regular file (exit 2: ``--overwrite`` replaces export folders, never files); its
  location must take a probe file (exit 3: read-only, permission denied, immutable); it must not
  be another run's (exit 2, naming that run's pid, host and start time); and its disk must have
  room for the estimated export and resume state with a margin (exit 3: the path, the bytes
  needed and the bytes free).
* ``export_lock(target)``: an exclusive ``flock`` on ``.<name>.lock`` beside the target, held
  for the whole run (the sweep, the model stage, the reports). The OS frees it when the process
  dies, so the lock file of a killed run is simply taken over; a finishing run removes it.
  Re-entrant within a process (the model stage takes it again under ``compress run``).
* ``install(work, target)``: the finished work folder renamed to the target; an existing export
  is moved aside first and deleted only once the new one is in place (put back if the rename
  fails).
* ``disk_writes(advice)``: every disk failure inside it (``OSError`` ENOSPC, EDQUOT, EIO, EROFS,
  EACCES, EPERM, EFBIG, or what torch and safetensors make of them) raised as ``DiskError``
  (exit 3) with the cause in words and what to do.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import UsageError
from compress.utils import (
    ROOM_ERRNOS,
    DiskError,
    disk_error,
    existing_folder,
    nearest_existing,
    remove_quietly,
    size_words,
)

RETRY = "rerun the same command with --resume {when}"  # DiskError.with_advice says when, for its cause
MARGIN = 0.10  # room asked for beyond the estimate: 10% ...
MARGIN_BYTES = 4 * 2**20  # ... plus 4 MiB (the metadata, the reports)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def work_folder(target: Path) -> Path:
    """Where an export to ``target`` is assembled (and a sweep's resume state is kept)."""
    return target.parent / f".{target.name}.partial"


def check_target(target: Path, overwrite: bool = True) -> None:
    """Exit 2 when something other than a folder is at the export path: ``--overwrite``
    replaces an earlier export (a folder), never a file the user keeps there; and, without
    ``overwrite``, when an export is there already."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        what = "a symbolic link" if target.is_symlink() else "a file"
        raise UsageError(f"{target}: {what} is there, not an export folder; --overwrite replaces export folders only, so "
                         "move or delete it yourself, or choose another export path")
    above = nearest_existing(target.parent)
    if not above.is_dir():
        raise UsageError(f"{target}: {above} is a file, so no export folder can be made below it; choose another export path")
    if target.exists() and not overwrite:
        raise UsageError(f"{target}: already exists; pass --overwrite to replace it, or choose another export path")


@contextmanager
def disk_writes(advice: str = "", needed: int = 0, path: Path | None = None) -> Iterator[None]:
    """Disk failures inside as ``DiskError`` (exit 3) with ``advice`` (and, for a full disk,
    the ``needed`` bytes); other errors unchanged. ``path``: what is written, where the error
    does not name a file."""
    try:
        yield
    except DiskError as e:
        raise (e.with_advice(advice, needed) if advice and not e.advice else e) from e
    except OSError as e:
        err = disk_error(e, Path(e.filename or path or "."))
        if err is None:
            raise
        raise err.with_advice(advice, needed) from e


def probe(folder: Path) -> None:
    """Create and remove a small file in ``folder``: a read-only, immutable or forbidden
    location fails here (DiskError, exit 3) before any model work."""
    folder = Path(folder)
    p = folder / f".compress-probe-{os.getpid()}"
    try:
        with open(p, "wb") as f:
            f.write(b"probe")
    except OSError as e:
        err = disk_error(e, p)
        if err is None:
            raise
        raise DiskError(folder, err.errno, f"the export cannot be written there: {err.cause}",
                        "choose another export path (-o), or make this one writable") from e
    finally:
        remove_quietly(p)


def export_bound(tensor_info: dict, itemsize: int) -> int:
    """An upper bound of an export's weight bytes: every tensor of the source at the export's
    storage dtype. Why it bounds: a quantized layer stores fewer bits per weight than that dtype
    (packed integers plus one scale and zero point per group: W8 g32 is 9 bits, W4 g16 6 bits, of
    16), a pruned layer is stored dense in it, low-rank factors are only chosen with fewer values
    than the layer (ranks under in*out/(in+out)), and the tensors outside the blocks are copied."""
    total = 0
    for shape, nbytes in tensor_info.values():
        numel = 1
        for d in shape:
            numel *= d
        total += max(nbytes, numel * itemsize)
    return total


def copied_bytes(folder: Path, names: tuple[str, ...]) -> int:
    """Bytes of the files ``names`` in ``folder`` that exist (config, tokenizer: what an export copies)."""
    return sum((Path(folder) / n).stat().st_size for n in names if (Path(folder) / n).is_file())


def activation_bytes(samples: int, seq_len: int, hidden: int) -> int:
    """The resume state's size: the float32 activations entering the next block, twice (the next
    block's file is written beside the previous one, which goes once the progress record names
    the new one)."""
    return 2 * samples * seq_len * hidden * 4


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def check_room(target: Path, need: int, what: str) -> None:
    """Exit 3 when the disk holding ``target`` has less than ``need`` bytes (plus the margin)."""
    folder = existing_folder(Path(target).parent)
    free = shutil.disk_usage(folder).free
    want = int(need * (1 + MARGIN)) + MARGIN_BYTES
    if free < want:
        raise DiskError(target, ROOM_ERRNOS[0], f"not enough room: the disk holding {folder} has {size_words(free)} free "
                        f"({free:,} bytes) and this run needs about {size_words(want)} ({want:,} bytes: {what}, with a margin)",
                        "free space there, or choose another export path")


@contextmanager
def claim(target: Path, need: int, what: str) -> Iterator[None]:
    """The pre-flight checks, then the export lock for as long as the context lasts.
    ``need``: the bytes the run will still write (``what``: the same in words)."""
    target = Path(target)
    check_target(target)
    probe(existing_folder(target.parent))
    with export_lock(target):
        check_room(target, need, what)
        yield


# ---------------------------------------------------------------- the lock

_HELD: dict[str, list[int]] = {}  # lock file -> [pid that holds it, depth], for re-entry in one process


@contextmanager
def export_lock(target: Path) -> Iterator[Path]:
    """Hold the export path's lock (exit 2 at once when another live run holds it)."""
    path = lock_path(Path(target).absolute())
    key = str(path)
    held = _HELD.get(key)
    if held is not None and held[0] == os.getpid():
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    made = _missing(path.parent)  # folders the lock file makes: removed again if the run leaves them empty
    fd = _acquire(path, Path(target))
    _HELD[key] = [os.getpid(), 1]
    try:
        yield path
    finally:
        _HELD.pop(key, None)
        remove_quietly(path)  # before the unlock: a run waiting on this file then retries on a new one
        os.close(fd)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break


def _missing(folder: Path) -> list[Path]:
    """The folders above ``folder`` (itself included) that do not exist yet, deepest first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _acquire(path: Path, target: Path) -> int:
    with disk_writes("choose another export path (-o), or make this one writable"):
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UsageError(f"{target}: another run is writing this export ({holder}; its lock: {path}); wait for it "
                                 "to finish or stop it, or choose another export path") from None
            try:
                ours = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            if ours:  # not a file a finishing run removed between our open and our lock
                info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                return fd
            os.close(fd)
    raise UsageError(f"{target}: could not take the export lock {path}: other runs keep replacing it")


def _holder(fd: int) -> str:
    """The running run, in words, from its lock file (it writes it just after locking)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (ValueError, KeyError, OSError):
            time.sleep(0.05)
    return "a process that has not yet said who it is"


# ---------------------------------------------------------------- the final rename

def install(work: Path, target: Path) -> Path:
    """Rename the finished ``work`` folder to ``target``. An existing export there is moved
    aside first and deleted only once the new one is in place; if the rename fails it is put
    back. A file at ``target`` is refused (exit 2) before anything moves."""
    work, target = Path(work), Path(target)
    check_target(target)
    old = None
    with disk_writes(f"the finished export is kept in {work}: {RETRY}"):
        if target.exists():
            old = target.parent / f".{target.name}.old"
            _remove_tree(old)  # left by a run killed between its renames
            target.rename(old)
        try:
            work.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
            raise
    if old is not None:
        _remove_tree(old)
    return target


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        remove_quietly(path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


# the source files a model-scope pass's checkpoint keeps as they are (config.json and the weights are new)
KEPT_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def write_model(src: Path, model, target: Path, meta: dict, overwrite: bool, advice: str) -> None:
    """A transformers ``model`` as an ordinary checkpoint at ``target`` (written in a work folder,
    then renamed): its config and weights (``save_pretrained``), the source's tokenizer and
    generation files, and ``meta`` as compress.json. ``advice``: what a full disk's message adds."""
    from compress.checkpoint.source import METADATA
    from compress.utils import atomic_write, atomic_write_text

    check_target(target, overwrite)
    work = work_folder(target)
    try:
        with disk_writes(advice, path=work):
            shutil.rmtree(work, ignore_errors=True)
            model.save_pretrained(work)
            for name in KEPT_FILES:
                if (Path(src) / name).is_file():
                    atomic_write(work / name, lambda tmp, f=Path(src) / name: shutil.copy2(f, tmp))
            atomic_write_text(work / METADATA, json.dumps(meta, indent=2))
        install(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
