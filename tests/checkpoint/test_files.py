"""compress.checkpoint.files and the atomic writes of compress.utils, on their own: disk failures
in words, temporary files removed, the export lock, the pre-flight checks, the final install."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from compress.checkpoint import files
from compress.errors import InputError, UsageError
from compress.utils import (
    DiskError,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    disk_error,
)

ROOT = Path(__file__).resolve().parents[2]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


# ---------------------------------------------------------------- disk failures in words


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "is full"), (errno.EDQUOT, "quota"), (errno.EIO, "I/O error"), (errno.EROFS, "read-only"),
    (errno.EACCES, "permission denied"), (errno.EPERM, "not permitted"),
])
def test_each_errno_is_said_in_words(tmp_path, code, words):
    e = disk_error(OSError(code, os.strerror(code)), tmp_path / "x")
    assert isinstance(e, DiskError) and isinstance(e, InputError) and e.exit_code == 3
    assert str(e).startswith(f"{tmp_path / 'x'}: the disk holding {tmp_path} ") and words in str(e)
    if code == errno.ENOSPC:
        assert " free" in str(e)


def test_what_torch_and_safetensors_make_of_a_full_disk_is_recognized(tmp_path):
    class SafetensorError(Exception):  # safetensors' Rust writer: the errno only in the message
        pass

    assert disk_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), tmp_path).errno == errno.ENOSPC
    try:  # torch.save into a file object: its zip writer's RuntimeError, the OSError as its context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    except RuntimeError as e:
        assert disk_error(e, tmp_path / "inputs.pt").errno == errno.ENOSPC
    assert disk_error(ValueError("a bug"), tmp_path) is None
    assert disk_error(OSError(errno.ENOENT, "gone"), tmp_path) is None  # not a disk's failure: propagates as it is


def test_the_advice_and_the_room_needed_are_added(tmp_path):
    e = disk_error(OSError(errno.ENOSPC, "full"), tmp_path / "x").with_advice("rerun with --resume", 150 * 10**6)
    assert "is full: " in str(e) and "free, about 150 MB needed; rerun with --resume" in str(e)
    assert "needed" not in str(disk_error(OSError(errno.EIO, "io"), tmp_path / "x").with_advice("fix it", 10**6))


# ---------------------------------------------------------------- atomic writes


def _failing_after_half(write):
    def fake(tmp, *a, **k):
        Path(tmp).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    return fake


@pytest.mark.parametrize("how", ["text", "torch", "generic"])
def test_a_failed_atomic_write_removes_its_tmp_and_keeps_the_old_file(tmp_path, monkeypatch, how):
    path = tmp_path / "state.json"
    path.write_text("old")
    if how == "text":
        monkeypatch.setattr(Path, "write_text", _failing_after_half(None))
        call = lambda: atomic_write_text(path, "new")
    elif how == "torch":
        def fake_save(obj, f):
            f.write(b"half")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 32")

        monkeypatch.setattr(torch, "save", fake_save)
        call = lambda: atomic_torch_save({"a": 1}, path)
    else:
        call = lambda: atomic_write(path, _failing_after_half(None))
    with pytest.raises(DiskError, match="is full"):
        call()
    assert path.read_text() == "old" and _tmp_files(tmp_path) == []


def test_an_interrupt_removes_the_tmp_too(tmp_path):
    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_removes_the_tmp(tmp_path, monkeypatch):
    real = os.replace

    def fake(a, b):
        if str(b).endswith("x.json"):
            raise OSError(errno.EIO, "Input/output error", str(b))
        return real(a, b)

    monkeypatch.setattr(os, "replace", fake)
    with pytest.raises(DiskError, match="I/O error"):
        atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- pre-flight


def test_a_regular_file_at_the_target_is_refused_with_its_own_message(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    with pytest.raises(UsageError, match="a file is there, not an export folder; --overwrite replaces export folders only"):
        files.check_target(f)
    with pytest.raises(UsageError, match=f"{f} is a file, so no export folder can be made below it"):
        files.check_target(f / "sub" / "out")
    files.check_target(tmp_path / "new" / "out")  # missing folders are fine: the run makes them
    assert f.read_text() == "mine"


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EPERM, "not permitted")])
def test_an_unwritable_location_fails_the_probe(tmp_path, monkeypatch, code, words):
    def fake_open(p, mode="r", *a, **k):
        raise OSError(code, os.strerror(code), str(p))

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    with pytest.raises(DiskError) as e:
        files.probe(tmp_path)
    assert e.value.exit_code == 3 and str(e.value).startswith(f"{tmp_path}: the export cannot be written there")
    assert words in str(e.value) and "choose another export path" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_probe_leaves_nothing(tmp_path):
    files.probe(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_a_read_only_folder_fails_the_probe(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DiskError, match="permission denied"):
            files.probe(ro)
    finally:
        ro.chmod(0o755)


def test_too_little_room_names_the_path_the_bytes_needed_and_free(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 10**9 - 40 * 10**6, 40 * 10**6))
    with pytest.raises(DiskError) as e:
        files.check_room(tmp_path / "out", 150 * 10**6, "the export")
    msg = str(e.value)
    assert e.value.exit_code == 3 and msg.startswith(f"{tmp_path / 'out'}: not enough room: the disk holding {tmp_path}")
    assert "40 MB free (40,000,000 bytes)" in msg and "needs about 169 MB (169,194,304 bytes: the export, with a margin)" in msg
    files.check_room(tmp_path / "out", 10 * 10**6, "the export")  # 10 MB + margin fits in 40 MB


def test_the_export_bound_takes_the_storage_dtype():
    info = {"a": ((4, 8), 4 * 8 * 2), "b": ((16,), 16 * 4)}  # a bf16, b float32
    assert files.export_bound(info, 2) == 64 + 64  # float32 tensors are not bounded by the bf16 size
    assert files.export_bound(info, 4) == 128 + 64
    assert files.activation_bytes(8, 64, 32) == 2 * 8 * 64 * 32 * 4


# ---------------------------------------------------------------- the lock


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from compress.checkpoint.files import export_lock
    with export_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the export lock of ``tmp_path / 'out'``; killed (-9) at the end."""
    procs = []

    def start(target: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path, holder):
    target = tmp_path / "out"
    p = holder(target)
    with pytest.raises(UsageError) as e, files.export_lock(target):
        pass
    assert e.value.exit_code == 2
    assert f"another run is writing this export (pid {p.pid} on " in str(e.value) and "started 20" in str(e.value)
    p.kill()
    p.wait()
    assert files.lock_path(target).exists()  # a killed run leaves its lock file: stale, the OS freed the lock
    with files.export_lock(target):
        info = json.loads(files.lock_path(target).read_text())
        assert info["pid"] == os.getpid()
    assert not files.lock_path(target).exists()


def test_the_lock_is_reentrant_in_one_process_and_released_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), files.export_lock(target):
        with files.export_lock(target):  # the model stage under compress run
            assert files.lock_path(target).exists()
        assert files.lock_path(target).exists()
        raise RuntimeError("boom")
    assert not files.lock_path(target).exists()
    with files.export_lock(target):
        pass


def test_claim_checks_in_order_and_releases_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out"
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 10**9, 0))
    with pytest.raises(DiskError, match="not enough room"), files.claim(target, 100, "the export"):
        pass
    assert list(tmp_path.iterdir()) == []  # no probe, no lock file
    with pytest.raises(DiskError, match="not enough room"), files.claim(tmp_path / "a" / "b" / "out", 100, "the export"):
        pass
    assert list(tmp_path.iterdir()) == []  # nor the folders the lock file needed


# ---------------------------------------------------------------- install


def _export(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(marker)
    return folder


def test_install_replaces_an_old_export_and_leaves_no_old_folder(tmp_path):
    target = _export(tmp_path / "out", "old")
    _export(tmp_path / ".out.old", "stale")  # left by a run killed between its renames
    files.install(_export(tmp_path / ".out.partial", "new"), target)
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_install_puts_the_old_export_back(tmp_path, monkeypatch):
    target = _export(tmp_path / "out", "old")
    work = _export(tmp_path / ".out.partial", "new")
    real = Path.rename

    def fake(self, dst):
        if self == work:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, dst)

    monkeypatch.setattr(Path, "rename", fake)
    with pytest.raises(DiskError, match="I/O error.*--resume"):
        files.install(work, target)
    assert (target / "config.json").read_text() == "old" and (work / "config.json").read_text() == "new"
    assert not (tmp_path / ".out.old").exists()


def test_install_refuses_a_file_before_moving_anything(tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    work = _export(tmp_path / ".out.partial", "new")
    with pytest.raises(UsageError, match="a file is there"):
        files.install(work, f)
    assert f.read_text() == "mine" and work.exists() and not (tmp_path / ".out.old").exists()
