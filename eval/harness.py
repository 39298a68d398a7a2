"""The lm-eval bridge: run lm-evaluation-harness tasks on a model already in memory.

The model (ours: ``QuantLinear`` modules for compressed checkpoints) goes to lm-eval's own HF
wrapper (``HFLM(pretrained=model, tokenizer=...)``) with the batch size on the wrapper; tasks are
found by lm-eval's ``TaskManager`` with ``include_path`` = the shipped ``eval/tasks/`` plus the
folders of the user's task files, and run with ``simple_evaluate`` with every seed fixed.

Task references: a task or group name lm-eval knows (its own, or a shipped one: ``pydoc_ppl``,
``pydoc_lastword``), a task YAML file (its ``task:``), or a folder of them (every task in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from compress.eval.taskdata import data_hash

from compress.errors import InputError, UsageError
from compress.hub import hub_reachable, offline_unless_reachable  # noqa: F401 (hub_reachable: the tests ask it too)

TASKS_DIR = Path(__file__).parent / "tasks"
SHIPPED = ("pydoc_ppl", "pydoc_lastword")


@dataclass(frozen=True)
class TaskRef:
    name: str  # the task (or group) name lm-eval knows it by
    folder: Path | None  # an include_path it needs, None for lm-eval's own tasks
    source: str  # a file path, or "lm-eval" / "shipped": what the cache key hashes
    digest: str  # hash of what defines the task (YAML text, data), for the cache key


class _Yaml(yaml.SafeLoader):
    """Reads task YAMLs for their names only: lm-eval's tags (``!function``) load as plain text."""


_Yaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def _names_in(path: Path) -> list[str]:
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Yaml) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: not a readable task YAML ({e}); see eval/tasks/*.yaml for the shape") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: a task YAML is a mapping with a `task:` name")
    name = cfg.get("task") or cfg.get("group")
    if isinstance(name, list):  # `task: [a, b]` in a group file
        name = cfg.get("group")
    return [str(name)] if name else []


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def resolve_tasks(refs: list[str]) -> list[TaskRef]:
    """Task names, YAML files and folders -> what to run (files and folders must exist)."""

    out: list[TaskRef] = []
    for ref in refs:
        p = Path(ref).expanduser()
        if p.suffix in (".yaml", ".yml") or p.exists() or os.sep in ref:
            if not p.exists():
                raise InputError(f"{p}: no such task file or folder (--task-file takes an lm-eval task YAML or a folder of them)")
            files = sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
            files = [f for f in files if f.suffix in (".yaml", ".yml")]
            if not files:
                raise InputError(f"{p}: the folder holds no task YAML (*.yaml)")
            for f in files:
                code = b"".join(x.read_bytes() for x in sorted(f.parent.glob("*.py")))
                for name in _names_in(f):
                    out.append(TaskRef(name, f.parent.resolve(), str(f.resolve()), _digest(f.read_bytes(), code)))
            if not any(r.source.startswith(str(p.resolve())) for r in out):
                raise UsageError(f"{p}: no YAML there names a `task:`; see eval/tasks/*.yaml for the shape")
        elif ref in SHIPPED:
            y = TASKS_DIR / f"{ref}.yaml"
            out.append(TaskRef(ref, TASKS_DIR, "shipped", _digest(y.read_bytes(), (TASKS_DIR / "pydoc_tasks.py").read_bytes(), data_hash(ref).encode())))
        else:
            out.append(TaskRef(ref, None, "lm-eval", _digest(ref.encode())))
    return out


def _metric_name(key: str) -> str | None:
    """lm-eval's ``acc,none`` -> ``acc``; ``exact_match,flexible`` -> ``exact_match@flexible``;
    stderr entries -> None (kept beside their metric)."""
    metric, _, filt = key.partition(",")
    if metric in ("alias", "sample_len") or metric.endswith("_stderr"):
        return None
    return metric if filt in ("", "none") else f"{metric}@{filt}"


def _unreachable(task: str, e: BaseException) -> InputError:
    return InputError(
        f"task {task!r}: its data could not be reached ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
        "The model hub is not reachable from here (or the dataset is not in the local cache), so lm-eval cannot download it. "
        "Use a local copy: write a task YAML whose dataset is a local file (dataset_path: json, "
        "dataset_kwargs: {data_files: {test: /path/data.jsonl}}) and pass it with --task-file, or use the offline "
        "tasks shipped with compress (pydoc_ppl, pydoc_lastword)"
    )


def run_tasks(model, tokenizer, tasks: list[TaskRef], *, num_fewshot=None, limit=None, batch_size=1, max_length=None, seed=0, quiet=False) -> dict:
    """Evaluate ``tasks`` on an in-memory HF model -> {task: {"metrics": {m: v}, "stderr": {m: v},
    "higher_is_better": {m: bool}, "samples": n, "version": v}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)
    include = sorted({str(t.folder) for t in tasks if t.folder is not None})
    # lm-eval draws its own tqdm bars on stderr; --quiet means none
    mute = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with offline_unless_reachable(), mute:
        # indexing lm-eval's own ~15,000 task YAMLs takes half a minute on a small machine: only
        # when a task is not one of ours (shipped or a task file)
        tm = TaskManager(include_path=include or None, include_defaults=any(t.folder is None for t in tasks))
        known = set(tm.all_tasks)
        missing = [t.name for t in tasks if t.name not in known]
        if missing:
            raise UsageError(
                f"unknown task(s) {', '.join(missing)}: lm-eval knows no such task or group; check the name "
                "(`lm-eval ls tasks` lists them), pass a task YAML with --task-file, or use pydoc_ppl / pydoc_lastword"
            )
        kw = {}
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            # lm-eval starts rolling windows with BOS (or EOS); a tokenizer with neither gets the
            # config's, else token 0
            cfg = model.config
            kw["prefix_token_id"] = next((i for i in (cfg.bos_token_id, cfg.eos_token_id) if isinstance(i, int)), 0)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kw)
        for t in tasks:  # load each task's data first: a failure here is the data, not the model
            try:
                tm.load([t.name])
            except Exception as e:
                raise _unreachable(t.name, e) from e
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[t.name for t in tasks],
            task_manager=tm,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    out = {}
    for task, vals in res["results"].items():
        hib = res.get("higher_is_better", {}).get(task, {})
        metrics, stderr = {}, {}
        for key, v in vals.items():
            m = _metric_name(key)
            if m is None or not isinstance(v, (int, float)):
                continue
            metrics[m] = float(v)
            se = vals.get(key.replace(",", "_stderr,", 1) if "," in key else f"{key}_stderr")
            if isinstance(se, (int, float)):
                stderr[m] = float(se)
        n = res.get("n-samples", {}).get(task, {})
        out[task] = {
            "metrics": metrics,
            "stderr": stderr,
            "higher_is_better": {m: bool(hib.get(m.split("@")[0], True)) for m in metrics},
            "samples": n.get("effective"),
            "version": res.get("versions", {}).get(task),
        }
    return out
