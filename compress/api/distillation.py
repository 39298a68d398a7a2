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
from compress.data import calibration_set
from compress.distill.config import DistillConfig
from compress.distill.loop import split_windows
from compress.distill.run import (
    check_pair,
    distill_checkpoint,
    distill_perplexities,
    write_trained,
)
from compress.errors import UsageError
from compress.recipe import CalibrationConfig, EvalConfig
from compress.utils import peak_rss_mb, size_words


def distill(student_ref, teacher_ref, output, cfg=None, *, calibration=None, eval_cfg=None, seed: int = 0, overwrite: bool = False,
            resume: bool = False, hooks: Hooks | None = None) -> dict:
    """Distill an existing checkpoint (``compress distill``): train ``student_ref`` (a compressed
    copy of the teacher) against ``teacher_ref`` on ``calibration`` windows, write the trained
    student to ``output`` in the student's own format, and evaluate it against the teacher and the
    student as it was. Returns the report (kind ``distill``; saved in ``output``)."""

    hooks = hooks or Hooks()
    cfg = cfg or DistillConfig()
    cal = calibration or CalibrationConfig()
    eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
    t0 = time.time()
    torch.manual_seed(seed)
    if cfg.scope != "model":
        raise UsageError("--scope block trains each block inside the layer-wise sweep, so it runs in a recipe after the compressing "
                         "passes (`- distill: {scope: block}`); `compress distill` trains a finished checkpoint (scope model)")
    if cal.samples < 2:
        raise UsageError("--samples: distillation trains on calibration windows and holds some out; use at least 2")
    target = Path(output)
    check_target(target, overwrite)
    check_eval_config(eval_cfg, True)
    student = ModelSource(resolve_model(student_ref, log=hooks.log))
    teacher = ModelSource(resolve_model(teacher_ref, log=hooks.log))
    student.verify()
    teacher.verify()
    check_pair(student, teacher)
    lens = {"calibration.seq_len": cal.seq_len}
    if eval_cfg.perplexity is not None:
        lens["eval.perplexity.seq_len"] = eval_cfg.perplexity.seq_len
    teacher.check_seq_len(lens)  # windows longer than the model's positions: exit 2
    windows = calibration_set(cal, teacher.tokenizer, seed)
    split_windows(windows, cfg.holdout)
    # the trained student is written in the student's own format: about its size on disk; the
    # location is checked and locked now (exit 2/3), not after the training
    need = folder_bytes(student.path)
    with claim(target, need, f"the trained student, about {size_words(need)}"):
        work = target.parent / f".{target.name}.distill"
        if not resume and work.exists():
            shutil.rmtree(work)
        model, rec = distill_checkpoint(student.path, teacher.path, windows, cfg, seed=seed, work=work, resume=resume, hooks=hooks)
        report = {"schema": REPORT_SCHEMA, "kind": "distill", "distill": {"scope": "model", **rec},
                  "settings": {"student": str(student_ref), "teacher": str(teacher_ref), "calibration": cal.model_dump(mode="json"),
                               "distill": cfg.model_dump(mode="json"), "seed": seed}}
        out = write_trained(student.path, model, target, report["distill"], overwrite=overwrite)
        del model
        report["checkpoints"] = {"model": inspect_checkpoint(out), "baseline": inspect_checkpoint(teacher.path)}
        if eval_cfg.perplexity is not None or eval_cfg.tasks:
            report["eval"] = evaluate(out, teacher.path, eval_cfg, seed=seed, hooks=hooks)
            if eval_cfg.perplexity is not None:
                before = evaluate(student.path, None, eval_cfg.perplexity, seed=seed, hooks=hooks)
                report["distill"]["perplexity"] = distill_perplexities(report["eval"], before)
        report["time"] = {"distill_s": rec["total_s"], "total_s": round(time.time() - t0, 1)}
        report["peak_rss_mb"] = peak_rss_mb()
        write_reports(report, out)
        shutil.rmtree(work, ignore_errors=True)
        check_gates(report)
        return report
