"""What a checkpoint holds: layers, schemes, bits per parameter, size on disk, which runtimes read it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from compress.checkpoint.formats import is_embedding_group, read_quantization_config
from compress.checkpoint.load import stored_modules
from compress.checkpoint.source import (
    ModelSource,
    gguf_export_file,
    read_metadata,
    resolve_model,
)
from compress.modules import ALL_RUNTIMES, runtime_context, runtime_fields, runtimes_for


def _parameters(source: ModelSource, stored: dict, info: dict) -> int:
    """Weights the checkpoint stands for: each compressed layer's (its type says how many), and
    every other tensor's elements (``info``: every tensor's shape and bytes)."""
    n = sum(t.stored_parameters(source, q) for q, t in stored.items())
    return n + sum(math.prod(shape) for k, (shape, _) in info.items() if k.rpartition(".")[0] not in stored)


def inspect_gguf(f: Path) -> dict:
    """A GGUF file (a GGUF export's, or any): its tensors by storage type, bits per parameter,
    size, and which runtimes load it (the export's compress.json, where there is one)."""
    import gguf

    r = gguf.GGUFReader(f)
    arch = r.fields["general.architecture"]
    n_params = sum(int(t.n_elements) for t in r.tensors)
    meta = read_metadata(f.parent) if (f.parent / "compress.json").is_file() else {}
    return {
        "path": str(f),
        "format": "gguf",
        "model_type": bytes(arch.parts[arch.data[0]]).decode(),
        "size_bytes": f.stat().st_size,
        "parameters": n_params,
        "bits_per_parameter": round(8 * sum(int(t.n_bytes) for t in r.tensors) / max(n_params, 1), 3),
        "gguf_types": dict(sorted(Counter(t.tensor_type.name.lower() for t in r.tensors).items())),
        "runtimes": meta.get("runtimes", {"loads": ["llama.cpp", "compress"], "refuses": {}}),
    }


def inspect_checkpoint(path) -> dict:
    """Layers, schemes, bits per parameter and size on disk of a checkpoint folder."""
    p = Path(path).expanduser()
    if (f := p if p.suffix == ".gguf" and p.is_file() else gguf_export_file(p)) is not None:
        return inspect_gguf(f)
    source = ModelSource(resolve_model(path))
    stored = {q: t for q, t in stored_modules(source).items() if not t.container}  # low-rank: its factors count
    info = source.tensor_info(list(source.weight_map))  # every shard's header, read once
    bits = 8 * sum(nbytes for _, nbytes in info.values())
    n_params = _parameters(source, stored, info)
    out = {
        "path": str(source.path),
        "model_type": source.config.model_type,
        "size_bytes": source.disk_bytes(),
        "parameters": n_params,
        "bits_per_parameter": round(bits / max(n_params, 1), 3),
        "quantized_layers": len(stored),
    }
    ctx = runtime_context(source.config)  # a quantized embedding's rules depend on tying, W4A16's on vLLM-CPU on experts
    tied = ctx["tied"]
    if source.quantized:
        qc = source.config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        out["format"] = qc.get("format")
        out["schemes"] = [{**g, **runtime_fields({**g, **ctx}), "embedding": is_embedding_group(g)}
                          for g in read_quantization_config(qc).values()]
        out["ignore"] = qc.get("ignore", [])
        emb = [g for g in out["schemes"] if g["embedding"]]
        if emb:  # the token embedding stored quantized (its tied lm_head reads the same table)
            out["embeddings"] = {"bits": emb[0]["bits"], "group_size": emb[0]["group_size"], "tied_head": tied}
    meta = read_metadata(source.path)
    out.update(_metadata_summary(meta))
    # which runtimes load it: what the export recorded (its schemes and layers, the refusals it
    # wrote), or, for a checkpoint without that record, what its schemes allow
    rt = meta.get("runtimes")
    if rt is None:
        loads = [r for r in ALL_RUNTIMES if all(r in runtimes_for({**g, **ctx}) for g in read_quantization_config(qc).values())] if source.quantized else list(ALL_RUNTIMES)
        rt = {"loads": loads, "refuses": {}}
    out["runtimes"] = rt
    return out


def _metadata_summary(meta: dict) -> dict:
    """The families' sections of compress.json, in brief."""
    out = {}
    if "lowrank" in meta:
        lr = meta["lowrank"]
        out["lowrank"] = {k: lr[k] for k in ("export", "method", "parameters_kept", "parameters_dense")}
        out["lowrank"]["layers"] = sum(1 for v in lr["layers"].values() if v["rank"] is not None)
    if "sparsity" in meta:
        sp = meta["sparsity"]
        out["sparsity"] = {"structure": sp["structure"], "global_sparsity": sp["global_sparsity"], "layers": len(sp["targets"])}
    if "tt_embedding" in meta:  # token embeddings stored as tensor trains (compress.quant.tt_module)
        out["tt_embedding"] = {n: {k: v[k] for k in ("vocab_factors", "dim_factors", "ranks")} | {"parameters": _tt_parameters(v)}
                               for n, v in meta["tt_embedding"]["layers"].items()}
    if "structured" in meta:
        st = meta["structured"]
        out["structured"] = {k: st[k] for k in ("shape_before", "shape_after", "params_before", "params_after")}
    return out


def _tt_parameters(layer: dict) -> int:
    """The cores' element count of a TT embedding (its compress.json entry): Σ r_{k-1} v_k d_k r_k."""
    r = [1, *layer["ranks"], 1]
    return sum(r[k] * v * q * r[k + 1] for k, (v, q) in enumerate(zip(layer["vocab_factors"], layer["dim_factors"])))
