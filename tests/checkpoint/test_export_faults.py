"""Fault injection on a whole run of a tiny model: every write of the export (block shard, resume
state, progress record, the files of finalize, the final rename, the reports) fails in turn with a
full disk (ENOSPC) or an I/O error (EIO). Each leaves the previous export or nothing at the final
path, no temporary file anywhere, the lock released, a message in words (exit 3), and, for a full
disk, a state that ``--resume`` finishes into the same export as an uninterrupted run. Then the
pre-flight checks, the lock against a second process, and a NaN source that leaves nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import gptq_w4_recipe, save_tiny
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import compress.api.job as job_mod
import compress.checkpoint.export as export_mod
from compress.api import run
from compress.checkpoint import files
from compress.cli import app
from compress.recipe import load_recipe
from compress.utils import DiskError

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("faults") / "m", "llama")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The export of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run(gptq_w4_recipe(tiny, out))
    return out


def _content(folder: Path) -> dict:
    """What must be identical between two exports of the same recipe (not the timings)."""
    out = {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}
    for name in ("config.json", "compress.json", "model.safetensors.index.json"):
        out[name] = (folder / name).read_text() if (folder / name).exists() else None
    return out


def _same(a: Path, b: Path) -> bool:
    ca, cb = _content(a), _content(b)
    if ca.keys() != cb.keys():
        return False
    for k in ca:
        if isinstance(ca[k], dict):
            if ca[k].keys() != cb[k].keys() or not all(torch.equal(ca[k][n], cb[k][n]) for n in ca[k]):
                return False
        elif ca[k] != cb[k]:
            return False
    return True


def _leftovers(folder: Path) -> list[str]:
    """Temporary files (ours: NAME.tmp; safetensors': .tmpXXXX) and probe files anywhere below."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp", ".compress-probe")))


class Fault:
    """The ``nth`` write whose file name starts with ``name`` fails with ``code`` (after writing
    half a file, as a full disk does), through the function the code calls for that file."""

    def __init__(self, monkeypatch, name: str, code: int, nth: int = 1):
        self.name, self.code, self.nth, self.seen = name, code, nth, 0
        real_save, real_torch, real_text, real_rename, real_replace = (export_mod.save_file, torch.save, Path.write_text,
                                                                      Path.rename, os.replace)
        fault = self

        def save_file_(tensors, path, metadata=None):
            fault.hit(path)
            return real_save(tensors, path, metadata=metadata)

        def torch_save(obj, f, *a, **k):
            if fault.hit(getattr(f, "name", f), raise_now=False):
                f.write(b"half")
                try:
                    raise OSError(code, os.strerror(code))
                except OSError:  # what torch's zip writer makes of it
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return real_torch(obj, f, *a, **k)

        def write_text(self_, text, *a, **k):
            fault.hit(self_)
            return real_text(self_, text, *a, **k)

        def rename(self_, dst):
            fault.hit(Path(dst), half=False)
            return real_rename(self_, dst)

        def replace(a, b):
            fault.hit(Path(b), half=False, kind="replace")
            return real_replace(a, b)

        monkeypatch.setattr(export_mod, "save_file", save_file_)
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(Path, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        self.kind = None

    def hit(self, path, *, raise_now=True, half=True, kind="write") -> bool:
        name = Path(path).name
        wanted = self.name.removeprefix("replace:") if self.name.startswith("replace:") else self.name
        if (kind == "replace") != self.name.startswith("replace:") or not name.startswith(wanted):
            return False
        self.seen += 1
        if self.seen != self.nth:
            return False
        if not raise_now:
            return True
        if half:
            Path(path).write_bytes(b"half a file")
        raise OSError(self.code, os.strerror(self.code), str(path))


# (what fails, the file name it writes, which occurrence): every write step of the export in turn
STEPS = [
    ("the first block's file", "block-00001.safetensors", 1),
    ("the second block's file", "block-00002.safetensors", 1),
    ("the resume state (activations)", "inputs-00002.pt", 1),
    ("the progress record", "progress.json", 1),
    ("the progress record's rename", "replace:progress.json", 2),
    ("the shard (blocks and what is outside them)", "replace:shard-00001.safetensors", 1),
    ("the shard's final name", "replace:model.safetensors", 1),
    ("the config", "config.json", 1),
    ("compress.json", "compress.json", 1),
    ("the report in the work folder", "report.json", 1),
    ("the final rename", "out", 1),
]


def _check_after(tmp, target, e, code, step=""):
    msg = str(e.value)
    assert e.value.exit_code == 3
    assert ("is full" if code == errno.ENOSPC else "I/O error") in msg and str(tmp) in msg, msg
    assert "--resume" in msg, msg
    if code == errno.ENOSPC and step != "the final rename":  # install does not know the estimate (a rename needs no room)
        assert " free, about " in msg and " needed" in msg, msg
    assert _leftovers(tmp) == []
    assert not files.lock_path(target).exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("step, name, nth", STEPS, ids=[s[0] for s in STEPS])
def test_a_failed_write_leaves_nothing_at_the_final_path_and_resumes(tiny, reference, tmp_path, monkeypatch, step, name, nth, code):
    target = tmp_path / "out"
    with monkeypatch.context() as m:
        fault = Fault(m, name if name != "out" else "out", code, nth)
        with pytest.raises(DiskError) as e:
            run(gptq_w4_recipe(tiny, target))
        assert fault.seen == nth, f"{step}: the write was never made"
    _check_after(tmp_path, target, e, code, step)
    assert not target.exists()
    assert (tmp_path / ".out.partial").is_dir()  # kept for --resume
    if code != errno.ENOSPC:
        return
    run(gptq_w4_recipe(tiny, target), resume=True)  # the lock was released: a second run starts, and finishes the export
    assert _same(target, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("step, name, nth", [STEPS[0], STEPS[4], STEPS[-1]], ids=[STEPS[0][0], STEPS[4][0], STEPS[-1][0]])
def test_with_overwrite_the_previous_export_stays_whole(tiny, reference, tmp_path, monkeypatch, step, name, nth):
    target = tmp_path / "out"
    shutil.copytree(reference, target)
    (target / "mine.txt").write_text("the previous export")
    with monkeypatch.context() as m:
        Fault(m, name, errno.ENOSPC, nth)
        with pytest.raises(DiskError) as e:
            run(gptq_w4_recipe(tiny, target, overwrite=True))
    _check_after(tmp_path, target, e, errno.ENOSPC, step)
    assert (target / "mine.txt").read_text() == "the previous export" and _same(target, reference)
    assert not (tmp_path / ".out.old").exists()
    run(gptq_w4_recipe(tiny, target, overwrite=True), resume=True)
    assert _same(target, reference) and not (target / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_report_after_the_export_is_in_place_says_so(tiny, reference, tmp_path, monkeypatch):
    target = tmp_path / "out"
    with monkeypatch.context() as m:
        Fault(m, "report.md", errno.ENOSPC)
        with pytest.raises(DiskError) as e:
            run(gptq_w4_recipe(tiny, target))
    assert e.value.exit_code == 3 and str(e.value).startswith(f"{target / 'report.md'}: the disk holding {target} is full")
    assert _same(target, reference) and not (target / "report.md").exists()  # the export is whole; the report is not half
    assert _leftovers(tmp_path) == [] and not files.lock_path(target).exists()


def test_cli_exit_3_for_a_full_disk_and_resume_after(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "o"
    args = ["quantize", str(tiny), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "16", "--samples", "4",
            "--seq-len", "32", "--set", "calibration.batch_size=2", "--no-eval"]
    with monkeypatch.context() as m:
        Fault(m, "block-00002.safetensors", errno.ENOSPC)
        r = runner.invoke(app, args)
    assert r.exit_code == 3, r.output
    assert "is full" in r.output and "1 finished block is kept in" in r.output and "--resume once the disk has room" in r.output
    assert "internal error" not in r.output
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming after block 0" in r.output


def test_ctrl_c_releases_the_lock_and_keeps_the_blocks(tiny, reference, tmp_path, monkeypatch):
    target = tmp_path / "out"
    real = export_mod.Exporter.write_block

    def interrupted(self, res, inputs):
        real(self, res, inputs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export_mod.Exporter, "write_block", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(gptq_w4_recipe(tiny, target))
    assert not files.lock_path(target).exists() and _leftovers(tmp_path) == []
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["done"] == 1
    run(gptq_w4_recipe(tiny, target), resume=True)
    assert _same(target, reference)


def test_a_data_free_run_resumes_too(tiny, tmp_path, monkeypatch):
    """rtn needs no calibration: the resume state holds no activations."""
    target = tmp_path / "out"
    recipe = load_recipe({"model": str(tiny), "passes": [{"rtn": {"bits": 4, "group_size": 16}}], "eval": {"perplexity": None},
                          "export": {"path": str(target)}})
    with monkeypatch.context() as m:
        Fault(m, "block-00002.safetensors", errno.ENOSPC)
        with pytest.raises(DiskError, match="1 finished block is kept"):
            run(recipe)
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["inputs"] is None
    run(recipe, resume=True)
    assert (target / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_real_full_disk(tiny, reference, tmp_path, monkeypatch):
    """A 24 MB tmpfs, filled up after the first block: the real errors of torch and safetensors."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, check=False).returncode != 0:
        pytest.skip("mount refused (no CAP_SYS_ADMIN here)")
    try:
        target, filler = disk / "out", disk / "filler"
        real = export_mod.Exporter.write_block

        def fill_then_write(self, res, inputs):
            if res.index == 1:
                with open(filler, "wb") as f:  # every free byte
                    f.write(b"\0" * shutil.disk_usage(disk).free)
            real(self, res, inputs)

        with monkeypatch.context() as m:
            m.setattr(export_mod.Exporter, "write_block", fill_then_write)
            with pytest.raises(DiskError) as e:
                run(gptq_w4_recipe(tiny, target))
        msg = str(e.value)
        assert f"the disk holding {disk / '.out.partial'} is full: 0 bytes free" in msg and "--resume" in msg, msg
        assert not target.exists() and _leftovers(disk) == [] and not files.lock_path(target).exists()
        filler.unlink()
        run(gptq_w4_recipe(tiny, target), resume=True)
        assert _same(target, reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


# ---------------------------------------------------------------- pre-flight, before any model work


@pytest.fixture
def no_model_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(job_mod, "compress_blocks", refuse)


def test_a_regular_file_at_the_export_path_is_exit_2_even_with_overwrite(tiny, tmp_path, no_model_work):
    f = tmp_path / "o13file"
    f.write_text("the user's file")
    for extra in ([], ["--overwrite"]):
        r = runner.invoke(app, ["quantize", str(tiny), "-o", str(f), "--method", "rtn", "--no-eval", *extra])
        assert r.exit_code == 2, r.output
        assert "a file is there, not an export folder" in r.output and "--overwrite replaces export folders only" in r.output
    assert f.read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o13file"]


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EPERM, "not permitted")])
def test_an_unwritable_location_is_exit_3_up_front(tiny, tmp_path, monkeypatch, no_model_work, code, words):
    def fake_open(p, mode="r", *a, **k):
        raise OSError(code, os.strerror(code), str(p))

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "o"), "--method", "rtn", "--no-eval"])
    assert r.exit_code == 3, r.output
    assert f"{tmp_path}: the export cannot be written there" in r.output and words in r.output
    assert list(tmp_path.iterdir()) == []


def test_too_little_room_is_exit_3_up_front_naming_the_bytes(tiny, tmp_path, monkeypatch, no_model_work):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 10**9 - 10**6, 10**6))
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "o"), "--method", "gptq", "--samples", "4", "--seq-len", "32",
                            "--no-eval"])
    assert r.exit_code == 3, r.output
    assert "not enough room" in r.output and "1,000,000 bytes" in r.output and "the export, at most" in r.output
    assert "the resume state" in r.output
    assert list(tmp_path.iterdir()) == []


def test_resume_asks_only_for_the_room_still_needed(tiny, tmp_path, monkeypatch):
    target = tmp_path / "out"
    with monkeypatch.context() as m:
        Fault(m, "block-00002.safetensors", errno.ENOSPC)
        with pytest.raises(DiskError):
            run(gptq_w4_recipe(tiny, target))
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 10**9, 0))
    with pytest.raises(DiskError, match="already written"):
        run(gptq_w4_recipe(tiny, target), resume=True)


# ---------------------------------------------------------------- one run per export path


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from compress.checkpoint.files import export_lock
    with export_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_run_to_the_same_path_exits_2_at_once_naming_the_first(tiny, tmp_path, reference, no_model_work):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "locked"
        t0 = time.time()
        r = runner.invoke(app, ["quantize", str(tiny), "-o", str(out), "--method", "rtn", "--no-eval", "--overwrite"])
        assert r.exit_code == 2, r.output
        assert f"another run is writing this export (pid {p.pid} on" in r.output and "started" in r.output
        assert time.time() - t0 < 30
        assert not out.exists() and not (tmp_path / ".o.partial").exists()
    finally:
        p.kill()
        p.wait()


def test_a_killed_runs_lock_is_taken_over(tiny, tmp_path, reference):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    p.kill()
    p.wait()
    assert files.lock_path(out).exists()
    run(gptq_w4_recipe(tiny, out))
    assert _same(out, reference) and sorted(x.name for x in tmp_path.iterdir()) == ["o"]


# ---------------------------------------------------------------- sources that cannot be resumed


def test_a_nan_source_leaves_nothing_beside_the_export_path(tmp_path, monkeypatch):
    model = save_tiny(tmp_path / "src" / "m", "llama")
    (f,) = model.glob("*.safetensors")
    t = load_file(f)
    t["model.layers.1.mlp.up_proj.weight"].view(-1)[:3] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "exports" / "o"
    written, real = [], export_mod.Exporter.write_block
    monkeypatch.setattr(export_mod.Exporter, "write_block", lambda self, res, inputs: (written.append(res.index), real(self, res, inputs)))
    r = runner.invoke(app, ["quantize", str(model), "-o", str(out), "--method", "gptq", "--samples", "4", "--seq-len", "32", "--no-eval"])
    assert written == [0]
    assert r.exit_code == 3, r.output
    assert "3 NaN or infinite" in r.output
    # no .o.partial (block 0 was written before block 1's NaN was read), no lock file, not even the folder made for them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
