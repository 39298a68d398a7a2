"""``compress.run``: compress a model with a recipe, export it, evaluate it, check the gates.

The run is a pipeline of stages (docs/architecture.md): the layer-wise sweep of the block-scope
stages (``compress.engine``) writes an export; the model-scope stage (``compress.engine.model``)
transforms that checkpoint where a pass asks for it; then evaluation, the report and the gates.
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
from compress.checkpoint.source import ModelSource, resolve_model
from compress.data import calibration_set
from compress.engine import SweepOptions, check_plan, compress_blocks
from compress.engine.dist import World, close_world, init_world
from compress.engine.model import (
    ModelStage,
    clean_model_stage,
    mark_sweep_done,
    run_model_stage,
    staged,
    sweep_done,
)
from compress.errors import InputError, JobError, UsageError
from compress.passes import Context, JobView, Pass, get_pass
from compress.recipe import Recipe, dump_recipe
from compress.utils import DiskError, peak_rss_mb, size_words


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
    return calibration_set(cal, source.tokenizer, recipe.seed)


COPIED = ("config.json", *TOKENIZER_FILES)  # the source's files an export holds a copy of (or a version of)


class Job:
    """One run of a recipe: its source, passes, calibration and where it writes."""

    def __init__(self, recipe: Recipe, resume: bool, hooks: Hooks, world: World):
        self.recipe, self.resume, self.hooks, self.world = recipe, resume, hooks, world
        self.t_start = time.time()

    def _prepare(self) -> None:
        """Everything checked before any output folder is created."""
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        if not recipe.export.path:
            raise UsageError("export.path: where to write the compressed checkpoint is not set (use -o/--output or --set export.path=DIR)")
        if not recipe.passes:
            raise UsageError("passes: the recipe has no passes; add e.g. `- gptq: {bits: 4, group_size: 64}`")
        self.source = ModelSource(resolve_model(recipe.model, log=self.hooks.log))
        self.source.verify()  # a truncated or corrupt weights file stops here (exit 3), not minutes into the run
        check_eval_config(recipe.eval, recipe.eval.baseline)  # before minutes of compression, not after
        self.source.check_seq_len(recipe.seq_lens())  # windows longer than the model's positions: exit 2
        self.dtype = storage_dtype(self.source.config)
        self.passes = [get_pass(name)(cfg, Context(dtype=self.dtype, seed=recipe.seed)) for name, cfg in recipe.pass_configs()]
        self.model = self.source.skeleton()
        self.calib = _calibration(recipe, self.source, self.passes, self.hooks)
        job = JobView(self.passes, self.calib, recipe.export, self.source.config)
        for k, p in enumerate(self.passes):
            p.validate(k, job)
        check_plan(self.source, self.model, self.passes)  # bad options fail here, before anything is written
        self.model_passes = [p for p in self.passes if p.in_stage("transform_model")]
        if recipe.export.format == "gguf":  # an architecture llama.cpp does not read: exit 2 before any work
            arch_for(self.source.config)
            read_tokenizer(self.source.path)
            if self.model_passes:
                raise UsageError(f"passes: {self.model_passes[0].name} transforms the whole model after the sweep; a GGUF "
                                 "export is written by the sweep: export to compressed-tensors, then convert")
        self.target = Path(recipe.export.path)
        if self.model_passes:  # the sweep exports beside the target: its own check would not see it
            check_target(self.target, recipe.export.overwrite)

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
        src, copies = self.source, 2 if self.model_passes else 1  # a model stage writes a second checkpoint
        export = (export_bound(src.tensor_info(list(src.weight_map)), self.dtype.itemsize) + copied_bytes(src.path, COPIED)) * copies
        state = 0 if self.calib is None else activation_bytes(*self.calib.shape[:2], getattr(src.config, "hidden_size", 0) or 0)
        kept = [work_folder(self.target), work_folder(staged(self.target))] + [staged(self.target, k) for k in range(len(self.model_passes))]
        done = sum(folder_bytes(f) for f in kept) if self.resume else 0
        self.needed = export + state
        what = (f"the export, at most {size_words(export)}" + (" (two checkpoints: the model stage's input and output)" if copies > 1 else "")
                + (f", and the resume state, {size_words(state)}" if state else "") + (f", less {size_words(done)} already written" if done else ""))
        return claim(self.target, max(0, self.needed - done), what)

    def _run(self) -> dict:
        recipe, model_passes = self.recipe, self.model_passes
        # with a model-scope stage the sweep exports beside the target (kept until the end, so
        # --resume skips the sweep), and the model stage writes the target
        sweep_out = staged(self.target) if model_passes else self.target
        key = recipe.fingerprint(passes=len(self.passes) - len(model_passes))
        report, out = None, sweep_out
        if model_passes and self.resume and sweep_done(self.target, key):
            self.hooks.log(f"the compressed student in {sweep_out} is complete: resuming with {model_passes[0].name}")
            report = _read_report(sweep_out)
        if report is None:
            report, out = self._sweep(sweep_out)
            if not self.world.main:  # rank 0 exports, runs the model stage and evaluates on its own
                return {"rank": self.world.rank, "world_size": self.world.size}
            if model_passes:
                mark_sweep_done(self.target, key)
        del self.model
        for p in self.passes:
            report.update(p.summarize(report["layers"]))
        if model_passes:
            out = self._model_stage(report)
        report["export"] = inspect_checkpoint(out)
        self._evaluate(report, out)
        report["time"]["total_s"] = round(time.time() - self.t_start, 1)
        report["peak_rss_mb"] = peak_rss_mb()
        write_reports(report, out)
        if model_passes:
            clean_model_stage(model_passes, self.target)
        check_gates(report)
        return report

    def _model_stage(self, report: dict) -> Path:
        stage = ModelStage(staged(self.target), self.source.path, self.target, self.calib, self.resume,
                           self.recipe.export.overwrite, self.hooks)
        out, sections = run_model_stage(self.model_passes, self.target, stage)
        report.update(sections)
        return out

    def _evaluate(self, report: dict, out: Path) -> None:
        recipe = self.recipe
        if recipe.eval.perplexity is None and not recipe.eval.tasks:
            return
        t1 = time.time()
        report["eval"] = evaluate(out, self.source.path if recipe.eval.baseline else None, recipe.eval, seed=recipe.seed, hooks=self.hooks)
        if self.model_passes and recipe.eval.perplexity is not None:  # the checkpoint before the model stage, same protocol
            before = evaluate(staged(self.target), None, recipe.eval.perplexity, seed=recipe.seed, hooks=self.hooks)
            for p in self.model_passes:
                p.report_eval(report, report["eval"], before)
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
                            overwrite=recipe.export.overwrite or bool(self.model_passes), resume=self.resume,
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
            sections = {}
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
            "model": {"path": str(self.source.path), "model_type": self.source.config.model_type, "size_bytes": self.source.disk_bytes()},
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


def _read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())

