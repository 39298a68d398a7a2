"""The Python API under the CLI: run a recipe, evaluate, inspect.

    import compress
    report = compress.run(compress.load_recipe("recipe.yaml", ["passes.0.gptq.bits=3"]))
    model = compress.load("out/smollm2-w4")
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from compress.eval.report import (
    REPORT_SCHEMA,  # one schema for every report: eval/report.schema.json
)

from compress.arch.families import find_blocks
from compress.checkpoint.export import Exporter
from compress.checkpoint.source import ModelSource, read_metadata, resolve_model
from compress.data import calibration_windows, eval_windows, load_texts, tokenize
from compress.engine import check_plan, compress_blocks
from compress.errors import UsageError
from compress.passes import Context, get_pass
from compress.recipe import Recipe, dump_recipe
from compress.utils import peak_rss_mb


class Hooks:
    """How the library talks to its caller (the CLI renders these with rich)."""

    def log(self, msg: str) -> None:
        pass

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        """``info``: a short status beside the bar (e.g. distillation's loss and tokens/s)."""


def _storage_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return getattr(torch, dt) if isinstance(dt, str) else dt


def run(recipe: Recipe, *, resume: bool = False, hooks: Hooks | None = None) -> dict:
    """Compress, export, evaluate; returns the report (also saved as report.json in the export).

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: the sweep is shared out
    (compress.engine.dist), then rank 0 alone exports, evaluates and returns the report; the other
    ranks return ``{"rank": r, "world_size": n}``."""
    from compress.engine.dist import close_world, init_world

    world = init_world(recipe.device)  # `device: cuda` without CUDA: exit 2 here, before any work
    try:
        # rank 0 speaks for the job (one log, one progress bar)
        return _run(recipe, resume, (hooks or Hooks()) if world.main else Hooks(), world)
    except RuntimeError as e:  # gloo / nccl: a peer closed its connection, or a collective timed out
        if world.distributed and any(w in str(e).lower() for w in ("connection", "timed out", "timeout", "peer", "gloo", "nccl")):
            from compress.errors import JobError

            raise JobError(f"rank {world.rank} of {world.size}: another rank of the job failed or stopped answering "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the job ends here. Finished blocks are kept "
                           "beside the export: fix the cause and rerun with --resume (any number of ranks)") from e
        raise
    finally:
        close_world(world)


def _run(recipe: Recipe, resume: bool, hooks: Hooks, world) -> dict:
    t_start = time.time()
    torch.manual_seed(recipe.seed)
    if not recipe.export.path:
        raise UsageError("export.path: where to write the compressed checkpoint is not set (use -o/--output or --set export.path=DIR)")
    if not recipe.passes:
        raise UsageError("passes: the recipe has no passes; add e.g. `- gptq: {bits: 4, group_size: 64}`")
    source = ModelSource(resolve_model(recipe.model, log=hooks.log))
    source.verify()  # a truncated or corrupt weights file stops here (exit 3), not minutes into the run
    _check_eval_config(recipe.eval, recipe.eval.baseline)  # before minutes of compression, not after
    dtype = _storage_dtype(source.config)
    passes = [get_pass(name)(cfg, Context(dtype=dtype, seed=recipe.seed)) for name, cfg in recipe.pass_configs()]
    distill = _distill_pass(passes)
    model = source.skeleton()
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))

    cal = recipe.calibration
    calib = None
    needs_data = any(p.stats or p.smooths or p.preview_stats or p.distills for p in passes)
    if not needs_data and recipe.report.layer_error != "output" and cal.samples > 0:
        hooks.log("no pass needs calibration data: skipping calibration (the report gives each layer's weight error; "
                  "report.layer_error: output measures output errors on calibration data)")
    elif cal.samples > 0:
        ids = tokenize(load_texts(cal.data, "calibration", cal.text_field), source.tokenizer)
        calib = calibration_windows(ids, cal.samples, cal.seq_len, cal.sampling, recipe.seed, source=cal.data)
    if distill is not None and calib is None:
        raise UsageError("calibration.samples: distillation trains on the calibration windows; set calibration.samples > 0")
    if distill is not None and distill.config.scope == "model":
        from compress.distill.loop import split_windows

        split_windows(calib, distill.config.holdout, f"passes.{len(passes) - 1}.distill.holdout")

    check_plan(source, model, passes)  # bad options fail here, before anything is written
    if recipe.export.lowrank == "merged" and any(p.factorizes for p in passes) and any(p.quantizes for p in passes):
        raise UsageError("export.lowrank: merged would multiply quantized factors back into dense weights; use "
                         "export.lowrank: factored (compress.load reads it), or merge a low-rank-only run and quantize that")
    target = Path(recipe.export.path)
    # model-scope distillation trains the exported student: the compressing passes export to a
    # staging folder beside the target (kept until the end, so --resume skips them), the trained
    # student goes to the target
    staged = distill is not None and distill.config.scope == "model"
    if staged and target.exists() and not recipe.export.overwrite:
        raise UsageError(f"{target}: already exists; pass --overwrite to replace it, or choose another export path")
    stage = target.parent / f".{target.name}.student" if staged else target
    stage_key = recipe.fingerprint(passes=len(passes) - 1)
    report = None
    if staged and resume and _stage_matches(stage, stage_key):
        hooks.log(f"the compressed student in {stage} is complete: resuming with distillation")
        report = json.loads((stage / "report.json").read_text())
        out = stage
    if report is None:
        report, out = _compress(recipe, source, model, passes, calib, blocks_path, len(blocks), dtype, stage, resume or False,
                                staged, hooks, world)
        if not world.main:  # rank 0 exports, distills (model scope) and evaluates on its own
            return {"rank": world.rank, "world_size": world.size}
        if staged:
            (stage / STAGE_FILE).write_text(json.dumps({"fingerprint": stage_key}))
    del model
    if staged:
        from compress.distill.run import distill_checkpoint, write_trained

        student, rec = distill_checkpoint(stage, source.path, calib, distill.config, seed=recipe.seed, work=stage, resume=resume,
                                          hooks=hooks)
        report["distill"] = {"scope": "model", **rec}
        out = write_trained(stage, student, target, report["distill"], overwrite=recipe.export.overwrite)
        del student
    elif distill is not None:
        report["distill"] = _block_distill_summary(report["layers"], distill)
    report["export"] = inspect_checkpoint(out)

    if recipe.eval.perplexity is not None or recipe.eval.tasks:
        t1 = time.time()
        report["eval"] = evaluate(out, source.path if recipe.eval.baseline else None, recipe.eval, seed=recipe.seed, hooks=hooks)
        if staged and recipe.eval.perplexity is not None:  # the student before its training, same protocol
            before = evaluate(stage, None, recipe.eval.perplexity, seed=recipe.seed, hooks=hooks)
            report["distill"]["perplexity"] = distill_perplexities(report["eval"], before)
        report["time"]["eval_s"] = round(time.time() - t1, 1)
    report["time"]["total_s"] = round(time.time() - t_start, 1)
    report["peak_rss_mb"] = peak_rss_mb()
    write_reports(report, out)
    if staged:
        shutil.rmtree(stage, ignore_errors=True)
    check_gates(report)
    return report


STAGE_FILE = "stage.json"  # in the staging folder of a distilled run: the compressing passes' fingerprint


def _stage_matches(stage: Path, key: str) -> bool:
    f = stage / STAGE_FILE
    try:
        return (stage / "report.json").is_file() and json.loads(f.read_text())["fingerprint"] == key
    except (OSError, ValueError, KeyError):
        return False


def _distill_pass(passes):
    """The recipe's distill pass (last, once, after a compressing pass), or None."""
    at = [k for k, p in enumerate(passes) if p.distills]
    if not at:
        return None
    if len(at) > 1 or at[0] != len(passes) - 1:
        raise UsageError(f"passes.{at[0]}.{passes[at[0]].name}: distillation comes once, as the last pass, after the compressing passes")
    if at[0] == 0:
        raise UsageError(f"passes.0.{passes[0].name}: distillation trains a compressed student; put a compressing pass before it "
                         "(e.g. `- gptq: {bits: 3, group_size: 64}` then `- distill: {}`), or distill an existing compressed "
                         "checkpoint with `compress distill STUDENT --teacher MODEL -o OUT`")
    return passes[-1]


def _block_distill_summary(layers: list[dict], distill) -> dict:
    """scope: block: each block's relative output error before and after its training."""
    import re

    blocks: dict[str, list[float]] = {}
    for r in layers:
        if "block_distill" in r.get("info", {}):
            m = re.match(r"(.*?\.\d+)\.", r["name"])
            blocks.setdefault(m.group(1) if m else r["name"], r["info"]["block_distill"])
    return {"scope": "block", "train": distill.config.train, "blocks": {k: {"error_before": v[0], "error_after": v[1]} for k, v in blocks.items()}}


def distill_perplexities(ev: dict, before: dict) -> dict:
    """Perplexity of the original (the baseline), of the compressed student before training and
    after it, and the share of the loss the training won back."""
    out = {"compressed": before["model"]["perplexity"], "distilled": ev["model"]["perplexity"]}
    if "baseline" in ev:
        out["original"] = ev["baseline"]["perplexity"]
        lost = out["compressed"] - out["original"]
        out["recovered"] = round((out["compressed"] - out["distilled"]) / lost, 4) if lost > 0 else None
    return out


def _compress(recipe, source, model, passes, calib, blocks_path, n_blocks, dtype, target, resume, overwrite, hooks, world=None):
    """The layer-wise sweep into an export at ``target``; returns (report so far, its path).
    Under torchrun every rank sweeps; rank 0 alone writes (others return (None, None))."""
    from compress.engine.dist import World

    world = world or World()
    cal = recipe.calibration
    exporter, start, cached = None, 0, None
    if world.main:
        exporter = Exporter(
            target, source, recipe.fingerprint(), blocks_path, n_blocks, dtype,
            overwrite=recipe.export.overwrite or overwrite, resume=resume, lowrank=recipe.export.lowrank,
        )
        start, cached = exporter.begin()
    start = world.broadcast(start)
    if start and exporter is not None:  # rank 0 (the only rank that logs)
        hooks.log(f"resuming after block {start - 1} of {n_blocks} from {exporter.work}")
    t0 = time.time()
    how = compress_blocks(
        source,
        model,
        passes,
        calib,
        cal.batch_size,
        sink=exporter.write_block if exporter is not None else (lambda res, inputs: None),
        start=start,
        resume_inputs=cached,
        progress=lambda i, n, msg: hooks.progress("compress", i, n),
        sequential=cal.sequential,
        error_samples=cal.error_samples,
        keep_mlp_inputs=cal.keep_mlp_inputs,
        propagate=cal.propagate,
        world=world,
    )
    if not world.main:
        return None, None
    compress_s = time.time() - t0 + sum(exporter.block_seconds[:start])
    report = {
        "schema": REPORT_SCHEMA,
        "kind": "run",
        "recipe": recipe.resolved(),
        "model": {"path": str(source.path), "model_type": source.config.model_type, "size_bytes": source.disk_bytes()},
        "layers": [asdict(r) for r in exporter.layers],
        "time": {"compress_s": round(compress_s, 1), "block_s": exporter.block_seconds},
        "run": {"device": str(world.device), "world_size": world.size, **({"backend": world.backend} if world.backend else {}),
                **({"activations": how["activations"]} if how["activations"] else {}),
                **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated(world.device) / 2**20, 1)} if world.device.type == "cuda" else {})},
        "compress_peak_rss_mb": peak_rss_mb(),  # before evaluation loads whole models
    }
    out = exporter.finalize(model, dump_recipe(recipe), report)
    conv1d = sorted(set(model.__dict__.get("_compress_conv1d", [])) & set(exporter.quantized))
    if conv1d:
        hooks.log(
            f"note: {len(conv1d)} quantized layers were Conv1D in transformers ({conv1d[0]}, ...): compress.load and vLLM read "
            "them; plain transformers cannot (compressed-tensors quantizes nn.Linear modules only)"
        )
    return report, out


def write_reports(report: dict, folder: Path) -> None:
    """``report.json`` and ``report.md`` into ``folder``, each written atomically."""
    from compress.eval.report import to_markdown

    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", to_markdown(report))):
        tmp = folder / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)


def check_gates(report: dict) -> None:
    """Raise ``GateError`` (exit 4) naming every failing gate; the report rides on it as ``.report``."""
    from compress.eval.gates import failure_message

    from compress.errors import GateError

    ev = report.get("eval") or {}
    if ev.get("passed") is False:
        e = GateError(failure_message(ev["gates"]))
        e.report = report
        raise e


def _check_eval_config(cfg, has_baseline: bool) -> None:
    from compress.eval.harness import resolve_tasks

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
    from compress.eval import cache
    from compress.eval.harness import run_tasks
    from compress.eval.layerwise import layerwise_perplexity, use_layerwise
    from compress.eval.perplexity import perplexity

    from compress.checkpoint.load import load_source

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
        from compress.kernels import keep_dequantized

        m = load_source(source)
        keep_dequantized(m)  # dequantize each packed layer once, not on every forward
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
    from compress.eval.gates import check_gates as gate_rows
    from compress.eval.gates import compare_metrics
    from compress.eval.harness import resolve_tasks

    from compress.recipe import EvalConfig, PerplexityConfig

    hooks = hooks or Hooks()
    if cfg is None:
        cfg = EvalConfig()
    elif isinstance(cfg, PerplexityConfig):
        cfg = EvalConfig(perplexity=cfg)
    _check_eval_config(cfg, baseline_ref is not None)
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


def inspect_checkpoint(path) -> dict:
    """Layers, schemes, bits per parameter and size on disk of a checkpoint folder."""
    from compress.checkpoint.formats import read_quantization_config
    from compress.checkpoint.load import quantized_layer_names
    source = ModelSource(resolve_model(path))
    size = source.disk_bytes()
    quantized = set(quantized_layer_names(source))
    info = source.tensor_info(list(source.weight_map))
    packed = [q for q in quantized if q + ".weight_shape" in source.weight_map]
    shapes = source.read([f"{q}.weight_shape" for q in packed])
    bits = 8 * sum(nbytes for _, nbytes in info.values())
    n_params = sum(math.prod(shapes[q + ".weight_shape"].tolist()) for q in packed)  # original weights
    n_params += sum(math.prod(info[q + ".weight"][0]) for q in quantized if q not in packed)  # int8 (W8A8) weights
    n_params += sum(math.prod(shape) for n, (shape, _) in info.items() if n.rpartition(".")[0] not in quantized)
    out = {
        "path": str(source.path),
        "model_type": source.config.model_type,
        "size_bytes": size,
        "parameters": n_params,
        "bits_per_parameter": round(bits / max(n_params, 1), 3),
        "quantized_layers": len(quantized),
    }
    if source.quantized:
        qc = source.config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        groups = read_quantization_config(qc)
        out["format"] = qc.get("format")
        out["schemes"] = [
            {**g, "vllm_servable": g["bits"] in (4, 8), "runtime": "vLLM, transformers, compress" if g["bits"] in (4, 8) else "compress only"}
            for g in groups.values()
        ]
        out["ignore"] = qc.get("ignore", [])
    meta = read_metadata(source.path)
    if "lowrank" in meta:
        lr = meta["lowrank"]
        out["lowrank"] = {k: lr[k] for k in ("export", "method", "parameters_kept", "parameters_dense")}
        out["lowrank"]["layers"] = sum(1 for v in lr["layers"].values() if v["rank"] is not None)
    if "sparsity" in meta:
        sp = meta["sparsity"]
        out["sparsity"] = {"structure": sp["structure"], "global_sparsity": sp["global_sparsity"], "layers": len(sp["targets"])}
    return out


def distill(student_ref, teacher_ref, output, cfg=None, *, calibration=None, eval_cfg=None, seed: int = 0, overwrite: bool = False,
            resume: bool = False, hooks: Hooks | None = None) -> dict:
    """Distill an existing checkpoint (``compress distill``): train ``student_ref`` (a compressed
    copy of the teacher) against ``teacher_ref`` on ``calibration`` windows, write the trained
    student to ``output`` in the student's own format, and evaluate it against the teacher and the
    student as it was. Returns the report (kind ``distill``; saved in ``output``)."""
    from compress.distill.config import DistillConfig
    from compress.distill.loop import split_windows
    from compress.distill.run import check_pair, distill_checkpoint, write_trained

    from compress.recipe import CalibrationConfig, EvalConfig

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
    if target.exists() and not overwrite:
        raise UsageError(f"{target}: already exists; pass --overwrite to replace it, or choose another export path")
    _check_eval_config(eval_cfg, True)
    student = ModelSource(resolve_model(student_ref, log=hooks.log))
    teacher = ModelSource(resolve_model(teacher_ref, log=hooks.log))
    student.verify()
    teacher.verify()
    check_pair(student, teacher)
    ids = tokenize(load_texts(cal.data, "calibration", cal.text_field), teacher.tokenizer)
    windows = calibration_windows(ids, cal.samples, cal.seq_len, cal.sampling, seed, source=cal.data)
    split_windows(windows, cfg.holdout)
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
