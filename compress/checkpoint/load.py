"""Load a checkpoint (ours, any HF folder, a .gguf, or ``demo``) into a torch model.

Compressed checkpoints come back as the compressed module types of ``compress.modules``
(``QuantLinear``, ``Int8Linear``, ...) holding the weights exactly as stored and computing with
them; everything else (pruned layers included: dense weights with exact zeros) as ordinary modules.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.checkpoint.cpu_modules import to_cpu_kernels
from compress.checkpoint.formats import read_quantization_config
from compress.checkpoint.source import (
    ModelSource,
    materialize,
    read_metadata,
    resolve_model,
)
from compress.errors import InputError, UsageError
from compress.kernels import cpu as cpu_kernels
from compress.kernels import requested_backend
from compress.kernels.sparse24 import semi_structured_support, to_semi_structured
from compress.modules import (
    CompressedLinear,
    compressed_modules,
    module_types,
    tied_head,
)
from compress.utils import get_module, replace_linear


def stored_modules(source: ModelSource, model: nn.Module | None = None) -> dict[str, type[CompressedLinear]]:
    """Each layer the checkpoint stores in a compressed module type's format -> that type, owners
    before the modules inside them (a low-rank layer before its quantized factors ``<layer>.A``).
    With the ``model`` skeleton, a layer stored in several types' formats (packed codes: a Linear's
    or an embedding's) goes to the first type that ``replaces`` the skeleton's module there; a type
    claiming a layer its base type claims too wins (its format holds more: the outliers of
    ``OutlierQuantLinear`` beside ``QuantLinear``'s packed codes)."""
    claims: dict[str, list[type[CompressedLinear]]] = {}
    for t in module_types():
        for name in t.stored_layers(source):
            claims.setdefault(name, []).append(t)
    out = {n: _fitting(ts, _module_at(model, n)) for n, ts in claims.items()}
    return {n: out[n] for n in sorted(out, key=lambda n: (n.count("."), n))}


def _module_at(model: nn.Module | None, name: str) -> nn.Module | None:
    try:
        return None if model is None else get_module(model, name)
    except AttributeError:  # inside a module not yet in place (a low-rank layer's factors)
        return None


def _fitting(types: list[type[CompressedLinear]], module: nn.Module | None) -> type[CompressedLinear]:
    fits = [t for t in types if module is not None and isinstance(module, t.replaces)] or types
    return next(t for t in fits if not any(o is not t and issubclass(o, t) for o in fits))


def quantized_layer_names(source: ModelSource) -> list[str]:
    """Layers stored in a quantized format (packed codes, int8 W8A8, ...), low-rank factors
    included (``<layer>.A``); a low-rank layer itself stores only its factors."""
    return sorted({n for t in module_types() if not t.container for n in t.stored_layers(source)})


def replace_stored(model: nn.Module, source: ModelSource, stored: dict[str, type[CompressedLinear]], dtype: torch.dtype = torch.float32) -> None:
    """Put the compressed module of each layer in ``stored`` (``stored_modules(source)``, or the
    part of it under one block) in place of the skeleton's Linear, filled from the checkpoint.
    The whole-model loader passes every layer at once; the layer-wise perplexity
    (``compress.eval.layerwise``) one block's at a time, so only that block's are in memory."""
    if not stored:
        return
    qc = getattr(source.config, "quantization_config", None) or {}
    groups = read_quantization_config(qc if isinstance(qc, dict) else qc.to_dict()) if qc else {}  # {}: low-rank only
    for name, kind in stored.items():
        try:
            old = get_module(model, name)
        except AttributeError:
            raise InputError(f"{source.path}: compressed layer {name} does not exist in a {source.config.model_type} model") from None
        new = kind.from_checkpoint(source, name, old, groups)
        new.set_dtype(dtype)
        replace_linear(model, name, new)


def tie_head(model: nn.Module) -> None:
    """Tie the output head to the input embedding: transformers' ``tie_weights``, or where the
    embedding is stored compressed (a quantized table), the head its type serves from the same
    tensors (``CompressedLinear.tied_head``)."""
    head = tied_head(model.get_input_embeddings())
    if head is None:
        model.tie_weights()
        return
    out = model.get_output_embeddings()
    replace_linear(model, next(n for n, m in model.named_modules() if m is out), head)


def load_source(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = source.skeleton(allow_quantized=True)
    replace_stored(model, source, stored_modules(source, model), dtype)
    skip = set()
    if getattr(source.config, "tie_word_embeddings", False):
        skip = {n for n, _ in model.named_parameters() if n.startswith("lm_head.")}
    materialize(model, "", source, dtype=dtype, skip=skip)
    if skip:
        tie_head(model)
    model.eval()
    return model


def resolve_dtype(dtype, source: ModelSource) -> torch.dtype:
    """``load``'s dtype: a torch dtype as given; 'auto' -> the dtype of the checkpoint's stored
    floating-point weights (float32 if none, or if bf16 and the CPU has no native bf16 arithmetic)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise UsageError(f"dtype must be a torch dtype or 'auto', got {dtype!r}")
    named = source.float_dtype()
    if named not in (torch.bfloat16, torch.float16):
        return torch.float32
    if named == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return named


SPARSE24 = "sparse24"  # kernel= value forcing 2:4 semi-structured weights (and automatic packed kernels)


def load(ref, dtype: torch.dtype | str = "auto", log=print, kernel: str | None = None, device=None) -> nn.Module:
    """The model at ``ref`` in ``dtype`` compute, on ``device`` (default: where it was built, the
    CPU); compressed layers stay packed.

    ``dtype``: 'auto' (default) is the dtype the checkpoint stores its floating-point weights in
    (bf16 for our exports; float32 for a GGUF or where the CPU has no native bf16 arithmetic);
    or a torch dtype.

    ``kernel``: the backend of every QuantLinear and Int8Linear, ``torch|cpu|triton|cuda`` (None or
    'auto': the fastest for the device, or $COMPRESS_KERNEL; see compress.kernels). An unknown
    name raises UsageError here; an unavailable one at the first forward, naming what is missing.

    On the CPU with bf16 compute, automatic (or ``kernel="cpu"``) converts every packed layer
    the CPU integer kernels run to their layout, keeping one copy of the codes
    (``compress.checkpoint.cpu_modules``): memory is about the packed size. Layers they cannot
    run keep the torch reference, and the load says which, once. Float32 compute keeps the exact
    torch reference (``kernel='cpu'`` then computes the packed layers in bf16).

    2:4 checkpoints (``compress.json``: ``sparsity.structure == "2:4"``): on a CUDA GPU with
    sparse tensor cores and a float16/bfloat16 ``dtype``, the pruned dense Linears get PyTorch's
    semi-structured sparse weights (``compress.kernels.sparse24``), unless ``kernel='torch'``
    (the dense reference everywhere). ``kernel='sparse24'`` requires them: where they cannot run,
    a UsageError says why. The CPU stays dense.
    """
    sparse = kernel == SPARSE24
    backend = requested_backend(None if sparse else kernel) if kernel not in (None, "") else None
    source = ModelSource(resolve_model(ref, log=log))
    dtype = resolve_dtype(dtype, source)
    model = load_source(source, dtype)
    for _, m in compressed_modules(model):
        m.backend = backend
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and (backend == "cpu" or (backend is None and not sparse and dtype in cpu_kernels.COMPUTE_DTYPES)):
        why = cpu_kernels.available()
        if why and backend == "cpu":
            raise UsageError(f"kernel backend 'cpu' is unavailable: {why}")
        model.compress_cpu_kernels = to_cpu_kernels(model, dtype if dtype in cpu_kernels.COMPUTE_DTYPES else torch.bfloat16, log=log)
    if device is not None:
        model.to(device)
    model.compress_source = source
    sparsity = read_metadata(source.path).get("sparsity", {})
    if sparse or (sparsity.get("structure") == "2:4" and backend != "torch"):
        _semi_structured(model, source, sparsity, dtype, device, required=sparse, log=log)
    return model


def _semi_structured(model, source, sparsity: dict, dtype, device, required: bool, log) -> None:
    structure = sparsity.get("structure")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    why = semi_structured_support(dev, dtype) if structure == "2:4" else f"{source.path} is not a 2:4 checkpoint (compress.json: {structure})"
    if why is not None:
        if required:
            raise UsageError(f"kernel {SPARSE24!r}: {why}")
        return
    res = to_semi_structured(model, names=sparsity["targets"])
    model.compress_sparse24 = res
    log(f"2:4 semi-structured weights: {len(res['converted'])} layers" + (f", {len(res['skipped'])} kept dense" if res["skipped"] else ""))
