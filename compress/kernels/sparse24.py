"""2:4 semi-structured sparse weights on GPUs, through PyTorch's own sparse tensor subclass.

A Linear pruned to 2:4 (at most 2 nonzeros in every 4 consecutive inputs of a row) can hold its
weight as ``torch.sparse.to_sparse_semi_structured(W)``: the nonzeros plus 2-bit position
metadata, a little over half the bytes of the dense weight, multiplied by the sparse tensor cores
of NVIDIA GPUs of compute capability 8.0 and newer (cuSPARSELt, or CUTLASS where cuSPARSELt is
missing). ``F.linear`` dispatches on the subclass, so the module itself does not change.

Only float16/bfloat16 weights on a CUDA device qualify; the CPU (and every other case) stays
dense: the zeros are ordinary values there, and the result is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import UsageError

HALF = (torch.float16, torch.bfloat16)


def is_n_m(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every run of ``m`` consecutive inputs of each row of ``w`` (out, in) has at most
    ``n`` nonzeros (``in`` must be a multiple of ``m``)."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    nonzero = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)  # (out, in / m)
    return bool((nonzero <= n).all())


def _backend():
    """The subclass torch will use: cuSPARSELt where it is built in, else CUTLASS."""
    sparse = torch.sparse
    if getattr(sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False):
        return sparse.SparseSemiStructuredTensorCUTLASS
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return sparse.SparseSemiStructuredTensorCUSPARSELT
    return sparse.SparseSemiStructuredTensorCUTLASS


def semi_structured_support(device, dtype: torch.dtype) -> str | None:
    """Why 2:4 semi-structured Linear weights cannot run on ``device`` in ``dtype``; None when they can."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return f"2:4 semi-structured kernels need a CUDA device (the model is on {dev}); the CPU computes with the dense weights"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability >= 8.0, this GPU has {major}.{minor}"
    if dtype not in HALF:
        return f"dtype {str(dtype).removeprefix('torch.')}: 2:4 semi-structured kernels need float16 or bfloat16"
    return None


def shape_ok(out_features: int, in_features: int, dtype: torch.dtype) -> str | None:
    """Why a (out, in) weight cannot be made semi-structured (the backend's minimum and multiple
    of each dimension); None when it can."""
    if dtype not in HALF:
        return f"dtype {str(dtype).removeprefix('torch.')} is not float16/bfloat16"
    rows, cols = _min_shape(dtype)
    if out_features % rows or in_features % cols:
        return f"shape ({out_features}, {in_features}) is not a multiple of ({rows}, {cols})"
    return None


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    try:
        c = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return c.sparse_min_rows, c.sparse_min_cols
    except (AttributeError, KeyError):  # a torch without the table: CUTLASS's documented minimum
        return 32, 64


@torch.no_grad()
def to_semi_structured(model: nn.Module, *, names: list[str] | None = None) -> dict:
    """Give every plain ``nn.Linear`` of ``model`` whose weight is 2:4, fp16/bf16, on a capable
    CUDA device and of a supported shape a semi-structured sparse weight (in place). ``names``
    restricts it to those dotted module names.

    Returns ``{"converted": [names], "skipped": {name: reason}}``; raises UsageError when the
    model's device or dtype cannot run semi-structured kernels at all."""
    wanted = None if names is None else set(names)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and (wanted is None or n in wanted)]
    out: dict = {"converted": [], "skipped": {}}
    if not linears:
        return out
    w0 = linears[0][1].weight
    why = semi_structured_support(w0.device, w0.dtype)
    if why is not None:
        raise UsageError(why)
    for name, lin in linears:
        w = lin.weight
        reason = shape_ok(*w.shape, w.dtype) or (None if is_n_m(w) else "the weight is not 2:4 sparse")
        if w.device.type != "cuda":
            reason = f"on {w.device}"
        if reason is not None:
            out["skipped"][name] = reason
            continue
        lin.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach().contiguous()), requires_grad=False)
        out["converted"].append(name)
    return out
