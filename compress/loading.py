"""Load a checkpoint (ours, any HF folder, a .gguf, or ``demo``) into a torch model.

Compressed checkpoints come back as ``QuantLinear`` modules holding the packed weights exactly as
stored, computing with them (torch reference path); everything else as ordinary modules.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import InputError
from compress.families import get_module
from compress.formats import Int8Linear, QuantLinear, read_quantization_config, replace_linear
from compress.modelio import ModelSource, materialize, resolve_model


def quantized_layer_names(source: ModelSource) -> list[str]:
    """Layers stored quantized: packed (``weight_packed``) or int8 W8A8 (``weight`` + ``weight_scale``)."""
    packed = {k[: -len(".weight_packed")] for k in source.weight_map if k.endswith(".weight_packed")}
    scaled = {k[: -len(".weight_scale")] for k in source.weight_map if k.endswith(".weight_scale")}
    return sorted(packed | scaled)


def _scheme_for(name: str, groups: dict[str, dict]) -> dict:
    from compress.passes import _matches

    dummy = nn.Linear(1, 1, device="meta")
    for g in groups.values():
        if _matches(name, dummy, g["targets"]):
            return g
    raise InputError(f"{name}: has packed weights but no quantization_config group targets it")


def load_source(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = source.skeleton(allow_quantized=True)
    if source.quantized:
        qc = source.config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        groups = read_quantization_config(qc)
        for name in quantized_layer_names(source):
            try:
                old = get_module(model, name)
            except AttributeError:
                raise InputError(f"{source.path}: packed layer {name} does not exist in a {source.config.model_type} model") from None
            g = _scheme_for(name, groups)
            scale_dtype = source.read([name + ".weight_scale"])[name + ".weight_scale"].dtype
            if g.get("format") == "int-quantized":
                new = Int8Linear(old.in_features, old.out_features, bias=old.bias is not None, scale_dtype=scale_dtype)
            else:
                new = QuantLinear(
                    old.in_features,
                    old.out_features,
                    bits=g["bits"],
                    group_size=g["group_size"],
                    symmetric=g["symmetric"],
                    has_g_idx=source.has(name + ".weight_g_idx"),
                    bias=old.bias is not None,
                    scale_dtype=scale_dtype,
                    dense=g.get("dense", True),  # 3/5/6/7-bit layout of the writing library version
                )
            # the module's state_dict names exactly the tensors the checkpoint stores for it
            tensors = source.read([name + "." + k for k in new.state_dict()])
            new.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()})
            if new.bias is not None:
                new.bias.data = new.bias.data.to(dtype)
            replace_linear(model, name, new)
    skip = set()
    if getattr(source.config, "tie_word_embeddings", False):
        skip = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")}
    materialize(model, "", source, dtype=dtype, skip=skip)
    if skip:
        model.tie_weights()
    model.eval()
    return model


def load(ref, dtype: torch.dtype = torch.float32, log=print, kernel: str | None = None) -> nn.Module:
    """The model at ``ref`` in ``dtype`` compute; compressed layers stay packed.

    ``kernel``: the backend of every QuantLinear and Int8Linear, ``torch|triton|cuda`` (None or 'auto': the
    fastest for the device, or $COMPRESS_KERNEL; see compress.kernels). An unknown name raises
    UsageError here; an unavailable one at the first forward, naming what is missing.
    """
    from compress.kernels import requested_backend

    backend = requested_backend(kernel) if kernel not in (None, "") else None
    source = ModelSource(resolve_model(ref, log=log))
    model = load_source(source, dtype)
    for m in model.modules():
        if isinstance(m, (QuantLinear, Int8Linear)):
            m.backend = backend
    model.compress_source = source
    return model
