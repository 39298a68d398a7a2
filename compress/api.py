"""The Python API under the CLI: run a recipe, evaluate, inspect.

    import compress
    report = compress.run(compress.load_recipe("recipe.yaml", ["passes.0.gptq.bits=3"]))
    model = compress.load("out/smollm2-w4")
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compress.data import calibration_windows, eval_windows, load_texts, tokenize
from compress.engine import compress_blocks
from compress.errors import UsageError
from compress.export import Exporter
from compress.families import find_blocks
from compress.modelio import ModelSource, resolve_model
from compress.passes import Context, get_pass
from compress.recipe import Recipe, dump_recipe

REPORT_SCHEMA = "compress.report/1"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Hooks:
    """How the library talks to its caller (the CLI renders these with rich)."""

    def log(self, msg: str) -> None:
        pass

    def progress(self, task: str, done: int, total: int) -> None:
        pass


def _storage_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return getattr(torch, dt) if isinstance(dt, str) else dt


def run(recipe: Recipe, *, resume: bool = False, hooks: Hooks | None = None) -> dict:
    """Compress, export, evaluate; returns the report (also saved as report.json in the export)."""
    hooks = hooks or Hooks()
    t_start = time.time()
    torch.manual_seed(recipe.seed)
    if not recipe.export.path:
        raise UsageError("export.path: where to write the compressed checkpoint is not set (use -o/--output or --set export.path=DIR)")
    if not recipe.passes:
        raise UsageError("passes: the recipe has no passes; add e.g. `- gptq: {bits: 4, group_size: 64}`")
    source = ModelSource(resolve_model(recipe.model, log=hooks.log))
    dtype = _storage_dtype(source.config)
    passes = [get_pass(name)(cfg, Context(dtype=dtype)) for name, cfg in recipe.pass_configs()]
    model = source.skeleton()
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))

    cal = recipe.calibration
    calib = None
    if cal.samples > 0:
        ids = tokenize(load_texts(cal.data, "calibration", cal.text_field), source.tokenizer)
        calib = calibration_windows(ids, cal.samples, cal.seq_len, cal.sampling, recipe.seed)

    exporter = Exporter(
        Path(recipe.export.path), source, recipe.fingerprint(), blocks_path, len(blocks), dtype,
        overwrite=recipe.export.overwrite, resume=resume,
    )
    start, cached = exporter.begin()
    if start:
        hooks.log(f"resuming after block {start - 1} of {len(blocks)} from {exporter.work}")
    t0 = time.time()
    compress_blocks(
        source,
        model,
        passes,
        calib,
        cal.batch_size,
        sink=exporter.write_block,
        start=start,
        resume_inputs=cached,
        progress=lambda i, n, msg: hooks.progress("compress", i, n),
        sequential=cal.sequential,
    )
    compress_s = time.time() - t0 + sum(exporter.block_seconds[:start])
    report = {
        "schema": REPORT_SCHEMA,
        "recipe": recipe.resolved(),
        "model": {"path": str(source.path), "model_type": source.config.model_type, "size_bytes": source.disk_bytes()},
        "layers": [asdict(r) for r in exporter.layers],
        "time": {"compress_s": round(compress_s, 1), "block_s": exporter.block_seconds},
        "compress_peak_rss_mb": peak_rss_mb(),  # before evaluation loads whole models
    }
    out = exporter.finalize(model, dump_recipe(recipe), report)
    del model
    report["export"] = inspect_checkpoint(out)

    if recipe.eval.perplexity is not None:
        t1 = time.time()
        report["eval"] = evaluate(out, source.path if recipe.eval.baseline else None, recipe.eval.perplexity, hooks=hooks)
        report["time"]["eval_s"] = round(time.time() - t1, 1)
    report["time"]["total_s"] = round(time.time() - t_start, 1)
    report["peak_rss_mb"] = peak_rss_mb()
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    return report


def evaluate(model_ref, baseline_ref=None, ppl_cfg=None, *, hooks: Hooks | None = None) -> dict:
    """Perplexity of a model (and of a baseline, same windows) -> {"compressed"/"model", "baseline"}."""
    from compress.eval.perplexity import perplexity
    from compress.loading import load_source
    from compress.recipe import PerplexityConfig

    hooks = hooks or Hooks()
    ppl_cfg = ppl_cfg or PerplexityConfig()
    source = ModelSource(resolve_model(model_ref, log=hooks.log))
    ids = tokenize(load_texts(ppl_cfg.data, "eval"), source.tokenizer)
    windows = eval_windows(ids, ppl_cfg.seq_len, ppl_cfg.max_windows)
    result: dict = {"data": ppl_cfg.data, "seq_len": ppl_cfg.seq_len}
    for key, ref in (("baseline", baseline_ref), ("model", model_ref)):
        if ref is None:
            continue
        src = source if ref is model_ref else ModelSource(resolve_model(ref, log=hooks.log))
        model = load_source(src)
        hooks.log(f"perplexity of {src.path} on {len(windows)} windows of {ppl_cfg.seq_len} tokens")
        result[key] = perplexity(model, windows, ppl_cfg.batch_size, lambda d, n: hooks.progress(f"eval {key}", d, n))
        del model
    if "baseline" in result:
        b, m = result["baseline"]["perplexity"], result["model"]["perplexity"]
        result["ppl_increase"] = round(m / b - 1, 5)
    return result


def inspect_checkpoint(path) -> dict:
    """Layers, schemes, bits per parameter and size on disk of a checkpoint folder."""
    from compress.formats import read_quantization_config
    from compress.loading import quantized_layer_names
    source = ModelSource(resolve_model(path))
    size = source.disk_bytes()
    quantized = set(quantized_layer_names(source))
    info = source.tensor_info(list(source.weight_map))
    shapes = source.read([f"{q}.weight_shape" for q in quantized])
    bits = 8 * sum(nbytes for _, nbytes in info.values())
    n_params = sum(math.prod(shapes[q + ".weight_shape"].tolist()) for q in quantized)  # original weights
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
    return out
