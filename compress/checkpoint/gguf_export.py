"""Write ``OUT/model.gguf``: the compressed model as llama.cpp reads it, with the ``gguf`` package.

``GGUFExporter`` runs the sweep's export as ``Exporter`` does (finished blocks flushed to the
work folder, ``--resume``, atomic install of the folder), then, instead of naming safetensors
shards, streams every tensor into one GGUF file:

* Linears the quantization passes solved on llama.cpp's grid (``GGMLLinear``) are written as
  they hold them, byte for byte;
* other 2-D weights (the token embedding, an untied output, Linears no pass quantized) are
  rounded to nearest on the type llama.cpp's mix gives them (``compress.checkpoint.gguf``);
  with tied embeddings the token embedding gets the output's type and no output is written;
* norms and biases are F32;
* llama-architecture q/k rows are reordered to llama.cpp's rotary layout (what its own
  converter does; rows are independent, so quantized rows move whole).

The header carries the architecture's hyper-parameters and the tokenizer (vocabulary, token
types, merges, special tokens, add_bos, chat template; ``gguf.SpecialVocab``), so llama.cpp
and ``compress eval OUT/model.gguf`` (our GGUF input) read the file without anything beside it.
The folder also holds recipe.yaml, report.json and compress.json (which runtimes load it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from compress.checkpoint.export import Exporter
from compress.checkpoint.files import install
from compress.checkpoint.gguf import (
    F16,
    F32,
    TYPES,
    arch_for,
    category,
    gguf_name,
    name_map,
    tensor_type,
    tied_embeddings,
)
from compress.errors import InputError
from compress.quant import ggml
from compress.utils import atomic_write_text, remove_quietly

GGUF_FILE = "model.gguf"
BLOCK_ALL = 256 * 3  # a row length every block size divides: the type a tensor gets before any fallback
RUNTIMES = {"loads": ["llama.cpp", "compress"],
            "refuses": {r: {"why": "a GGUF file: vLLM and transformers' compressed-tensors path do not read it"}
                        for r in ("vLLM", "vLLM-CPU", "transformers")}}


@dataclass
class Planned:
    """One tensor of the file: where it comes from and how it is stored."""

    gguf: str  # its GGUF name
    hf: str  # the HF tensor it is made from (``...weight_ggml`` for solved blocks)
    kind: str  # "ggml" (solved bytes), "rtn" (round now), "f16", "f32"
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # the numpy shape of the data written (bytes per row for quantized)
    nbytes: int
    permute: int = 0  # heads whose rotary pairs are reordered (0: none)
    grid: str | None = None  # the storage type (quantized kinds)
    row: int = 0  # the weight's row length (HF in_features)


class GGUFExporter(Exporter):
    """``Exporter`` whose finished folder holds ``model.gguf`` instead of safetensors shards."""

    def __init__(self, *args, gguf_type: str, imatrix: bool = False, log=print, **kw):
        """``imatrix``: the quantization pass calibrated (llama.cpp's mix rules with an importance matrix)."""
        super().__init__(*args, **kw)
        self.gguf_type, self.imatrix, self.log = gguf_type, imatrix, log

    def tensor_files(self) -> dict[str, Path]:
        """Where each tensor of the model is now: the blocks' in the work folder (a shard the sweep
        flushed, or a block's file), the others in the source's files. The file is written from
        there, with no safetensors copy of the model in between."""
        files = {t: self.work / f for t, f in self.weight_map.items()}
        files.update({t: self._file(f) for t, f, _ in self.pending})
        files.update({n: Path(self.source.weight_map[n]) for n in self.outside})
        return files

    def finalize(self, model, recipe_yaml: str, report: dict, sections: dict) -> Path:
        self.refusals = RUNTIMES
        report["runtimes"] = RUNTIMES
        files = self.tensor_files()
        read = lambda n: _read(files, n)
        plan = plan_tensors(self.source.config, self.gguf_type, _shapes(files), read)
        notes = summarize_plan(plan, self.source.config, self.gguf_type, self.imatrix)
        report["gguf"] = notes
        for k, v in notes["fallbacks"].items():
            self.log(f"GGUF {self.gguf_type}: {k} ({v}; llama.cpp's fallback where the type's blocks do not divide the rows)")
        with self._disk():
            write_gguf(self.work / GGUF_FILE, self.source, self.gguf_type, plan, read)
            check_file(self.work / GGUF_FILE, len(plan))
            for f in set(files.values()):
                if f.parent == self.work:  # the blocks' files and shards: the GGUF holds them now
                    remove_quietly(f)
            texts = {"compress.json": json.dumps(self.metadata({**sections, "runtimes": RUNTIMES, "gguf": notes}), indent=2),
                     "recipe.yaml": recipe_yaml, "report.json": json.dumps(report, indent=2)}
            for name, text in texts.items():
                atomic_write_text(self.work / name, text)
            self._drop_inputs()
        install(self.work, self.target)
        remove_quietly(self.target / "progress.json")
        return self.target


def _shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor in ``files``, from the files' headers."""
    by_file: dict[Path, list[str]] = {}
    for n, f in files.items():
        by_file.setdefault(f, []).append(n)
    out = {}
    for f, names in by_file.items():
        with safe_open(f, "pt") as h:
            for k in names:
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as h:
        return h.get_tensor(name)


# ---------------------------------------------------------------- which tensors, in which types


def plan_tensors(config, ftype: str, shapes: dict[str, tuple], read) -> list[Planned]:
    """Every tensor of the file, in the order llama.cpp's converter writes them (embedding,
    blocks, final norm, output). ``shapes``: HF tensor name -> (shape, safetensors dtype);
    ``read(name)``: the tensor."""
    arch, tmap, tied = arch_for(config), name_map(config), tied_embeddings(config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    plan = []
    for hf, (shape, dtype) in shapes.items():
        if hf.endswith(".ggml_type") or (tied and hf == "lm_head.weight"):
            continue
        solved = hf.endswith(".weight_ggml")
        base = hf[: -len("_ggml")] if solved else hf
        g = gguf_name(tmap, base)
        if g is None:
            raise InputError(f"{hf}: GGUF export has no llama.cpp tensor name for this tensor of a {config.model_type} model")
        permute = 0
        if arch.permute_qk and (".attn_q." in g or ".attn_k." in g):
            permute = heads if ".attn_q." in g else kv
        if solved:
            qtype = gguf.GGMLQuantizationType(int(read(hf[: -len("weight_ggml")] + "ggml_type")[0]))
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            plan.append(Planned(g, hf, "ggml", qtype, shape, shape[0] * shape[1], permute, qtype.name.lower(), shape[1] // size * block))
        elif len(shape) == 1:
            plan.append(Planned(g, hf, "f32", gguf.GGMLQuantizationType.F32, shape, shape[0] * 4, permute, None, shape[0]))
        else:
            t = tensor_type(ftype, g, shape[1], config, tied)
            if t in (F16, F32):
                plan.append(Planned(g, hf, "f16", gguf.GGMLQuantizationType.F16, shape, shape[0] * shape[1] * 2, permute, "f16", shape[1]))
            else:
                grid = ggml.grid(t)
                row = _row_bytes(grid.qtype, shape[1])
                plan.append(Planned(g, hf, "rtn", grid.qtype, (shape[0], row), shape[0] * row, permute, t, shape[1]))
    plan.sort(key=_order)
    return plan


def _row_bytes(qtype, n: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n // block * size


def _order(p: Planned) -> tuple:
    if p.gguf.startswith("token_embd"):
        return (0, 0, p.gguf)
    if p.gguf.startswith("blk."):
        return (1, int(p.gguf.split(".")[1]), p.gguf)
    return (2, 0 if p.gguf.startswith("output_norm") else 1, p.gguf)


def summarize_plan(plan: list[Planned], config, ftype: str, imatrix: bool = False) -> dict:
    """What report.json and compress.json say about the file: tensors per storage type, and the
    2-D tensors stored in llama.cpp's fallback type because their rows do not fit the type's
    blocks (``fallbacks``: {"category: mixed type -> stored type": "N tensors, rows of W"})."""
    types: dict[str, int] = {}
    falls: dict[str, list] = {}
    tied = tied_embeddings(config)
    for p in plan:
        name = p.grid or p.qtype.name.lower()
        types[name] = types.get(name, 0) + 1
        if p.kind == "f32":
            continue
        wanted = tensor_type(ftype, p.gguf, BLOCK_ALL, config, tied, imatrix)
        if wanted != name:
            falls.setdefault(f"{category(p.gguf)}: {wanted} -> {name}", []).append(p.row)
    fallbacks = {k: f"{len(v)} tensors, rows of {', '.join(map(str, sorted(set(v))))}" for k, v in falls.items()}
    return {"file": GGUF_FILE, "type": ftype, "tensors": len(plan), "types": dict(sorted(types.items())), "fallbacks": fallbacks}


# ---------------------------------------------------------------- the file


def _rows_permutation(n_rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of a q/k projection: within each head, HF's two halves become
    interleaved pairs (row r of the GGUF tensor is row perm[r] of HF's)."""
    hd = n_rows // heads
    return torch.arange(n_rows).reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def tensor_data(p: Planned, read) -> np.ndarray:
    """The bytes (or floats) written for ``p``."""
    t = read(p.hf)
    if p.kind == "ggml":
        data = t
    elif p.kind == "f32":
        data = t.float()
    elif p.kind == "f16":
        data = t.float().to(torch.float16)
    else:
        codes, params = ggml.rtn(t.float(), ggml.grid(p.grid))
        data = torch.from_numpy(ggml.encode(codes, params))
    if p.permute:
        data = data[_rows_permutation(data.shape[0], p.permute)]
    return np.ascontiguousarray(data.numpy())


def write_gguf(path: Path, source, ftype: str, plan: list[Planned], read) -> None:
    """Write the file at ``path`` (a temporary name, renamed when complete)."""
    config = source.config
    arch = arch_for(config)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
    try:
        _metadata(w, config, ftype)
        _tokenizer(w, source.path, config)
        for p in plan:
            np_dtype = {"f32": np.float32, "f16": np.float16}.get(p.kind, np.uint8)
            w.add_tensor_info(p.gguf, p.shape, np.dtype(np_dtype), p.nbytes, raw_dtype=None if p.kind in ("f32", "f16") else p.qtype)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:
            w.write_tensor_data(tensor_data(p, read))
        w.close()
        tmp.replace(path)
    finally:
        w.close()
        remove_quietly(tmp)


def _metadata(w: gguf.GGUFWriter, config, ftype: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_name(getattr(config, "_name_or_path", "") or config.model_type)
    w.add_file_type(int(TYPES[ftype][1]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta:
        w.add_rope_freq_base(float(theta))
    rope = getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_vocab_size(config.vocab_size)


# ---------------------------------------------------------------- tokenizer


def _pretokenizers(tok_json: dict) -> list[dict]:
    """The tokenizer.json's pre-tokenizers in order (a Sequence's members, or the one)."""
    pre = tok_json.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _pre_tokenizer(tok_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization, from its structure (None: unknown)."""
    pres = _pretokenizers(tok_json)
    kinds = [p.get("type") for p in pres]
    if kinds == ["ByteLevel"] and pres[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pres[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = pres[0].get("pattern", {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"\p{N}|" in regex or r"\p{N}| ?" in regex:
            return "qwen2"
    return None


def read_tokenizer(folder: Path) -> dict:
    """The tokenizer.json of ``folder``, if GGUF export can write it: a byte-level BPE (GPT-2 style;
    byte fallback is harmless there, every byte being a token). An InputError otherwise, raised
    before any work (``compress.api.job``)."""
    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise InputError(f"{folder}: GGUF export needs tokenizer.json (a fast byte-level BPE tokenizer) beside the model")
    tok_json = json.loads(tj.read_text(encoding="utf-8"))
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in _pretokenizers(tok_json)):
        raise InputError(f"{tj}: GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style); this one is "
                         f"{model.get('type')} without a ByteLevel pre-tokenizer (SentencePiece-style vocabularies are not written yet)")
    return tok_json


def _tokenizer(w: gguf.GGUFWriter, folder: Path, config) -> None:
    """Vocabulary, token types, merges and special tokens of the HF tokenizer in ``folder``."""
    tok_json = read_tokenizer(folder)
    model = tok_json["model"]
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok_json.get("added_tokens", [])}
    for text, a in added.items():
        vocab.setdefault(text, a["id"])
    n = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = gguf.TokenType.NORMAL if a is None else (gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok_json) or "default")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    special.add_special_token.update(_adds_special(folder, special))
    special.add_to_gguf(w, quiet=True)
    tmpl = folder / "chat_template.jinja"
    if special.chat_template is None and tmpl.exists():
        w.add_chat_template(tmpl.read_text(encoding="utf-8"))


def _adds_special(folder: Path, special) -> dict[str, bool]:
    """Whether the tokenizer puts its bos / eos token around a text, as it really behaves (llama.cpp
    otherwise assumes its own default, and would score other tokens than our evaluation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a", add_special_tokens=True)["input_ids"]
    out = {}
    for kind, at in (("bos", 0), ("eos", -1)):
        i = special.special_token_ids.get(kind)
        out[kind] = bool(ids) and i is not None and ids[at] == i
    return out


def check_file(path: Path, n_tensors: int) -> None:
    """The file just written reads back whole (gguf's reader) with every tensor."""
    try:
        r = gguf.GGUFReader(path)
        got = len(r.tensors)
    except Exception as e:
        raise InputError(f"{path}: the GGUF file just written cannot be read back ({e})") from e
    if got != n_tensors:
        raise InputError(f"{path}: {got} tensors read back, {n_tensors} written")

