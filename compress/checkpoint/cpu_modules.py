"""The serving form of packed layers on the CPU: ``QuantLinear``/``Int8Linear`` whose codes live
only in the CPU kernels' layout (``compress.kernels.cpu``), so a loaded model holds about its
packed size in memory, not a dense copy.

``compress.load`` converts each packed layer it can (``to_cpu_kernels``); the others keep the
torch reference and the load says which and why, once. The converted modules are the same types
to every reader (``isinstance(m, QuantLinear)``): ``dequantize()`` and the state_dict give the
export's tensors back exactly (``weight_packed`` / ``weight`` are recomputed from the kernel
layout on access; slow, for inspection and re-export, never on the forward path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.packing import pack_int32
from compress.kernels import cpu, native, record_kernel, reference
from compress.utils import replace_linear, trim_heap


def _copy_state(dst: nn.Module, src: nn.Module, skip: str) -> None:
    nn.Module.__init__(dst)
    for k, v in vars(src).items():
        if not k.startswith("_") and k not in ("training",):
            setattr(dst, k, v)
    for name, buf in src._buffers.items():
        if name != skip and buf is not None:
            dst.register_buffer(name, buf)
    dst.bias = src.bias
    dst.train(src.training)


class _DenseWhileEvaluating:
    """keep_dense for converted modules: the dequantized weight kept between forwards."""

    def keep_dense(self, on: bool = True) -> bool:
        self.__dict__["_keep_dense"] = on
        if not on:
            self.__dict__.pop("_dense", None)
        return True

    def _kept(self) -> torch.Tensor | None:
        if not self.__dict__.get("_keep_dense"):
            return None
        if "_dense" not in self.__dict__:
            self.__dict__["_dense"] = self.dequantize()
        return self.__dict__["_dense"]


class CpuQuantLinear(_DenseWhileEvaluating, QuantLinear):
    """A ``QuantLinear`` (4 or 8-bit) computing through the CPU int4/int8 kernels; its codes are
    held once, in ``self.cpu`` (``compress.kernels.cpu.CpuWeights``)."""

    kernel = "cpu"

    def __init__(self, src: QuantLinear, cw: cpu.CpuWeights):
        _copy_state(self, src, skip="weight_packed")
        self.cpu = cw
        self.kernel = "cpu"

    @property
    def weight_packed(self) -> torch.Tensor:
        """The export's int32 words, recomputed from the kernel layout (exact)."""
        return pack_int32(cpu.codes(self.cpu), self.bits, dim=1)

    def g_idx(self) -> torch.Tensor:
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        return torch.arange(self.in_features) // self.cpu.gs

    def dequantize(self) -> torch.Tensor:
        w = cpu.dequantize(self.cpu)
        if self.cpu.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.cpu.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept()
        if kept is not None:  # evaluation's dequantize-once path (the torch reference)
            self.kernel = record_kernel("torch")
            return F.linear(x, kept.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        self.kernel = record_kernel("cpu")
        return cpu.wna16_linear(x, self.cpu, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_packed"] = self.weight_packed


class CpuInt8Linear(Int8Linear):
    """An ``Int8Linear`` (W8A8) computing through oneDNN's int8 GEMM; its weight is held once,
    prepacked, in ``self.cpu`` (``compress.kernels.cpu.CpuInt8``)."""

    kernel = "cpu"

    def __init__(self, src: Int8Linear):
        ci = cpu.build_int8(src.weight, src.weight_scale)
        _copy_state(self, src, skip="weight")
        self.cpu = ci
        self.kernel = "cpu"

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes, recomputed from oneDNN's prepacked layout (exact)."""
        return cpu.int8_codes(self.cpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel = record_kernel("cpu")
        return cpu.int8_linear(x, self.cpu, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight


def to_cpu_kernels(model: nn.Module, dtype: torch.dtype, log=print) -> dict:
    """Convert every packed layer of ``model`` (on the CPU) that the CPU kernels run, in place,
    one layer at a time (the export layout of each is freed as it goes). ``dtype``: the compute
    dtype (bf16; float32 and fp16 convert nothing: the torch reference is the exact float32 path).
    Returns {'converted': [...], 'reference': {name: reason}} and logs a one-line summary."""
    out: dict = {"converted": [], "reference": {}}
    why_all = cpu.available()
    for name, m in list(model.named_modules()):
        if type(m) is QuantLinear:
            why = why_all
            if why is None:
                try:
                    replace_linear(model, name, CpuQuantLinear(m, cpu.build(m, dtype)))
                except ValueError as e:
                    why = str(e)
        elif type(m) is Int8Linear:
            why = why_all
            if why is None:
                replace_linear(model, name, CpuInt8Linear(m))
        else:
            continue
        if why is None:
            out["converted"].append(name)
        else:
            out["reference"][name] = why
    trim_heap()  # the export layouts and the conversions' temporaries, handed back to the OS
    if out["converted"] or out["reference"]:
        msg = f"CPU integer kernels: {len(out['converted'])} packed layers"
        if out["reference"]:
            reasons = sorted(set(out["reference"].values()))
            msg += f"; {len(out['reference'])} on the torch reference ({'; '.join(reasons)})"
        on_torch = sum(isinstance(m, CpuQuantLinear) and m.cpu.bits == 4 and m.cpu.layout == "torch" for m in model.modules())
        if on_torch:  # slower at decode than ours: say why ours does not run
            msg += f"; {on_torch} 4-bit layers on torch's int4 kernel, not compress's ({native.missing()})"
        log(msg)
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors hold in memory: parameters and buffers (shared ones once) and the
    CPU kernels' layouts."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, (CpuQuantLinear, CpuInt8Linear)):
            total += m.cpu.nbytes
    return total
