"""The model stage's writes follow the export's rules: distillation's ``write_trained`` (a file at
the target refused, the old checkpoint replaced only once the new one is in place, a full disk in
words with nothing half-written left, the export lock), and a run with a model-scope pass
(pre-flight for two checkpoints, a full disk while marking the sweep done, ``--resume`` after)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import compress.distill.run as run_mod
import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.api import run
from compress.checkpoint import files
from compress.errors import UsageError
from compress.recipe import load_recipe
from compress.utils import DiskError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("trained") / "m", "llama")


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny model with one weight changed (what a training hands to write_trained)."""
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    return model


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


def _old(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("the previous checkpoint")
    return folder


def test_write_trained_refuses_a_file_even_with_overwrite(tiny, trained, tmp_path):
    f = tmp_path / "o"
    f.write_text("mine")
    with pytest.raises(UsageError, match="a file is there, not an export folder"):
        run_mod.write_trained(tiny, trained, f, {"steps": 1}, overwrite=True)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_write_trained_replaces_the_old_checkpoint_once_the_new_one_is_in_place(tiny, trained, tmp_path):
    target = _old(tmp_path / "o")
    run_mod.write_trained(tiny, trained, target, {"steps": 1}, overwrite=True)
    w = load_file(next(target.glob("*.safetensors")))["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w, trained.model.layers[0].mlp.up_proj.weight.detach().to(w.dtype))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no .o.old, no .o.partial, no lock file


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "is full"), (errno.EIO, "I/O error")])
def test_a_failed_write_leaves_the_old_checkpoint_and_nothing_half_written(tiny, trained, tmp_path, monkeypatch, code, words):
    target = _old(tmp_path / "o")

    def failing(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(run_mod, "save_file", failing)
    with pytest.raises(DiskError) as e:
        run_mod.write_trained(tiny, trained, target, {"steps": 1}, overwrite=True)
    assert e.value.exit_code == 3 and words in str(e.value) and "--resume" in str(e.value)
    assert "the training continues from its last saved state" in str(e.value)
    assert (target / "config.json").read_text() == "the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and _leftovers(tmp_path) == []


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from compress.checkpoint.files import export_lock
    with export_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_write_trained_takes_the_export_lock(tiny, trained, tmp_path):
    target = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"another run is writing this export \\(pid {p.pid} "):
            run_mod.write_trained(tiny, trained, target, {"steps": 1})
        assert not target.exists()
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- a run with a model-scope pass


def _recipe(model, out):
    return load_recipe({"model": str(model), "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2},
                        "passes": [{"rtn": {"bits": 4, "group_size": 32}}, {"distill": {"steps": 1, "restore_best": False}}],
                        "eval": {"perplexity": None}, "export": {"path": str(out)}})


def test_the_preflight_counts_two_checkpoints_with_a_model_stage(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10**9, 10**9, 1000))
    with pytest.raises(DiskError, match="2 checkpoints: one per step of the run"):
        run(_recipe(tiny, tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_after_the_sweep_keeps_the_student_for_resume(tiny, tmp_path, monkeypatch):
    target = tmp_path / "o"
    real = run_mod.save_file

    with monkeypatch.context() as m:
        def failing(tensors, path, metadata=None):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        m.setattr(run_mod, "save_file", failing)
        with pytest.raises(DiskError, match="is full"):
            run(_recipe(tiny, target))
    assert not target.exists() and (tmp_path / ".o.student" / "stage.json").exists() and _leftovers(tmp_path) == []
    assert not files.lock_path(target).exists()
    assert run_mod.save_file is real
    run(_recipe(tiny, target), resume=True)
    assert (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    shutil.rmtree(target)
