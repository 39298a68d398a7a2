"""Export: a compressed-tensors checkpoint, written block by block, atomically, resumably.

Layout of the output folder (what vLLM and transformers read unchanged):

    config.json                      the model config + ``quantization_config`` (compressed-tensors)
    model.safetensors                every tensor, when they fit in one shard (``max_shard_size``)
    model-0000k-of-0000N.safetensors otherwise: shards of at most ``max_shard_size`` bytes of tensors
                                     each (a tensor larger than that alone), as transformers writes
                                     them: decoder blocks in order, then what is outside them
                                     (embeddings, norm, head)
    model.safetensors.index.json     tensor -> shard (only with several shards)
    tokenizer files, generation_config.json
    compress.json                    our metadata: the passes' sections (sparsity structure, targets and
                                     each layer's sparsity; low-rank ranks; ...) and, where a runtime would
                                     load it wrongly, ``runtimes``: those that load it, why and how the
                                     others refuse (``Exporter._refuse_transformers``)
    recipe.yaml                      the resolved recipe that produced it
    report.json                      the run's report

Modules outside the blocks that a pass compressed (a quantized token embedding, an lm_head:
``Pass.apply_outside``) arrive before block 0 or after the last block (``write_outside``) and wait in
their own files (``block-outside-before.safetensors``, ``block-outside-after.safetensors``) until
``finalize`` adds them with the other tensors outside the blocks; the source tensors they replace are
not copied.

Everything is written into ``.<name>.partial`` beside the target. Each finished block is flushed
at once to its own file there (``block-0000k.safetensors``, so memory does not grow with the model)
together with the activations the next block needs, so ``--resume`` continues from the last
finished block. Whenever the blocks waiting there hold more than ``max_shard_size`` bytes, a shard
is assembled from them by copying bytes file to file (``shard-0000k.safetensors``; one tensor in
memory at a time, never a shard) and the block files it took are deleted; the work folder holds at
most about one shard beyond the shards themselves. ``finalize`` adds the tensors outside the blocks
(copied byte for byte from the source's files), writes the last shards, and names them as
transformers does (``model.safetensors`` alone, or ``model-0000k-of-0000N`` with an index). Only a
complete, verified folder is renamed to the target (an earlier export there is deleted once the
new one is in place: ``compress.checkpoint.files.install``).

Every file is written to a temporary name and renamed (never half a file at a final name; the
temporary file goes on failure). A full, read-only or failing disk raises ``DiskError`` (exit 3)
naming the cause in words; the finished blocks stay in the work folder for ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
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
from compress.checkpoint.formats import (
    EMBEDDING_TARGET,
    quantization_config,
    read_quantization_config,
)
from compress.checkpoint.source import METADATA, METADATA_FORMAT, ModelSource
from compress.engine.inputs import BlockInputs
from compress.engine.records import BlockResult, LayerReport, OutsideResult
from compress.errors import InputError, UsageError
from compress.modules import (
    ALL_RUNTIMES,
    COMPRESS,
    TRANSFORMERS,
    compressed_modules,
    quant_spec,
    runtime_context,
    scheme_refusals,
)
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


DEFAULT_MAX_SHARD_SIZE = 4 * 10**9  # "4GB": see ExportConfig.max_shard_size
# bytes per element of each safetensors dtype (a shard orders its tensors by it, widest first, so
# every tensor starts at a multiple of its own element size, as safetensors' own writer does)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_COPY_CHUNK = 16 * 2**20
# what transformers shows (pydantic prints it whole up to 50 characters) when it refuses an export
# it would load as a different model (Exporter._refuse_transformers)
REFUSAL = "transformers cannot load this; see compress.json"  # bytes copied at a time when a shard is assembled
# why only compress.load serves an export with an online rotation (compress.quant.online)
ONLINE_WHY = ("an online Hadamard rotation of each down_proj's input (compress.json rotation.r4), which only compress.load "
              "computes: transformers does not apply compressed-tensors transforms, and vLLM's read per-layer matrices stored "
              "in the checkpoint (its 'hadamard' type: the CUDA hadacore kernel); drop r4 (--r4) for an export every runtime loads")
OUTSIDE_PART = "block-outside-{}.safetensors"  # the compressed modules outside the blocks, by phase, until finalize shards them


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def final_names(n: int) -> list[str]:
    """The names transformers gives ``n`` shards: ``model.safetensors`` alone, else numbered."""
    return ["model.safetensors"] if n == 1 else [shard_name(k, n) for k in range(1, n + 1)]


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, {tensor: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _data_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (its size less the header)."""
    return sum(e - b for b, e in (h["data_offsets"] for h in read_header(path)[1].values()))


def _copy(src, dst, n: int, what: str) -> None:
    while n > 0:
        chunk = src.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise InputError(f"{what}: the file ended before the tensor's bytes (truncated while the export ran?)")
        dst.write(chunk)
        n -= len(chunk)


def write_shard(path: Path, entries: list[tuple[str, Path]]) -> None:
    """One safetensors file at ``path`` holding the tensors ``entries`` (name, the safetensors
    file holding it), their bytes copied file to file: no tensor is decoded and at most
    ``_COPY_CHUNK`` bytes are in memory. Written atomically (``atomic_write``)."""
    headers = {f: read_header(f) for f in {f for _, f in entries}}
    order = sorted(entries, key=lambda e: (-_ITEMSIZE.get(headers[e[1]][1][e[0]]["dtype"], 1), e[0]))
    table, pos = {}, 0
    for name, f in order:
        h = headers[f][1][name]
        b, e = h["data_offsets"]
        table[name] = {"dtype": h["dtype"], "shape": h["shape"], "data_offsets": [pos, pos + e - b]}
        pos += e - b
    head = json.dumps({"__metadata__": {"format": "pt"}, **table}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        handles: dict[Path, object] = {}
        try:
            with open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(head)) + head)
                for name, f in order:
                    if f not in handles:
                        handles[f] = open(f, "rb")
                    start, h = headers[f]
                    b, e = h[name]["data_offsets"]
                    handles[f].seek(start + b)
                    _copy(handles[f], out, e - b, str(f))
        finally:
            for h in handles.values():
                h.close()

    atomic_write(path, write)


class Exporter:
    """Receives finished blocks from the engine (``write_block``) and assembles the checkpoint.
    ``max_shard_size``: bytes of tensors per shard (``ExportConfig.max_shard_size``)."""

    def __init__(
        self, target: Path, source: ModelSource, fingerprint: str, blocks_path: str, n_blocks: int, dtype: torch.dtype,
        *, overwrite=False, resume=False, lowrank: str = "factored", needed: int = 0, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ):
        self.target = Path(target)
        self.work = work_folder(self.target)
        self.source, self.fingerprint, self.n_blocks, self.dtype = source, fingerprint, n_blocks, dtype
        # tensors outside the blocks: copied byte for byte from the source's files at the end
        self.outside = [n for n in source.weight_map if not n.startswith(blocks_path + ".")]
        self.blocks_path = blocks_path
        # compressed modules outside the blocks: [tensor, file, bytes] waiting for finalize, and the
        # source tensors they replace (not copied)
        self.outside_entries: list[list] = []
        self.replaced: list[str] = []
        self.saved_inputs: str | None = None  # the resume state's activations file the record names
        self.limit = int(max_shard_size)
        self.shards: list[str] = []  # shards written, in order (work names until finalize gives the final ones)
        self.pending: list[list] = []  # [tensor, file, bytes] waiting for a shard, in order (file: a block's)
        self.outside_added = False  # the tensors outside the blocks are in pending or shards
        self.weight_map: dict[str, str] = {}  # tensor -> its shard
        self.layers: list[LayerReport] = []
        self.block_seconds: list[float] = []
        self.quantized: dict[str, dict] = {}  # full name -> its scheme (for the config's groups)
        self.factored: list[str] = []  # layers stored as factors (containers not merged): no other runtime reads them
        # layers in a format of their own (no quantization_config group: codebooks, ...) that a runtime
        # cannot read: {runtime: {why (the module type's refusal), layers}}
        self.unread: dict[str, dict] = {}
        self.refusals: dict = {}  # set by finalize: the runtimes that load the export, and why and how the others refuse it
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
            if "pending" not in p:
                raise UsageError(f"{self.work}: the interrupted run there was written by an older compress (one file per block); "
                                 "run without --resume to start over")
            if p["max_shard_size"] != self.limit:
                raise UsageError(f"{self.work}: the interrupted run there writes shards of at most {p['max_shard_size']:,} bytes, "
                                 f"not {self.limit:,}; resume with the same export.max_shard_size (--max-shard-size), or run "
                                 "without --resume to start over")
            self.weight_map, self.shards, self.pending = p["weight_map"], p["shards"], p["pending"]
            self.outside_added = p.get("outside_added", False)
            self.layers = [LayerReport(**d) for d in p["layers"]]
            self.block_seconds = p["block_seconds"]
            self.quantized = p["quantized"]
            self.factored = p.get("factored", [])
            self.unread = p.get("unread", {})
            self.outside_entries, self.replaced = p.get("outside_entries", []), p.get("replaced", [])
            saved = p.get("inputs", "inputs.pt")  # None: a data-free run; "inputs.pt": a folder from before the record named it
            self.saved_inputs = saved
            inputs = torch.load(self.work / saved, weights_only=False) if saved and (self.work / saved).is_file() else None
            self.done = p["done"]
            return p["done"], inputs
        with self._disk():
            if self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
        return 0, None

    def _tensors(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """What ``module`` (a finished block, or the modules outside the blocks) stores, under
        ``prefix``; its quantized layers' schemes and its factored layers are noted."""
        state = module.state_dict()
        if self.lowrank == "merged":  # containers of factors (low-rank B·A) back into one dense weight
            for name, mod in compressed_modules(module):
                if mod.merge_on_export:
                    state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
                    state.update({f"{name}.{k}": v for k, v in mod.merged().state_dict().items()})
        tensors = {}
        for name, t in state.items():
            if t.is_floating_point() and not name.endswith("weight_scale"):
                t = t.to(self.dtype)  # norms and unquantized weights go back to the storage dtype
            tensors[prefix + name] = t.contiguous()
        for name, mod in module.named_modules():
            spec = quant_spec(mod)
            if spec is not None:
                self.quantized[prefix + name] = spec
        for name, mod in compressed_modules(module):
            if mod.container and not (self.lowrank == "merged" and mod.merge_on_export):
                self.factored.append(prefix + name)
            elif not mod.container and mod.quant_spec() is None:  # stored outside compressed-tensors' groups
                for runtime in ALL_RUNTIMES:
                    if (why := mod.refusal({}, runtime)) is not None:
                        self.unread.setdefault(runtime, {"why": why, "layers": []})["layers"].append(prefix + name)
        return tensors

    def write_outside(self, res: OutsideResult) -> None:
        """The compressed modules outside the blocks (``res.module`` holds them at their full
        names) of one phase (before block 0, after the last block): kept in the phase's own file
        until ``finalize``; ``res.replaces`` (the source's tensors they stand for) are not copied.
        A resumed run that redoes the phase writes the same file again."""
        tensors = self._tensors(res.module, "")
        part = OUTSIDE_PART.format(res.phase)
        entries = [[k, part, t.numel() * t.element_size()] for k, t in tensors.items()]
        with self._disk():
            _save_shard(tensors, self.work / part)
            self.outside_entries = [e for e in self.outside_entries if e[1] != part] + entries
            self.replaced = sorted(set(self.replaced) | set(res.replaces))
            self.layers = [r for r in self.layers if r.name not in {l.name for l in res.layers}] + list(res.layers)
            self._record(self.saved_inputs)

    def write_block(self, res: BlockResult | OutsideResult, inputs: BlockInputs | None) -> None:
        """The sweep's sink: a finished block (and the activations entering the next), or the
        compressed modules outside the blocks, before block 0 or after the last (``write_outside``)."""
        if isinstance(res, OutsideResult):
            self.write_outside(res)
            return
        tensors = self._tensors(res.module, res.prefix)
        part = f"block-{res.index + 1:05d}.safetensors"  # the block's own file until a shard takes its tensors
        entries = [[k, part, t.numel() * t.element_size()] for k, t in tensors.items()]
        self.layers.extend(res.layers)
        self.block_seconds.append(round(res.seconds, 3))
        saved = f"inputs-{res.index + 1:05d}.pt"  # the activations entering the next block
        # the block's file, the shards it completes, the activations after it (a new file: the record
        # names the one entering its next block), then the record that counts the block as done: a
        # failure before the record leaves the previous record, its block files and its activations
        # whole, and --resume redoes this block (and rewrites the same shards)
        with self._disk():
            _save_shard(tensors, self.work / part)
            del tensors
            self.pending.extend(entries)
            self._flush(final=False)
            if inputs is not None:
                atomic_torch_save(inputs, self.work / saved)
            self.done = res.index + 1
            self.saved_inputs = saved if inputs is not None else None
            self._record(self.saved_inputs)
        self._drop_inputs(keep=saved)
        self._drop_blocks()

    def _record(self, inputs: str | None) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "done": self.done,
            "inputs": inputs,
            "max_shard_size": self.limit,
            "shards": self.shards,
            "pending": self.pending,
            "outside_added": self.outside_added,
            "weight_map": self.weight_map,
            "layers": [vars(r) for r in self.layers],
            "block_seconds": self.block_seconds,
            "quantized": self.quantized,
            "factored": self.factored,
            "unread": self.unread,
            "outside_entries": self.outside_entries,
            "replaced": self.replaced,
        }
        atomic_write_text(self.work / "progress.json", json.dumps(state))

    def _file(self, f: str) -> Path:
        """A pending tensor's file: a block's in the work folder, or (outside the blocks) the source's."""
        return Path(f) if Path(f).is_absolute() else self.work / f

    def _flush(self, final: bool) -> None:
        """Write shards from the pending tensors: each the longest run of them, in order, whose bytes
        stay within the limit (a larger tensor alone), as long as more than a shard is pending
        (``final``: until none is). Where the cuts fall depends only on the tensors' order and
        sizes, so a resumed run writes the same shards."""
        while self.pending and (final or sum(e[2] for e in self.pending) > self.limit):
            n, size = 0, 0
            for e in self.pending:
                if n and size + e[2] > self.limit:
                    break
                n, size = n + 1, size + e[2]
            name = f"shard-{len(self.shards) + 1:05d}.safetensors"
            take, self.pending = self.pending[:n], self.pending[n:]
            write_shard(self.work / name, [(t, self._file(f)) for t, f, _ in take])
            self.shards.append(name)
            self.weight_map.update({t: name for t, _, _ in take})

    def _drop_blocks(self) -> None:
        """Block files whose tensors are all in shards (the record no longer names them)."""
        keep = {f for _, f, _ in self.pending} | ({f for _, f, _ in self.outside_entries} if not self.outside_added else set())
        for f in self.work.glob("block-*.safetensors"):
            if f.name not in keep:
                remove_quietly(f)

    def _drop_inputs(self, keep: str | None = None) -> None:
        for f in self.work.glob("inputs*.pt"):
            if f.name != keep:
                remove_quietly(f)

    def _final_shards(self, sentinel: str | None = None) -> None:
        """Every tensor in a shard (and the ``sentinel`` tensor, see ``_refuse_transformers``), and
        the shards under the names transformers reads. Safe to repeat after a failure (a resumed
        finalize): a shard already renamed is left as it is."""
        if not self.outside_added:
            copied = [n for n in self.outside if n not in set(self.replaced)]
            info = self.source.tensor_info(copied)
            self.pending.extend(self.outside_entries)
            self.pending.extend([n, str(Path(self.source.weight_map[n]).absolute()), info[n][1]] for n in copied)
            if sentinel is not None:
                _save_shard({sentinel: torch.zeros(0, dtype=self.dtype)}, self.work / "block-sentinel.safetensors")
                self.pending.append([sentinel, "block-sentinel.safetensors", 0])
            self.outside_added = True
        self._flush(final=True)
        names = final_names(len(self.shards))
        for old, new in zip(self.shards, names):
            if old != new and (self.work / old).exists():
                os.replace(self.work / old, self.work / new)
        rename = dict(zip(self.shards, names))
        self.shards = names
        self.weight_map = {t: rename.get(f, f) for t, f in self.weight_map.items()}
        self._record(None)  # all flushed: a resumed finalize starts from here
        self._drop_blocks()

    # ---------------------------------------------------------------- finalize

    def finalize(self, model: nn.Module, recipe_yaml: str, report: dict, sections: dict) -> Path:
        """Write everything but the blocks, verify, and rename the work folder to the target.
        ``sections``: the passes' sections of ``compress.json`` (``Pass.export_metadata``)."""
        src = self.source
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        if cfg.get("tie_word_embeddings") and self._head_apart(model):
            cfg["tie_word_embeddings"] = False  # the head is stored on its own: it no longer reads the embedding's table
        if self.quantized:  # a pruned-only model is a plain checkpoint: no quantization_config
            cfg["quantization_config"] = self._quant_config(model)
        online = (sections.get("rotation") or {}).get("r4")  # an online rotation (compress.quant.online)
        sentinel = self._refuse_transformers(model, cfg, online)
        self.refusals = self._runtimes(cfg, online)
        sections = {**sections, "runtimes": self.refusals}
        report["runtimes"] = self.refusals  # the caller's report: the run's report.json says it too
        with self._disk():
            self._final_shards(sentinel)
            texts = {"config.json": json.dumps(cfg, indent=2, sort_keys=True),
                     METADATA: json.dumps(self.metadata(sections), indent=2), "recipe.yaml": recipe_yaml,
                     "report.json": json.dumps(report, indent=2)}
            if len(self.shards) > 1:  # one shard: model.safetensors alone, as transformers writes it
                total_size = sum(_data_bytes(self.work / f) for f in self.shards)  # tensor bytes, as transformers counts
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
                texts = {"model.safetensors.index.json": json.dumps(index, indent=2), **texts}
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

    def _head_apart(self, model: nn.Module) -> bool:
        """Whether a tied model's head was stored with tensors of its own by the phases outside the
        blocks (an embedding stored in a form no head computes with, a tensor train, unties it)."""
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        return name is not None and any(t.startswith(name + ".") for t, _, _ in self.outside_entries)

    def _refuse_transformers(self, model: nn.Module, cfg: dict, online: dict | None = None) -> str | None:
        """Where plain transformers would load the export as a different model (its Linears missing
        and randomly initialized, with only a printed report), make it refuse instead, and say so
        in ``self.refusals`` (compress.json ``runtimes``; the run logs it). Two such exports:

        * quantized layers that are ``Conv1D`` in transformers (GPT-2): compressed-tensors quantizes
          ``nn.Linear`` modules only, so transformers leaves them as random weights. vLLM (its own
          Linears) and compress.load read them.
        * layers stored as factors (low-rank, ``export.lowrank: factored``): transformers has one
          weight there. Only compress.load reads them.
        * an online rotation (``online``: compress.json ``rotation.r4``): transformers would skip
          it and compute another function. Only compress.load computes it (``ONLINE_WHY``).

        How it refuses: with a ``quantization_config``, its ``global_compression_ratio`` (an
        informational float that neither vLLM nor compress reads) holds ``REFUSAL`` as text, which
        transformers' compressed-tensors config rejects at load (a pydantic error that shows the
        text). Without one (factors only), the returned ``sentinel``: an empty tensor under the
        first factored layer's dense weight name, whose size mismatch stops transformers
        (``ignore_mismatched_sizes`` is off by default); compress.load does not read that name."""
        conv1d = sorted(set(model.__dict__.get("_compress_conv1d", [])) & set(self.quantized))
        unread = self.unread.get(TRANSFORMERS, {}).get("layers", [])
        if not conv1d and not self.factored and not unread and not online:
            return None
        if conv1d:
            why = (f"{len(conv1d)} quantized layers are Conv1D in transformers ({conv1d[0]}, ...), which compressed-tensors "
                   "does not quantize: transformers would load them as random weights")
            loads = ["vLLM", "compress"] if not self.factored else ["compress"]
        elif self.factored:
            why = (f"{len(self.factored)} layers are stored as low-rank factors ({self.factored[0]}, ...), which only "
                   "compress.load reads; export.lowrank: merged writes dense weights every runtime loads")
            loads = ["compress"]
        elif unread:
            why = f"{len(unread)} layers ({unread[0]}, ...): {self.unread[TRANSFORMERS]['why']}"
            loads = [r for r in ALL_RUNTIMES if r not in self.unread]
        else:
            why, loads = ONLINE_WHY, [COMPRESS]
        if online:
            loads = [COMPRESS]
        sentinel = None
        if "quantization_config" in cfg:
            cfg["quantization_config"]["global_compression_ratio"] = REFUSAL
            how = f"config.json quantization_config.global_compression_ratio = {REFUSAL!r} (transformers rejects the text)"
        else:
            sentinel = f"{sorted(self.factored or unread)[0]}.weight"
            how = f"the empty tensor {sentinel} (transformers stops on its size mismatch)"
        self.refusals = {"loads": loads, "refuses": {"transformers": {"why": why, "how": how}}}
        return sentinel

    def _runtimes(self, cfg: dict, online: dict | None = None) -> dict:
        """``{loads: [...], refuses: {runtime: {why[, how]}}}``: the refusals made above, and every
        runtime that cannot serve a stored scheme or the factored layers (the module types' rules,
        ``CompressedLinear.refusal``, verified by tests/vllm and tests/checkpoint)."""
        refuses = dict(self.refusals.get("refuses", {}))
        qc = cfg.get("quantization_config")
        if qc:
            ctx = runtime_context(cfg)
            for scheme in read_quantization_config({**qc, "global_compression_ratio": None}).values():
                for runtime, why in scheme_refusals({**scheme, **ctx}).items():
                    refuses.setdefault(runtime, {"why": why})
        for runtime in ALL_RUNTIMES:
            if self.factored and runtime != COMPRESS:
                refuses.setdefault(runtime, {"why": f"{len(self.factored)} layers are stored as low-rank factors, which only compress.load reads"})
        for runtime, u in self.unread.items():
            refuses.setdefault(runtime, {"why": f"{len(u['layers'])} layers ({u['layers'][0]}, ...): {u['why']}"})
        for runtime in ALL_RUNTIMES if online else ():
            if runtime != COMPRESS:
                refuses.setdefault(runtime, {"why": ONLINE_WHY})
        return {"loads": [r for r in ALL_RUNTIMES if r not in refuses], "refuses": refuses}

    @staticmethod
    def metadata(sections: dict) -> dict:
        """Our own description of the checkpoint beyond what compressed-tensors records (it
        declares no sparsity: current vLLM refuses a 2:4 ``sparsity_config``, so ours lives
        here): the format version, then the passes' sections in name order (``lowrank``,
        ``sparsity``, ...), whatever the order of the passes."""
        return {"format": METADATA_FORMAT, **dict(sorted(sections.items()))}

    def _quant_config(self, model: nn.Module) -> dict:
        """The config's groups: the blocks' Linears (``Linear`` where one scheme serves them all,
        else their names), an untied lm_head by its name (vLLM matches the head by name only), a
        quantized embedding by class (``EMBEDDING_TARGET``; every other nn.Embedding, a position
        table, under ``ignore``)."""
        plain = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in self.quantized]
        groups: dict[tuple, list[str]] = {}
        for name, spec in self.quantized.items():
            where = "embedding" if spec.get("embedding") else "block" if name.startswith(self.blocks_path + ".") else "outside"
            key = (where, spec["bits"], spec["group_size"], spec["symmetric"], spec["act_order"], (spec.get("activations") or {}).get("bits"))
            groups.setdefault(key, []).append(name)
        embedded = any(k[0] == "embedding" for k in groups)
        ignore = [n for n, m in plain if embedded or isinstance(m, nn.Linear)]
        single = sum(k[0] == "block" for k in groups) == 1

        def targets(where: str, names: list[str]) -> list[str]:
            if where == "embedding":
                return [EMBEDDING_TARGET]
            return ["Linear"] if where == "block" and single else transformers_names(model, names)

        return quantization_config(
            [
                {"targets": targets(where, names), "bits": b, "group_size": g, "symmetric": s, "act_order": a,
                 "activations": {"bits": act, "dynamic": True} if act else None}
                for (where, b, g, s, a, act), names in groups.items()
            ],
            ignore=transformers_names(model, ignore),
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

