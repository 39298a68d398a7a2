"""Evaluate a model against a baseline with the same protocol (perplexity, lm-eval tasks), from
the cache where nothing changed; compare; check the gates."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from compress.api.common import REPORT_SCHEMA, Hooks
from compress.api.inspection import inspect_checkpoint
from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource, resolve_model
from compress.data import eval_windows, load_texts, tokenize
from compress.errors import UsageError
from compress.eval import cache
from compress.eval.gates import check_gates as gate_rows
from compress.eval.gates import compare_metrics
from compress.eval.harness import resolve_tasks, run_tasks
from compress.eval.layerwise import layerwise_perplexity, use_layerwise
from compress.eval.perplexity import perplexity
from compress.modules import keep_dense
from compress.recipe import EvalConfig, PerplexityConfig
from compress.utils import peak_rss_mb


def check_eval_config(cfg, has_baseline: bool) -> None:
    if cfg.gates.active() and not has_baseline:
        raise UsageError(
            "eval.gates: gates compare the model with a baseline evaluated in the same run, and there is none; "
            "set eval.baseline: true (run) or pass --baseline MODEL (eval), or remove the gates"
        )
    if cfg.gates.active() and cfg.perplexity is None and not cfg.tasks:
        raise UsageError("eval.gates: nothing is evaluated (eval.perplexity is null and eval.tasks is empty), so no gate can be checked")
    resolve_tasks(cfg.tasks)  # task files exist and name their tasks


def _data_identity(ref: str) -> str:
    p = Path(ref).expanduser()
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return ref


def _evaluate_one(ref, source: ModelSource, cfg, tasks, seed: int, label: str, hooks: Hooks) -> dict:
    """Every metric of one model, from the cache where the model, task and settings are unchanged."""


    t0 = time.time()
    fp = cache.model_fingerprint(source.path)
    keys: dict[str, str] = {}
    if cfg.perplexity is not None:
        keys["perplexity"] = cache.cache_key(fp, "perplexity", {**cfg.perplexity.model_dump(mode="json"), "data": _data_identity(cfg.perplexity.data)})
    task_settings = {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "seed": seed}
    for t in tasks:
        keys[t.name] = cache.cache_key(fp, t.name, {**task_settings, "task": t.digest})
    found = {name: cache.get(k) for name, k in keys.items()} if cfg.cache else {}
    found = {name: v for name, v in found.items() if v is not None}
    out: dict = {"ref": str(ref), "path": str(source.path), "fingerprint": fp, "cached": sorted(found)}
    todo_tasks = [t for t in tasks if t.name not in found]
    model = None

    def whole_model():
        m = load_source(source)
        keep_dense(m)  # dequantize each packed layer once, not on every forward
        return m

    if "perplexity" in keys:
        if "perplexity" in found:
            res = found["perplexity"]
            hooks.log(f"perplexity of {source.path}: cached")
        else:
            pc = cfg.perplexity
            windows = eval_windows(tokenize(load_texts(pc.data, "eval"), source.tokenizer), pc.seq_len, pc.max_windows)
            # a model that does not fit in memory in float32 is scored one block at a time
            # (compress.eval.layerwise; same result), before the whole model is loaded for tasks
            layerwise = use_layerwise(source, pc, hooks.log)
            hooks.log(f"perplexity of {source.path} on {len(windows)} windows of {pc.seq_len} tokens" + (" (layer by layer)" if layerwise else ""))

            def progress(done, total):
                hooks.progress(f"eval {label}", done, total)

            if layerwise:
                res = layerwise_perplexity(source, windows, pc.batch_size, progress)
            else:
                model = whole_model()
                res = perplexity(model, windows, pc.batch_size, progress)
            cache.put(keys["perplexity"], res)
        out.update(res)
    if todo_tasks and model is None:
        model = whole_model()
    if tasks:
        results: dict = {}
        for t in tasks:  # one lm-eval run per task reference: a group's subtasks are cached with it
            if t.name in found:
                hooks.log(f"{t.name} on {source.path}: cached")
                res = found[t.name]
            else:
                hooks.log(f"lm-eval task {t.name} on {source.path}")
                res = run_tasks(model, source.tokenizer, [t], num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed, quiet=getattr(hooks, "quiet", False))
                cache.put(keys[t.name], res)
            results.update(res)
        out["tasks"] = results
    del model
    out["seconds"] = round(time.time() - t0, 2)
    return out


def evaluate(model_ref, baseline_ref=None, cfg=None, *, seed: int = 0, hooks: Hooks | None = None) -> dict:
    """Evaluate a model, and a baseline with the same protocol; compare; check the gates.

    ``cfg`` is an ``EvalConfig`` (a ``PerplexityConfig`` alone means perplexity only). Returns the
    report's ``eval`` section: {"settings", "model", "baseline"?, "metrics", "gates", "passed"}.
    Gates are checked but not raised here (``check_gates`` does that once the report is saved)."""
    hooks = hooks or Hooks()
    if cfg is None:
        cfg = EvalConfig()
    elif isinstance(cfg, PerplexityConfig):
        cfg = EvalConfig(perplexity=cfg)
    check_eval_config(cfg, baseline_ref is not None)
    if cfg.perplexity is None and not cfg.tasks:
        raise UsageError("nothing to evaluate: perplexity is off and no task is given (use --tasks or --task-file)")
    tasks = resolve_tasks(cfg.tasks)
    torch.manual_seed(seed)
    result: dict = {"settings": {**cfg.model_dump(mode="json"), "seed": seed}}
    sources = {"model": ModelSource(resolve_model(model_ref, log=hooks.log))}
    if baseline_ref is not None:
        sources["baseline"] = ModelSource(resolve_model(baseline_ref, log=hooks.log))
    for s in sources.values():
        s.verify()
        if cfg.perplexity is not None:
            s.check_seq_len({"eval.perplexity.seq_len": cfg.perplexity.seq_len})  # exit 2 before any model work
    for label in ("baseline", "model"):  # the baseline first: it is the one most often cached
        if label in sources:
            ref = baseline_ref if label == "baseline" else model_ref
            result[label] = _evaluate_one(ref, sources[label], cfg, tasks, seed, label, hooks)
    result["metrics"] = compare_metrics(result["model"], result.get("baseline"))
    if "baseline" in result and "perplexity" in result["model"]:
        result["ppl_increase"] = round(result["model"]["perplexity"] / result["baseline"]["perplexity"] - 1, 5)
    result["gates"] = gate_rows(result["metrics"], cfg.gates) if cfg.gates.active() else []
    result["passed"] = all(g["passed"] for g in result["gates"])
    return result


def eval_report(model_ref, baseline_ref=None, cfg=None, *, seed: int = 0, kind: str = "eval", hooks: Hooks | None = None) -> dict:
    """A whole report (schema compress.report/2) for ``compress eval`` / ``compress compare``:
    the evaluation plus size and bits per parameter of each checkpoint, time and peak memory."""
    t0 = time.time()
    ev = evaluate(model_ref, baseline_ref, cfg, seed=seed, hooks=hooks)
    report = {"schema": REPORT_SCHEMA, "kind": kind, "eval": ev, "checkpoints": {}}
    for label in ("baseline", "model"):
        if label in ev:
            try:
                report["checkpoints"][label] = inspect_checkpoint(ev[label]["path"])
            except Exception:  # a format inspect does not read (e.g. .bin weights): sizes are optional
                pass
    report["time"] = {"eval_s": round(time.time() - t0, 1), "total_s": round(time.time() - t0, 1)}
    report["peak_rss_mb"] = peak_rss_mb()
    return report
