"""What a checkpoint holds: layers, schemes, bits per parameter, size on disk, which runtimes read it."""

from __future__ import annotations

import math

from compress.checkpoint.formats import read_quantization_config
from compress.checkpoint.load import quantized_layer_names
from compress.checkpoint.source import ModelSource, read_metadata, resolve_model


def inspect_checkpoint(path) -> dict:
    """Layers, schemes, bits per parameter and size on disk of a checkpoint folder."""
    source = ModelSource(resolve_model(path))
    size = source.disk_bytes()
    quantized = set(quantized_layer_names(source))
    info = source.tensor_info(list(source.weight_map))
    packed = [q for q in quantized if q + ".weight_shape" in source.weight_map]
    shapes = source.read([f"{q}.weight_shape" for q in packed])
    bits = 8 * sum(nbytes for _, nbytes in info.values())
    n_params = sum(math.prod(shapes[q + ".weight_shape"].tolist()) for q in packed)  # original weights
    n_params += sum(math.prod(info[q + ".weight"][0]) for q in quantized if q not in packed)  # int8 (W8A8) weights
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
    meta = read_metadata(source.path)
    if "lowrank" in meta:
        lr = meta["lowrank"]
        out["lowrank"] = {k: lr[k] for k in ("export", "method", "parameters_kept", "parameters_dense")}
        out["lowrank"]["layers"] = sum(1 for v in lr["layers"].values() if v["rank"] is not None)
    if "sparsity" in meta:
        sp = meta["sparsity"]
        out["sparsity"] = {"structure": sp["structure"], "global_sparsity": sp["global_sparsity"], "layers": len(sp["targets"])}
    return out
