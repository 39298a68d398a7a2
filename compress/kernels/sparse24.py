"""2:4 semi-structured sparse weights on GPUs, through PyTorch's own sparse tensor subclass.

A Linear pruned to 2:4 (at most 2 nonzeros in every 4 consecutive inputs of a row) can hold its
weight as ``torch.sparse.to_sparse_semi_structured(W)``: the kept values (out, in/2) plus 2-bit
position metadata, 9/16 of the dense weight's bytes, multiplied by the sparse tensor cores of
NVIDIA GPUs of compute capability 8.0 and newer. ``F.linear`` dispatches on the subclass, so the
module itself does not change.

torch picks the backend: cuSPARSELt, or CUTLASS when
``torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS`` is set (it does not fall back on its
own). Only float16/bfloat16 weights on a CUDA device qualify; the CPU (and every other case)
stays dense: the zeros are ordinary values there, and the result is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import UsageError

HALF = (torch.float16, torch.bfloat16)


def is_n_m(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every run of ``m`` consecutive inputs of each row of ``w`` (out, in) has at most
    ``n`` nonzeros, i.e. at least ``m - n`` zeros (``in`` must be a multiple of ``m``)."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    nonzero = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)  # (out, in / m)
    return bool((nonzero <= n).all())


def _backend() -> type:
    """The subclass ``to_sparse_semi_structured`` builds, chosen exactly as torch chooses it."""
    sparse = torch.sparse
    if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS:
        return sparse.SparseSemiStructuredTensorCUTLASS
    return sparse.SparseSemiStructuredTensorCUSPARSELT


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        return f"dtype {_name(dtype)}: 2:4 semi-structured kernels need float16 or bfloat16"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if _backend() is torch.sparse.SparseSemiStructuredTensorCUSPARSELT and not (cusparselt and cusparselt.is_available()):
        return ("this torch build has no cuSPARSELt (torch.backends.cusparselt); set "
                "torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True to use the CUTLASS kernels")
    return None


def shape_ok(out_features: int, in_features: int, dtype: torch.dtype) -> str | None:
    """Why a (out, in) weight cannot be made semi-structured by the current backend; None when it can.

    Each dimension must be at least, and a multiple of, the backend's minimum for the dtype
    (torch's ``_DTYPE_SHAPE_CONSTRAINTS``: cuSPARSELt (16, 16), CUTLASS (32, 64) for fp16/bf16).
    The activations need nothing: torch pads them to the dense minimum itself."""
    if dtype not in HALF:
        return f"dtype {_name(dtype)} is not float16/bfloat16"
    rows, cols = _min_shape(dtype)
    if out_features < rows or out_features % rows or in_features < cols or in_features % cols:
        return f"shape ({out_features}, {in_features}) is not at least and a multiple of ({rows}, {cols})"
    return None


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    try:
        c = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return c.sparse_min_rows, c.sparse_min_cols
    except (AttributeError, KeyError):  # a torch without the table: CUTLASS's, the larger minimum
        return 32, 64


@torch.no_grad()
def to_semi_structured(model: nn.Module, *, names: list[str] | None = None) -> dict:
    """Give every plain ``nn.Linear`` of ``model`` whose weight (out, in) is 2:4, fp16/bf16, on a
    capable CUDA device and of a supported shape a semi-structured sparse weight, in place.

    Why: the weight's bytes drop to 9/16 (kept values (out, in/2) plus 2-bit metadata) and the
    GEMM runs on the sparse tensor cores; outputs equal the dense ``F.linear`` up to rounding.
    Subclasses of nn.Linear (packed, int8, ...) are left alone, and so is the CPU. ``names``
    restricts it to those dotted module names.

    Returns ``{"converted": [names], "skipped": {name: reason}}``; raises UsageError when the
    model's device or dtype cannot run semi-structured kernels at all."""
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    out: dict = {"converted": [], "skipped": {}}
    if names is not None:
        out["skipped"] = {n: "not a plain nn.Linear of the model" for n in names if n not in linears}
        linears = {n: linears[n] for n in names if n in linears}
    if not linears:
        return out
    w0 = next(iter(linears.values())).weight
    why = semi_structured_support(w0.device, w0.dtype)
    if why is not None:
        raise UsageError(why)
    for name, lin in linears.items():
        w, b = lin.weight, lin.bias
        if w.device.type != "cuda":
            reason = f"on {w.device}"
        elif b is not None and b.dtype != w.dtype:  # cuSPARSELt's addmm needs one dtype
            reason = f"bias dtype {_name(b.dtype)} differs from the weight's {_name(w.dtype)}"
        else:
            reason = shape_ok(*w.shape, w.dtype) or (None if is_n_m(w) else "the weight is not 2:4 sparse")
        if reason is not None:
            out["skipped"][name] = reason
            continue
        lin.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach().contiguous()), requires_grad=False)
        out["converted"].append(name)
    return out
