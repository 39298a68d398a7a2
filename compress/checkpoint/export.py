"""Export: a compressed-tensors checkpoint, written block by block, atomically, resumably.

Layout of the output folder (what vLLM and transformers read unchanged):

    config.json                      the model config + ``quantization_config`` (compressed-tensors)
    model-0000k-of-0000N.safetensors for k <= m: everything outside the decoder blocks (embeddings,
                                     norm, head), in shards of at most 256 MB
    model-0000k-of-0000N.safetensors for k > m: decoder block k-m-1 (packed weights, scales, zero
                                     points, g_idx)
    model.safetensors.index.json     tensor -> shard
    tokenizer files, generation_config.json
    compress.json                    our metadata: the passes' sections (sparsity structure, targets and
                                     each layer's sparsity; low-rank ranks; ...)
    recipe.yaml                      the resolved recipe that produced it
    report.json                      the run's report

Everything is written into ``.<name>.partial`` beside the target; each finished block is flushed
to its shard immediately (so memory does not grow with the model) together with the activations
the next block needs, so ``--resume`` continues from the last finished block. Only a complete,
verified folder is renamed to the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.arch.adapt import transformers_names
from compress.checkpoint.formats import quantization_config
from compress.checkpoint.source import METADATA, METADATA_FORMAT, ModelSource
from compress.engine.inputs import BlockInputs
from compress.engine.records import BlockResult, LayerReport
from compress.errors import InputError, UsageError
from compress.modules import compressed_modules, quant_spec
from compress.utils import atomic_torch_save, atomic_write_text

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _size_groups(source: ModelSource, names: list[str], limit: int = 256 * 2**20) -> list[list[str]]:
    """Consecutive groups of tensors of at most ``limit`` bytes each (a larger tensor alone)."""
    sizes = {n: nbytes for n, (_, nbytes) in source.tensor_info(names).items()}
    groups: list[list[str]] = []
    total = limit
    for n in names:
        if total + sizes[n] > limit:
            groups.append([])
            total = 0
        groups[-1].append(n)
        total += sizes[n]
    return groups


class Exporter:
    """Receives finished blocks from the engine (``write_block``) and assembles the checkpoint."""

    def __init__(
        self, target: Path, source: ModelSource, fingerprint: str, blocks_path: str, n_blocks: int, dtype: torch.dtype,
        *, overwrite=False, resume=False, lowrank: str = "factored",
    ):
        self.target = Path(target)
        self.work = self.target.parent / f".{self.target.name}.partial"
        self.source, self.fingerprint, self.n_blocks, self.dtype = source, fingerprint, n_blocks, dtype
        # Tensors outside the blocks are copied at the end, a bounded shard at a time: holding
        # them all (two 200 MB embeddings in a 2B model) would set the run's peak memory.
        self.outside = _size_groups(source, [n for n in source.weight_map if not n.startswith(blocks_path + ".")])
        self.total = len(self.outside) + n_blocks
        self.weight_map: dict[str, str] = {}
        self.layers: list[LayerReport] = []
        self.block_seconds: list[float] = []
        self.quantized: dict[str, dict] = {}  # full name -> its scheme (for the config's groups)
        if self.target.exists() and not overwrite:
            raise UsageError(f"{self.target}: already exists; pass --overwrite to replace it, or choose another export path")
        self.resume = resume
        self.lowrank = lowrank  # "factored" or "merged" (ExportConfig.lowrank)

    # ---------------------------------------------------------------- progress / resume

    def begin(self) -> tuple[int, BlockInputs | None]:
        """Prepare the work folder; returns (first block to run, cached inputs when resuming)."""
        prog = self.work / "progress.json"
        if self.resume and prog.exists():
            p = json.loads(prog.read_text())
            if p["fingerprint"] != self.fingerprint:
                raise UsageError(
                    f"{self.work}: the interrupted run there used a different model, calibration or passes; "
                    "run without --resume to start over"
                )
            self.weight_map = p["weight_map"]
            self.layers = [LayerReport(**d) for d in p["layers"]]
            self.block_seconds = p["block_seconds"]
            self.quantized = p["quantized"]
            inputs = torch.load(self.work / "inputs.pt", weights_only=False) if (self.work / "inputs.pt").exists() else None
            return p["done"], inputs
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        return 0, None

    def write_block(self, res: BlockResult, inputs: BlockInputs | None) -> None:
        state = res.module.state_dict()
        if self.lowrank == "merged":  # containers of factors (low-rank B·A) back into one dense weight
            for name, mod in compressed_modules(res.module):
                if mod.merge_on_export:
                    state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
                    state.update({f"{name}.{k}": v for k, v in mod.merged().state_dict().items()})
        tensors = {}
        for name, t in state.items():
            if t.is_floating_point() and not name.endswith("weight_scale"):
                t = t.to(self.dtype)  # norms and unquantized weights go back to the storage dtype
            tensors[res.prefix + name] = t.contiguous()
        for name, mod in res.module.named_modules():
            spec = quant_spec(mod)
            if spec is not None:
                self.quantized[res.prefix + name] = spec
        fname = shard_name(len(self.outside) + res.index + 1, self.total)
        save_file(tensors, self.work / fname, metadata={"format": "pt"})
        self.weight_map.update({k: fname for k in tensors})
        self.layers.extend(res.layers)
        self.block_seconds.append(round(res.seconds, 3))
        if inputs is not None:
            atomic_torch_save(inputs, self.work / "inputs.pt")
        state = {
            "fingerprint": self.fingerprint,
            "done": res.index + 1,
            "weight_map": self.weight_map,
            "layers": [vars(r) for r in self.layers],
            "block_seconds": self.block_seconds,
            "quantized": self.quantized,
        }
        atomic_write_text(self.work / "progress.json", json.dumps(state))

    # ---------------------------------------------------------------- finalize

    def finalize(self, model: nn.Module, recipe_yaml: str, report: dict, sections: dict) -> Path:
        """Write everything but the blocks, verify, and rename the work folder to the target.
        ``sections``: the passes' sections of ``compress.json`` (``Pass.export_metadata``)."""
        src = self.source
        for k, names in enumerate(self.outside, 1):
            fname = shard_name(k, self.total)
            save_file({n: t.contiguous() for n, t in src.read(names).items()}, self.work / fname, metadata={"format": "pt"})
            self.weight_map.update({n: fname for n in names})

        total_size = sum((self.work / f).stat().st_size for f in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        if self.quantized:  # a pruned-only model is a plain checkpoint: no quantization_config
            cfg["quantization_config"] = self._quant_config(model)
        (self.work / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (self.work / METADATA).write_text(json.dumps(self.metadata(sections), indent=2))
        for f in TOKENIZER_FILES:
            if (src.path / f).exists():
                shutil.copy2(src.path / f, self.work / f)
        (self.work / "recipe.yaml").write_text(recipe_yaml)
        (self.work / "report.json").write_text(json.dumps(report, indent=2))
        self._verify()
        for f in ("progress.json", "inputs.pt"):
            (self.work / f).unlink(missing_ok=True)
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old"
            self.target.rename(old)
            self.work.rename(self.target)
            shutil.rmtree(old)
        else:
            self.work.rename(self.target)
        return self.target

    @staticmethod
    def metadata(sections: dict) -> dict:
        """Our own description of the checkpoint beyond what compressed-tensors records (it
        declares no sparsity: current vLLM refuses a 2:4 ``sparsity_config``, so ours lives
        here): the format version, then the passes' sections in name order (``lowrank``,
        ``sparsity``, ...), whatever the order of the passes."""
        return {"format": METADATA_FORMAT, **dict(sorted(sections.items()))}

    def _quant_config(self, model: nn.Module) -> dict:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in self.quantized]
        groups: dict[tuple, list[str]] = {}
        for name, spec in self.quantized.items():
            key = (spec["bits"], spec["group_size"], spec["symmetric"], spec["act_order"], bool(spec.get("activations")))
            groups.setdefault(key, []).append(name)
        ignore = transformers_names(model, [n for n in linears if n not in self.quantized])
        single = len(groups) == 1
        return quantization_config(
            [
                {"targets": ["Linear"] if single else transformers_names(model, names), "bits": b, "group_size": g, "symmetric": s, "act_order": a,
                 "activations": {"bits": 8, "dynamic": True} if w8a8 else None}
                for (b, g, s, a, w8a8), names in groups.items()
            ],
            ignore=ignore,
        )

    def _verify(self) -> None:
        """Every tensor of the index is in its shard, and every shard opens."""
        by_file: dict[str, set] = {}
        for k, f in self.weight_map.items():
            by_file.setdefault(f, set()).add(k)
        for f, keys in by_file.items():
            try:
                with safe_open(self.work / f, "pt") as h:
                    missing = keys - set(h.keys())
            except Exception as e:
                raise InputError(f"{self.work / f}: the shard just written cannot be read back ({e})") from e
            if missing:
                raise InputError(f"{self.work / f}: tensors missing after writing: {sorted(missing)[:5]}")

