"""``compress distill``: train an existing compressed checkpoint against its original (model
scope), write the trained student in its own format, evaluate it against the teacher and the
student as it was."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from compress.api.common import REPORT_SCHEMA, Hooks, check_gates, write_reports
from compress.api.evaluation import check_eval_config, evaluate
from compress.api.inspection import inspect_checkpoint
from compress.checkpoint.files import check_target, claim, folder_bytes
from compress.checkpoint.source import ModelSource, resolve_model
from compress.generation import calibration_of
from compress.distill.config import DistillConfig
from compress.distill.loop import split_windows
from compress.distill.blackbox import BlackBox
from compress.distill.run import (
    check_pair,
    distill_checkpoint,
    distill_perplexities,
    distill_responses,
    write_trained,
)
from compress.errors import UsageError
from compress.recipe import CalibrationConfig, EvalConfig
from compress.utils import peak_rss_mb, size_words


def distill(student_ref, teacher_ref, output, cfg=None, *, calibration=None, eval_cfg=None, seed: int = 0, overwrite: bool = False,
            resume: bool = False, hooks: Hooks | None = None, blackbox: BlackBox | None = None) -> dict:
    """Distill an existing checkpoint (``compress distill``): train ``student_ref`` (a compressed
    copy of the teacher) against ``teacher_ref`` on ``calibration`` windows, write the trained
    student to ``output`` in the student's own format, and evaluate it against the teacher and the
    student as it was. With ``blackbox`` the student learns from the teacher's text instead (its
    responses to prompts, or records of them): any architecture and vocabulary, ``teacher_ref``
    only needed to answer prompts. Returns the report (kind ``distill``; saved in ``output``)."""

    hooks = hooks or Hooks()
    cfg = cfg or DistillConfig()
    cal = calibration or CalibrationConfig()
    eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
    t0 = time.time()
    torch.manual_seed(seed)
    _check_options(cfg, cal, blackbox)
    target = Path(output)
    check_target(target, overwrite)
    student = ModelSource(resolve_model(student_ref, log=hooks.log))
    teacher = ModelSource(resolve_model(teacher_ref, log=hooks.log)) if teacher_ref is not None else None
    for m in (student, teacher):
        if m is not None:
            m.verify()
    same = teacher is not None and _same_vocabulary(student, teacher)
    check_eval_config(eval_cfg, blackbox is None or same)  # gates against the teacher need its perplexity
    if blackbox is None:
        check_pair(student, teacher)
    lens = {"calibration.seq_len": cal.seq_len}
    if eval_cfg.perplexity is not None:
        lens["eval.perplexity.seq_len"] = eval_cfg.perplexity.seq_len
    student.check_seq_len(lens)  # windows longer than the model's positions: exit 2
    if blackbox is None:
        windows = calibration_of(cal, teacher, seed, hooks=hooks)
        split_windows(windows, cfg.holdout)
    else:
        examples = blackbox.examples(student, teacher, cal.seq_len, seed, hooks)  # bad records: exit 2 before any training
    # the trained student is written in the student's own format: about its size on disk; the
    # location is checked and locked now (exit 2/3), not after the training
    need = folder_bytes(student.path)
    with claim(target, need, f"the trained student, about {size_words(need)}"):
        work = target.parent / f".{target.name}.distill"
        if not resume and work.exists():
            shutil.rmtree(work)
        if blackbox is None:
            model, rec = distill_checkpoint(student.path, teacher.path, windows, cfg, seed=seed, work=work, resume=resume, hooks=hooks)
        else:
            model, rec = distill_responses(student.path, examples, cfg, seed=seed, work=work, resume=resume, hooks=hooks)
            rec["source"] = blackbox.describe()
        settings = {"student": str(student_ref), "teacher": str(teacher_ref), "calibration": cal.model_dump(mode="json"),
                    "distill": cfg.model_dump(mode="json"), "seed": seed} | ({"blackbox": blackbox.describe()} if blackbox else {})
        report = {"schema": REPORT_SCHEMA, "kind": "distill", "distill": {"scope": "model", **rec}, "settings": settings}
        out = write_trained(student.path, model, target, report["distill"], overwrite=overwrite)
        del model
        baseline = teacher.path if same else None  # perplexities over other tokens do not compare
        report["checkpoints"] = {"model": inspect_checkpoint(out)} | ({"baseline": inspect_checkpoint(baseline)} if baseline else {})
        if eval_cfg.perplexity is not None or eval_cfg.tasks:
            report["eval"] = evaluate(out, baseline, eval_cfg, seed=seed, hooks=hooks)
            if eval_cfg.perplexity is not None:
                before = evaluate(student.path, None, eval_cfg.perplexity, seed=seed, hooks=hooks)
                report["distill"]["perplexity"] = distill_perplexities(report["eval"], before)
        report["time"] = {"distill_s": rec["total_s"], "total_s": round(time.time() - t0, 1)}
        report["peak_rss_mb"] = peak_rss_mb()
        write_reports(report, out)
        shutil.rmtree(work, ignore_errors=True)
        check_gates(report)
        return report


def _check_options(cfg: DistillConfig, cal: CalibrationConfig, blackbox) -> None:
    if cfg.scope != "model":
        raise UsageError("--scope block trains each block inside the layer-wise sweep, so it runs in a recipe after the compressing "
                         "passes (`- distill: {scope: block}`); `compress distill` trains a finished checkpoint (scope model)")
    if blackbox is None and cal.samples < 2:
        raise UsageError("--samples: distillation trains on calibration windows and holds some out; use at least 2")
    if blackbox is not None:
        bad = [f for f, on in (("on_policy", cfg.on_policy > 0), ("teacher: topk", cfg.teacher != "online"),
                               ("hidden_weight", cfg.hidden_weight > 0), ("lm_weight", cfg.lm_weight > 0), ("data", bool(cfg.data))) if on]
        if bad:
            raise UsageError(f"distill.{bad[0]}: black-box distillation learns from the teacher's text alone (the responses' "
                             "cross-entropy); it has no teacher logits, hidden states or corpus to mix in. Drop it, or distill "
                             "on logits with --teacher MODEL alone")


def _same_vocabulary(a: ModelSource, b: ModelSource) -> bool:
    return a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
