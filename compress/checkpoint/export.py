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
verified folder is renamed to the target (an earlier export there is deleted once the new one is
in place: ``compress.checkpoint.files.install``).

Every file is written to a temporary name and renamed (never half a file at a final name; the
temporary file goes on failure). A full, read-only or failing disk raises ``DiskError`` (exit 3)
naming the cause in words; the finished blocks stay in the work folder for ``--resume``.
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
from compress.checkpoint.files import (
    RETRY,
    check_target,
    disk_writes,
    install,
    work_folder,
)
from compress.checkpoint.formats import quantization_config
from compress.checkpoint.source import METADATA, METADATA_FORMAT, ModelSource
from compress.engine.inputs import BlockInputs
from compress.engine.records import BlockResult, LayerReport
from compress.errors import InputError, UsageError
from compress.modules import compressed_modules, quant_spec
from compress.utils import (
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    remove_quietly,
)

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


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


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
        *, overwrite=False, resume=False, lowrank: str = "factored", needed: int = 0,
    ):
        self.target = Path(target)
        self.work = work_folder(self.target)
        self.source, self.fingerprint, self.n_blocks, self.dtype = source, fingerprint, n_blocks, dtype
        # Tensors outside the blocks are copied at the end, a bounded shard at a time: holding
        # them all (two 200 MB embeddings in a 2B model) would set the run's peak memory.
        self.outside = _size_groups(source, [n for n in source.weight_map if not n.startswith(blocks_path + ".")])
        self.total = len(self.outside) + n_blocks
        self.weight_map: dict[str, str] = {}
        self.layers: list[LayerReport] = []
        self.block_seconds: list[float] = []
        self.quantized: dict[str, dict] = {}  # full name -> its scheme (for the config's groups)
        check_target(self.target, overwrite)  # a file there is refused even with --overwrite (exit 2)
        self.resume = resume
        self.lowrank = lowrank  # "factored" or "merged" (ExportConfig.lowrank)
        self.needed = needed  # the bytes the run needs (the pre-flight estimate), for a full disk's message
        self.done = 0  # blocks finished and flushed

    def _disk(self):
        """Disk failures while writing, as DiskError with what is kept and what to do."""
        n = self.done
        if not n:
            return disk_writes(RETRY, self.needed, self.work)
        kept = f"{n} finished block{'s are' if n > 1 else ' is'} kept in {self.work}: "
        return disk_writes(f"{kept}{RETRY} (or delete that folder to start over)", self.needed, self.work)

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
            saved = p.get("inputs", "inputs.pt")  # None: a data-free run; "inputs.pt": a folder from before the record named it
            inputs = torch.load(self.work / saved, weights_only=False) if saved and (self.work / saved).is_file() else None
            self.done = p["done"]
            return p["done"], inputs
        with self._disk():
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
        self.weight_map.update({k: fname for k in tensors})
        self.layers.extend(res.layers)
        self.block_seconds.append(round(res.seconds, 3))
        saved = f"inputs-{res.index + 1:05d}.pt"  # the activations entering the next block
        state = {
            "fingerprint": self.fingerprint,
            "done": res.index + 1,
            "inputs": saved if inputs is not None else None,
            "weight_map": self.weight_map,
            "layers": [vars(r) for r in self.layers],
            "block_seconds": self.block_seconds,
            "quantized": self.quantized,
        }
        # the shard, the activations after it (a new file: the record names the one entering its next
        # block), then the record that counts the block as done: a failure before the record leaves
        # the previous record and its activations whole, and --resume redoes this block
        with self._disk():
            _save_shard(tensors, self.work / fname)
            if inputs is not None:
                atomic_torch_save(inputs, self.work / saved)
            atomic_write_text(self.work / "progress.json", json.dumps(state))
        self.done = res.index + 1
        self._drop_inputs(keep=saved)

    def _drop_inputs(self, keep: str | None = None) -> None:
        for f in self.work.glob("inputs*.pt"):
            if f.name != keep:
                remove_quietly(f)

    # ---------------------------------------------------------------- finalize

    def finalize(self, model: nn.Module, recipe_yaml: str, report: dict, sections: dict) -> Path:
        """Write everything but the blocks, verify, and rename the work folder to the target.
        ``sections``: the passes' sections of ``compress.json`` (``Pass.export_metadata``)."""
        src = self.source
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        if self.quantized:  # a pruned-only model is a plain checkpoint: no quantization_config
            cfg["quantization_config"] = self._quant_config(model)
        with self._disk():
            for k, names in enumerate(self.outside, 1):
                fname = shard_name(k, self.total)
                _save_shard({n: t.contiguous() for n, t in src.read(names).items()}, self.work / fname)
                self.weight_map.update({n: fname for n in names})
            total_size = sum((self.work / f).stat().st_size for f in set(self.weight_map.values()))
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            texts = {"model.safetensors.index.json": json.dumps(index, indent=2), "config.json": json.dumps(cfg, indent=2, sort_keys=True),
                     METADATA: json.dumps(self.metadata(sections), indent=2), "recipe.yaml": recipe_yaml,
                     "report.json": json.dumps(report, indent=2)}
            for name, text in texts.items():
                atomic_write_text(self.work / name, text)
            for f in TOKENIZER_FILES:
                if (src.path / f).exists():
                    atomic_write(self.work / f, lambda tmp, f=f: shutil.copy2(src.path / f, tmp))
            self._verify()
            self._drop_inputs()
        # progress.json stays until the export is in place: a failed rename leaves a resumable folder
        install(self.work, self.target)
        remove_quietly(self.target / "progress.json")
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

