"""Model-scope distillation of a checkpoint: load the compressed student and the teacher, train,
and write the trained student as a checkpoint of the same format (the tensors that trained
replaced, shard by shard, everything else copied), atomically.

Used by ``compress.run`` (a recipe whose last pass is ``- distill: {}``, on the export of the
compressing passes) and by ``compress distill STUDENT --teacher MODEL -o OUT``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from compress.distill.config import DistillConfig
from compress.distill.loop import holdout_split, split_windows, teacher_topk, train_model
from compress.distill.sources import Responses, Streamed
from compress.distill.stream import TokenStream
from compress.distill.trainable import commit, prepare
from safetensors.torch import load_file, save_file

from compress.arch.families import find_blocks
from compress.checkpoint.files import (
    RETRY,
    check_target,
    disk_writes,
    export_lock,
    install,
    work_folder,
)
from compress.checkpoint.load import load_source
from compress.checkpoint.source import METADATA, ModelSource, read_metadata
from compress.errors import UsageError
from compress.utils import atomic_write, atomic_write_text, peak_rss_mb

# config fields a student must share with its teacher (the architecture and the vocabulary)
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_pair(student: ModelSource, teacher: ModelSource) -> None:
    """The student must be the teacher's architecture with the teacher's vocabulary (a
    structurally pruned student, whose compress.json says so, may be narrower and shallower)."""
    diffs = []
    structured = "structured" in read_metadata(student.path)
    for f in SHAPE_FIELDS[:2] if structured else SHAPE_FIELDS:
        a, b = getattr(student.config, f, None), getattr(teacher.config, f, None)
        if a != b:
            diffs.append(f"{f} {a} vs {b}")
    if not diffs:
        vs, vt = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
        if vs != vt:
            diffs.append(f"tokenizer vocabularies differ ({len(vs)} vs {len(vt)} entries, {len(set(vs.items()) ^ set(vt.items()))} differing)")
    if diffs:
        raise UsageError(
            f"--teacher: the student {student.path} and the teacher {teacher.path} differ ({'; '.join(diffs)}); logit "
            "distillation matches the teacher's distributions token by token, so the student must be a compressed copy of the "
            "teacher's architecture and vocabulary. To learn from any other model, train on its text instead (black-box): "
            "compress distill STUDENT --teacher MODEL --prompts FILE (the teacher answers the prompts first), or "
            "--teacher-data FILE.jsonl (prompt/response records)"
        )


def distill_checkpoint(student_path: Path, teacher_path: Path, windows: torch.Tensor, cfg: DistillConfig, *, seed: int, work: Path,
                       resume: bool = False, hooks=None) -> tuple[torch.nn.Module, dict]:
    """Train the student at ``student_path`` against the teacher on calibration ``windows``
    (N, seq_len). ``work``: the folder for the resumable state and the teacher's top-k cache.
    Returns the trained student (compressed modules committed) and the run's record."""

    log = getattr(hooks, "log", lambda m: None)
    sp, tp = ModelSource(student_path), ModelSource(teacher_path)
    check_pair(sp, tp)
    if cfg.data:  # a corpus read as training goes; its first windows held out
        stream = TokenStream(cfg.data, sp.tokenizer, int(windows.shape[1]), text_field="text", heldout=cfg.heldout_windows)
        train, held = Streamed(stream, cfg.batch_size, seed), stream.held()
    else:
        train, held = split_windows(windows, cfg.holdout)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    student, prep, structured = load_student(sp, cfg)
    teacher = load_source(tp)
    for p in teacher.parameters():
        p.requires_grad_(False)
    topk = held_topk = None
    if cfg.teacher == "topk":  # the teacher's top-k of every window, once (kept on disk for --resume), then the teacher goes
        cache = work / "teacher_topk.pt"
        key = {"k": cfg.top_k, "T": cfg.temperature, "windows": list(windows.shape), "sum": int(windows.sum())}
        saved = torch.load(cache, weights_only=False) if cache.exists() else None
        if saved is not None and saved["key"] == key:
            topk, held_topk = saved["topk"], saved["held_topk"]
        else:
            log(f"teacher top-{cfg.top_k} on {len(train) + len(held)} windows")
            topk = teacher_topk(teacher, train, cfg.top_k, cfg.temperature, cfg.batch_size,
                                lambda d, n: _progress(hooks, "teacher top-k", d, n, ""))
            held_topk = teacher_topk(teacher, held, cfg.top_k, cfg.temperature, cfg.batch_size)
            torch.save({"key": key, "topk": topk, "held_topk": held_topk}, cache)
        del teacher
        teacher = None
    n_train = len(train) if isinstance(train, torch.Tensor) else "streamed"
    log(f"distilling {student_path} ({prep.numel():,} trainable values: {_counts(prep.counts)}) on {n_train} windows, "
        f"{len(held)} held out")
    hidden_map = _hidden_map(structured) if structured else None
    rec = train_model(student, teacher, train, held, cfg, prep, seed=seed, topk=topk, held_topk=held_topk, hidden_map=hidden_map,
                      state_path=work / "distill_state.pt",
                      resume=resume, progress=lambda d, n, info: _progress(hooks, "distill", d, n, info), log=log)
    commit(student)
    rec.update({"trainable_values": prep.numel(), "trained": prep.counts, "train": cfg.train, "loss": cfg.loss,
                "teacher": cfg.teacher, "windows": {"train": n_train, "heldout": len(held), "seq_len": int(windows.shape[1])},
                **({"on_policy": cfg.on_policy} if cfg.on_policy else {}), **({"data": cfg.data} if cfg.data else {}),
                "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb()})
    return student, rec


def load_student(sp: ModelSource, cfg: DistillConfig):
    """The student model, what of it trains (``prepare``), and its compress.json ``structured``
    section (a structurally pruned student is an ordinary dense model: its blocks' weights train)."""
    student = load_source(sp)
    blocks_path, _ = find_blocks(student, sp.config.model_type, getattr(sp.config, "num_hidden_layers", None))
    meta = read_metadata(sp.path)
    pruned = set(meta.get("sparsity", {}).get("targets", []))
    structured = meta.get("structured")
    prep = prepare(student, "weights" if structured and cfg.train == "auto" else cfg.train, pruned, blocks_path)
    return student, prep, structured


def distill_responses(student_path: Path, examples, cfg: DistillConfig, *, seed: int, work: Path, resume: bool = False,
                      hooks=None) -> tuple[torch.nn.Module, dict]:
    """Black-box distillation: train the student at ``student_path`` on a teacher's responses
    (``compress.distill.blackbox.Examples``, its own tokenizer's tokens), the loss the
    responses' cross-entropy (prompts and template not counted), early-stopping on a held-out
    share of the examples. Returns the trained student and the run's record."""
    log = getattr(hooks, "log", lambda m: None)
    train_ex, held_ex = split_examples(examples, cfg.holdout)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    student, prep, _ = load_student(ModelSource(student_path), cfg)
    log(f"distilling {student_path} on a teacher's responses ({prep.numel():,} trainable values: {_counts(prep.counts)}): "
        f"{len(train_ex.ids)} examples, {len(held_ex.ids)} held out")
    rec = train_model(student, None, Responses(train_ex, cfg.batch_size, seed), Responses(held_ex, cfg.batch_size), cfg, prep,
                      seed=seed, state_path=work / "distill_state.pt", resume=resume,
                      progress=lambda d, n, info: _progress(hooks, "distill", d, n, info), log=log)
    commit(student)
    rec.update({"trainable_values": prep.numel(), "trained": prep.counts, "train": cfg.train, "loss": "response_cross_entropy",
                "teacher": "black-box",
                "examples": {"train": len(train_ex.ids), "heldout": len(held_ex.ids), "truncated": examples.truncated,
                             "dropped": examples.dropped, "response_tokens": int(examples.mask.sum())},
                "total_s": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb()})
    return student, rec


def split_examples(ex, holdout: float):
    """(training examples, held-out examples), ``holdout`` of them evenly spread held out."""
    keep, held = holdout_split(len(ex.ids), holdout, "distill.holdout", "example(s)", "give more records (at least 2)")
    return subset(ex, keep), subset(ex, held)


def subset(ex, idx):
    """``Examples`` restricted to ``idx`` (a mask or indices)."""
    return replace(ex, ids=ex.ids[idx], mask=ex.mask[idx], lengths=ex.lengths[idx])


def _hidden_map(structured: dict) -> tuple[list[int], torch.Tensor | None]:
    """The teacher's blocks and hidden dimensions a structurally pruned student kept (compress.json)."""
    dims = structured.get("hidden_kept")
    return structured["layers_kept"], torch.tensor(dims) if dims is not None else None


def distill_perplexities(ev: dict, before: dict) -> dict:
    """Perplexity of the original (the baseline), of the compressed student before training and
    after it, and the share of the loss the training won back."""
    out = {"compressed": before["model"]["perplexity"], "distilled": ev["model"]["perplexity"]}
    if "baseline" in ev:
        out["original"] = ev["baseline"]["perplexity"]
        lost = out["compressed"] - out["original"]
        out["recovered"] = round((out["compressed"] - out["distilled"]) / lost, 4) if lost > 0 else None
    return out


def _counts(c: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in c.items() if v) or "nothing"


def _progress(hooks, task, done, total, info):
    if hooks is None:
        return
    try:
        hooks.progress(task, done, total, info=info)
    except TypeError:  # a Hooks implementation without the info argument
        hooks.progress(task, done, total)


def write_trained(src: Path, model: torch.nn.Module, target: Path, record: dict, *, overwrite: bool = False) -> Path:
    """``src`` with every tensor that ``model`` holds under the same name replaced by the model's
    value (cast to the stored dtype), the distillation ``record`` added to compress.json;
    written into ``.<target>.partial`` and renamed to ``target`` once complete (an earlier
    checkpoint there is deleted only once the new one is in place), under the export path's lock.
    A full or failing disk raises DiskError (exit 3) and leaves nothing half-written: the work
    folder goes (it is rebuilt from ``src`` in seconds), the training's own state stays."""
    src, target = Path(src), Path(target)
    check_target(target, overwrite)  # a file there is refused even with --overwrite (exit 2)
    work = work_folder(target)
    with export_lock(target):
        try:
            with disk_writes(f"{RETRY} (the training continues from its last saved state)", path=work):
                _write_student(src, model, work, record)
            return install(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _write_student(src: Path, model: torch.nn.Module, work: Path, record: dict) -> None:
    """The trained student into the work folder, every file written atomically."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    trained = model.state_dict()
    shards = sorted({p.name for p in ModelSource(src).weight_map.values()})
    for f in src.iterdir():
        if f.is_file() and f.name not in shards and not f.name.startswith(("distill_state", "teacher_topk", "stage.json")):
            atomic_write(work / f.name, lambda tmp, f=f: shutil.copy2(f, tmp))
    changed = 0
    for name in shards:
        tensors = load_file(src / name)
        for k, t in tensors.items():
            if k in trained:
                new = trained[k].detach().to(t.dtype).contiguous()
                if new.shape != t.shape:
                    raise UsageError(f"{src / name}: {k} has shape {tuple(t.shape)} in the checkpoint but {tuple(new.shape)} in the model")
                if not torch.equal(new, t):
                    changed += 1
                tensors[k] = new
        atomic_write(work / name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    meta = read_metadata(src) or {"format": "compress.checkpoint/1"}
    meta["distill"] = {k: v for k, v in record.items() if k != "curve"} | {"tensors_changed": changed}
    atomic_write_text(work / METADATA, json.dumps(meta, indent=2))
