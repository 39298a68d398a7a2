"""``compress.run``: compress a model with a recipe, export it, evaluate it, check the gates.

The run is a chain of steps in recipe order (docs/architecture.md, ``compress.engine.model.
plan_steps``): a model-scope pass (structured pruning, model-scope distillation) is a step that
reads one checkpoint and writes the next; the consecutive block-scope passes are one step, the
layer-wise sweep (``compress.engine``), which reads the checkpoint before it and writes an
export. Then evaluation, the report and the gates.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compress.api.common import (
    REPORT_SCHEMA,
    Hooks,
    check_gates,
    storage_dtype,
    write_reports,
)
from compress.api.evaluation import check_eval_config, evaluate
from compress.api.inspection import inspect_checkpoint
from compress.arch.families import find_blocks
from compress.checkpoint.export import TOKENIZER_FILES, Exporter
from compress.checkpoint.files import (
    activation_bytes,
    check_target,
    claim,
    copied_bytes,
    export_bound,
    folder_bytes,
    work_folder,
)
from compress.checkpoint.gguf import arch_for
from compress.checkpoint.gguf_export import GGUFExporter, read_tokenizer
from compress.checkpoint.source import ModelSource, read_metadata, resolve_model
from compress.generation import calibration_of
from compress.engine import SweepOptions, check_plan, compress_blocks
from compress.engine.dist import World, close_world, init_world
from compress.engine.model import (
    ModelStage,
    clean_steps,
    mark_step_done,
    plan_steps,
    run_model_pass,
    staged,
    state_folder,
    step_done,
)
from compress.errors import InputError, JobError, UsageError
from compress.passes import Context, JobView, Pass, get_pass
from compress.recipe import Recipe, dump_recipe
from compress.utils import DiskError, atomic_write_text, peak_rss_mb, size_words


def run(recipe: Recipe, *, resume: bool = False, hooks: Hooks | None = None) -> dict:
    """Compress, export, evaluate; returns the report (also saved as report.json in the export).

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: the sweep is shared out
    (compress.engine.dist), then rank 0 alone exports, evaluates and returns the report; the other
    ranks return ``{"rank": r, "world_size": n}``."""
    world = init_world(recipe.device)  # `device: cuda` without CUDA: exit 2 here, before any work
    try:
        # rank 0 speaks for the job (one log, one progress bar)
        return Job(recipe, resume, (hooks or Hooks()) if world.main else Hooks(), world).run()
    except RuntimeError as e:  # gloo / nccl: a peer closed its connection, or a collective timed out
        if world.distributed and any(w in str(e).lower() for w in ("connection", "timed out", "timeout", "peer", "gloo", "nccl")):
            raise JobError(f"rank {world.rank} of {world.size}: another rank of the job failed or stopped answering "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the job ends here. Finished blocks are kept "
                           "beside the export: fix the cause and rerun with --resume (any number of ranks)") from e
        raise
    finally:
        close_world(world)


def _calibration(recipe: Recipe, source: ModelSource, passes: list[Pass], hooks: Hooks) -> torch.Tensor | None:
    """The calibration windows, or None where no pass needs them (the report then gives weight errors)."""
    cal = recipe.calibration
    if not any(p.needs_calibration() for p in passes) and recipe.report.layer_error != "output" and cal.samples > 0:
        hooks.log("no pass needs calibration data: skipping calibration (the report gives each layer's weight error; "
                  "report.layer_error: output measures output errors on calibration data)")
        return None
    if cal.samples <= 0:
        return None
    return calibration_of(cal, source, recipe.seed, hooks=hooks)


COPIED = ("config.json", *TOKENIZER_FILES)  # the source's files an export holds a copy of (or a version of)
CARRIED = ("structured", "rotation")  # compress.json sections of the sweep's input that its export keeps


class Job:
    """One run of a recipe: its source, passes, calibration and where it writes."""

    def __init__(self, recipe: Recipe, resume: bool, hooks: Hooks, world: World):
        self.recipe, self.resume, self.hooks, self.world = recipe, resume, hooks, world
        self.t_start = time.time()
        self.model_seconds = 0.0  # time in model-scope passes (the report's compress_s when there is no sweep)

    def _prepare(self) -> None:
        """Everything checked before any output folder is created."""
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        if not recipe.export.path:
            raise UsageError("export.path: where to write the compressed checkpoint is not set (use -o/--output or --set export.path=DIR)")
        if not recipe.passes:
            raise UsageError("passes: the recipe has no passes; add e.g. `- gptq: {bits: 4, group_size: 64}`")
        self.source = ModelSource(resolve_model(recipe.model, log=self.hooks.log))
        self.original, self.original_source = self.source.path, self.source  # the model the run starts from (the baseline; a teacher)
        self.source.verify()  # a truncated or corrupt weights file stops here (exit 3), not minutes into the run
        check_eval_config(recipe.eval, recipe.eval.baseline)  # before minutes of compression, not after
        self.source.check_seq_len(recipe.seq_lens())  # windows longer than the model's positions: exit 2
        self.dtype = storage_dtype(self.source.config)
        self.passes = [get_pass(name)(cfg, Context(dtype=self.dtype, seed=recipe.seed)) for name, cfg in recipe.pass_configs()]
        self.model = self.source.skeleton()
        self.calib = _calibration(recipe, self.source, self.passes, self.hooks)
        job = JobView(self.passes, self.calib, recipe.export, self.source.config, self.model)
        for k, p in enumerate(self.passes):
            p.validate(k, job)
        check_plan(self.source, self.model, self.passes)  # bad options fail here, before anything is written
        self.steps = plan_steps(self.passes)
        self._check_steps()
        self.target = Path(recipe.export.path)
        if len(self.steps) > 1 or self.steps[0].kind == "model":  # steps write beside the target: the sweep's own check would not see it
            check_target(self.target, recipe.export.overwrite)

    def _check_steps(self) -> None:
        steps, recipe = self.steps, self.recipe
        if steps[0].kind == "model" and len(steps) > 1 and self.world.distributed:
            raise UsageError(f"passes.0.{steps[0].passes[0].name}: a model-scope pass before the sweep runs in one process; "
                             "run it without torchrun / --nproc, then compress its output with torchrun")
        if recipe.export.format == "gguf":  # an architecture llama.cpp does not read: exit 2 before any work
            arch_for(self.source.config)
            read_tokenizer(self.source.path)
            if steps[-1].kind == "model":
                raise UsageError(f"passes: {steps[-1].passes[0].name} transforms the whole model after the sweep; a GGUF "
                                 "export is written by the sweep: export to compressed-tensors, then convert (a model-scope "
                                 "pass before a quantizing pass works: the sweep writes the GGUF file)")

    def run(self) -> dict:
        self._prepare()
        with self._preflight():  # the export location checked, then locked until the run ends
            return self._run()

    def _preflight(self) -> contextlib.AbstractContextManager:
        """The export location before any model work: not a file (exit 2), writable (exit 3), not
        another run's (exit 2), room for the export and the resume state (exit 3). Returns the
        context that holds its lock (``compress.checkpoint.files.claim``). Rank 0 alone writes."""
        self.needed = 0
        if not self.world.main:
            return contextlib.nullcontext()
        src, copies = self.source, len(self.steps)  # each step writes a checkpoint, kept until the run ends
        export = (export_bound(src.tensor_info(list(src.weight_map)), self.dtype.itemsize) + copied_bytes(src.path, COPIED)) * copies
        state = 0 if self.calib is None else activation_bytes(*self.calib.shape[:2], getattr(src.config, "hidden_size", 0) or 0)
        kept = ([work_folder(self.target), state_folder(self.target)] + [work_folder(staged(self.target, k)) for k in range(copies)]
                + [staged(self.target, k) for k in range(copies)])
        done = sum(folder_bytes(f) for f in kept) if self.resume else 0
        self.needed = export + state
        what = (f"the export, at most {size_words(export)}" + (f" ({copies} checkpoints: one per step of the run)" if copies > 1 else "")
                + (f", and the resume state, {size_words(state)}" if state else "") + (f", less {size_words(done)} already written" if done else ""))
        return claim(self.target, max(0, self.needed - done), what)

    def _run(self) -> dict:
        folder, report, sections, before = self.source.path, None, {}, None
        for j, step in enumerate(self.steps):
            last = j == len(self.steps) - 1
            out = self.target if last else staged(self.target, j)
            key = self.recipe.fingerprint(passes=step.end)
            saved = step_done(out, key) if self.resume and not last else None
            if saved is not None:
                self.hooks.log(f"{out} ({', '.join(p.name for p in step.passes)}) is complete: resuming after it")
                report = _read_report(out) if step.kind == "sweep" else report
                sections.update(saved)
            elif step.kind == "sweep":
                report = self._sweep_step(folder, out)
                if report is None:  # not rank 0: it exports, runs the model stage and evaluates on its own
                    return {"rank": self.world.rank, "world_size": self.world.size}
            else:
                sections.update(self._model_step(step.passes[0], j, folder, out))
            if not last:
                mark_step_done(out, key, sections if step.kind == "model" else None)
            before, folder = folder, out
        self.model = None
        report = report or self._base_report()
        for p in self.passes:
            report.update(p.summarize(report["layers"]))
        report.update(sections)
        if not (folder / "recipe.yaml").is_file():  # a run without a sweep: the model-scope passes wrote the checkpoint
            atomic_write_text(folder / "recipe.yaml", dump_recipe(self.recipe))
        report["export"] = inspect_checkpoint(folder)
        self._evaluate(report, folder, before if self.steps[-1].kind == "model" else None)
        report["time"]["total_s"] = round(time.time() - self.t_start, 1)
        report["peak_rss_mb"] = peak_rss_mb()
        write_reports(report, folder)
        clean_steps(self.steps, self.target)
        check_gates(report)
        return report

    def _sweep_step(self, folder: Path, out: Path) -> dict | None:
        """The layer-wise sweep from ``folder`` (the source, or the checkpoint a model-scope pass
        wrote: the model is reopened and the plan checked again on its shapes) into ``out``."""
        if folder != self.source.path:
            self.source = ModelSource(folder)
            self.model = self.source.skeleton()
            self.passes = check_plan(self.source, self.model, self.passes)[0]
        report, _ = self._sweep(out)
        return report

    def _model_step(self, p: Pass, j: int, folder: Path, out: Path) -> dict:
        work = state_folder(self.target) if j == 0 else folder  # the source is never written to
        work.mkdir(parents=True, exist_ok=True)
        stage = ModelStage(folder, self.original, out, self.calib, self.resume, self.recipe.export.overwrite or out != self.target,
                           self.hooks, work=work)
        t0 = time.time()
        sections = run_model_pass(p, self.target, stage)
        self.model_seconds += time.time() - t0
        return sections

    def _base_report(self) -> dict:
        """The report of a run without a sweep (only model-scope passes)."""
        return {"schema": REPORT_SCHEMA, "kind": "run", "recipe": self.recipe.resolved(),
                "model": _model_section(self.original_source),
                "layers": [], "time": {"compress_s": round(self.model_seconds, 1)}, "run": {"device": str(self.world.device), "world_size": 1},
                "compress_peak_rss_mb": peak_rss_mb()}

    def _evaluate(self, report: dict, out: Path, before_path: Path | None) -> None:
        """Evaluate ``out`` (against the original where the recipe asks); where the last step is a
        model-scope pass, also its input (``before_path``), same protocol, for that pass's report."""
        recipe = self.recipe
        if recipe.eval.perplexity is None and not recipe.eval.tasks:
            return
        t1 = time.time()
        report["eval"] = evaluate(out, self.original if recipe.eval.baseline else None, recipe.eval, seed=recipe.seed, hooks=self.hooks)
        if before_path is not None and recipe.eval.perplexity is not None:
            before = evaluate(before_path, None, recipe.eval.perplexity, seed=recipe.seed, hooks=self.hooks)
            self.steps[-1].passes[0].report_eval(report, report["eval"], before)
        report["time"]["eval_s"] = round(time.time() - t1, 1)

    def _sweep(self, target: Path) -> tuple[dict | None, Path | None]:
        """The layer-wise sweep into an export at ``target``; returns (report so far, its path).
        Under torchrun every rank sweeps; rank 0 alone writes (others return (None, None))."""
        recipe, source, world = self.recipe, self.source, self.world
        exporter, start, cached = None, 0, None
        if world.main:
            blocks_path, n_blocks = _blocks(source, self.model)
            kind, extra = (GGUFExporter, {"gguf_type": recipe.export.type, "log": self.hooks.log,
                                                 "imatrix": any("quantize" in p.effects and p.needs_calibration() for p in self.passes)}) if recipe.export.format == "gguf" else (Exporter, {})
            exporter = kind(target, source, recipe.fingerprint(), blocks_path, n_blocks, self.dtype,
                            overwrite=recipe.export.overwrite or target != self.target, resume=self.resume,
                            lowrank=recipe.export.lowrank, needed=self.needed, max_shard_size=recipe.export.shard_bytes(), **extra)
            start, cached = exporter.begin()
        start = world.broadcast(start)
        if start and exporter is not None:  # rank 0 (the only rank that logs)
            self.hooks.log(f"resuming after block {start - 1} of {exporter.n_blocks} from {exporter.work}")
        t0 = time.time()
        options = SweepOptions.from_calibration(recipe.calibration, progress=lambda i, n, msg: self.hooks.progress("compress", i, n))
        sink = exporter.write_block if exporter is not None else (lambda res, inputs: None)
        try:
            how = compress_blocks(source, self.model, self.passes, self.calib, sink, options, resume=(start, cached), world=world)
            if not world.main:
                return None, None
            report = self._sweep_report(exporter, time.time() - t0 + sum(exporter.block_seconds[:start]), how)
            # a model-scope pass before the sweep (structured pruning) recorded what it did in its checkpoint
            sections = {k: v for k, v in read_metadata(source.path).items() if k in CARRIED}
            for p in self.passes:
                sections.update(p.export_metadata(exporter.layers, recipe.export))
            out = exporter.finalize(self.model, dump_recipe(recipe), report, sections)
        except InputError as e:
            if exporter is not None and not isinstance(e, DiskError):
                # the source itself is bad (a NaN or infinite weight, a truncated or unreadable file): no --resume
                # can succeed on it, so nothing is left beside the export path. A full or failing disk keeps the blocks.
                shutil.rmtree(exporter.work, ignore_errors=True)
            raise
        self._note_conv1d(exporter)
        return report, out

    def _sweep_report(self, exporter: Exporter, compress_s: float, how: dict) -> dict:
        world = self.world
        run = {"device": str(world.device), "world_size": world.size, **({"backend": world.backend} if world.backend else {}),
               **({"activations": how["activations"]} if how["activations"] else {})}
        if world.device.type == "cuda":
            run["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(world.device) / 2**20, 1)
        return {
            "schema": REPORT_SCHEMA,
            "kind": "run",
            "recipe": self.recipe.resolved(),
            "model": _model_section(self.original_source),
            "layers": [asdict(r) for r in exporter.layers],
            "time": {"compress_s": round(compress_s, 1), "block_s": exporter.block_seconds},
            "run": run,
            "compress_peak_rss_mb": peak_rss_mb(),  # before evaluation loads whole models
        }

    def _note_conv1d(self, exporter: Exporter) -> None:
        """Say which runtimes cannot load the export and refuse it (compress.json ``runtimes``)."""
        if isinstance(exporter, GGUFExporter):
            self.hooks.log(f"wrote {exporter.target / 'model.gguf'}: a GGUF file for llama.cpp (compress eval/inspect/load read it too)")
            return
        for runtime, r in exporter.refusals.get("refuses", {}).items():
            self.hooks.log(f"note: {runtime} does not serve this export ({r['why']}); it loads in {', '.join(exporter.refusals['loads'])}")


def _blocks(source: ModelSource, model) -> tuple[str, int]:
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))
    return blocks_path, len(blocks)


def _model_section(source: ModelSource) -> dict:
    return {"path": str(source.path), "model_type": source.config.model_type, "size_bytes": source.disk_bytes()}


def _read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())

